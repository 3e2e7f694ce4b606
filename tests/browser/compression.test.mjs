// permessage-deflate end to end (issue 18): Chromium compresses every message it sends;
// through wsbeat to a backend that compresses too (Node `ws`, every message, however
// short), the extension is negotiated with client_no_context_takeover, messages arrive
// intact both ways, the page's compressed `--heartbeat--` never reaches the backend (whose
// inflater never fails), and wsbeat's uncompressed heartbeats reach the page. Then the
// ws4redis snippet stays connected for 30 s through a compressing, busy backend.
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";

import { PATIENCE_MS, browserSuite, startBackend, startWsbeat, waitFor } from "./lib.mjs";

const HOLD_MS = 30_000;
const WSBEAT_INTERVAL_MS = 4_000;

describe("permessage-deflate through wsbeat in Chromium", { concurrency: true }, () => {
  const suite = browserSuite();
  const cleanup = [];
  after(async () => {
    for (const stop of cleanup) await stop();
  });

  async function setup({ interval, tickMs }) {
    const backend = await startBackend({ deflate: true, tickMs });
    cleanup.push(() => backend.kill());
    const wsbeat = await startWsbeat({ upstream: backend.url, interval });
    cleanup.push(() => wsbeat.stop());
    return { backend, wsbeat };
  }

  it("negotiates end to end, relays intact both ways, drops the page's heartbeat", async () => {
    const { backend, wsbeat } = await setup({ interval: "300ms" });
    const page = await suite.browser.newPage();
    await page.goto(suite.pages.url("compression.html"));
    const extensions = await page.evaluate((u) => window.open_socket(u), `${wsbeat.url}/`);
    assert.match(extensions, /^permessage-deflate/);
    assert.match(extensions, /client_no_context_takeover/);
    assert.match(backend.offers[0], /permessage-deflate/);
    assert.match(backend.offers[0], /client_no_context_takeover/);

    const messages = [
      "hi",
      "--heartbeat--!",
      "héllo wörld ✓",
      JSON.stringify({ items: Array.from({ length: 40 }, (_, i) => ({ id: i, text: `message ${i}` })) }),
      "y".repeat(70_000),
    ];
    // The heartbeat goes between the others, several times: it must vanish every time.
    await page.evaluate((ms) => {
      for (const m of ms) {
        window.ws.send("--heartbeat--");
        window.ws.send(m);
      }
      window.ws.send(new Uint8Array([0, 1, 2, 255]));
    }, messages);
    const expected = [...messages, "binary:0,1,2,255"];
    await waitFor(
      () => page.evaluate((n) => window.record.received.length >= n, expected.length),
      "the echoes",
    );
    const record = await page.evaluate(() => window.record);
    assert.deepEqual(record.received, expected);
    assert.deepEqual(
      backend.received.map((m) => (typeof m === "string" ? m : `binary:${[...m].join(",")}`)),
      expected,
      "the backend got every message, no heartbeat",
    );
    assert.deepEqual(backend.errors, [], "the backend's inflater never failed");
    await waitFor(() => page.evaluate(() => window.record.heartbeats >= 2), "wsbeat's heartbeats");
    assert.equal((await page.evaluate(() => window.record)).closed, null);
  });

  it("the ws4redis snippet stays connected for 30 s through a compressing, busy backend", async () => {
    const { backend, wsbeat } = await setup({ interval: "4s", tickMs: 100 });
    const page = await suite.browser.newPage();
    await page.goto(suite.pages.url(`ws4redis.html?ws=${encodeURIComponent(`${wsbeat.url}/`)}`));
    await page.waitForFunction(() => window.record.opened !== null, null, { timeout: PATIENCE_MS });
    await page.waitForFunction(
      (hold) => window.record.closed !== null || performance.now() - window.record.opened >= hold,
      HOLD_MS,
      { timeout: HOLD_MS + PATIENCE_MS, polling: 100 },
    );
    const record = await page.evaluate(() => window.record);
    assert.equal(record.closed, null, "the snippet closed the connection");
    assert.ok(record.heartbeats >= Math.floor(HOLD_MS / WSBEAT_INTERVAL_MS) - 1, `${record.heartbeats} heartbeats`);
    assert.ok(record.messages > record.heartbeats, `backend was not busy: ${record.messages} messages`);
    assert.ok(record.sent >= 5, `the snippet sent ${record.sent} heartbeats`);
    assert.ok(!backend.received.includes("--heartbeat--"), "a heartbeat reached the backend");
    assert.deepEqual(backend.errors, [], "the backend's inflater never failed");
    assert.match(backend.offers[0] ?? "", /client_no_context_takeover/);
  });
});
