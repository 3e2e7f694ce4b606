// The ws4redis client snippet, as its docs give it, through wsbeat in a real browser: it
// resets its missed-heartbeat counter only on the heartbeat and closes at the third 5 s
// tick without one. `mode: interval` (the default) keeps it connected whatever the backend
// does; `mode: idle` starves it of heartbeats while the backend is busy, and it drops.
// The snippet's timing is its own (5 s × 3), so each case takes 30 s; they run at once.
import assert from "node:assert/strict";
import { after, describe, it } from "node:test";

import { PATIENCE_MS, browserSuite, startBackend, startWsbeat } from "./lib.mjs";

const HOLD_MS = 30_000;
const SNIPPET_TICK_MS = 5_000;
const SNIPPET_MAX_MISSED = 3;
const WSBEAT_INTERVAL_MS = 4_000;
const BUSY_TICK_MS = 100;

describe("the ws4redis client snippet through wsbeat", { concurrency: true }, () => {
  const suite = browserSuite();
  const cleanup = [];
  after(async () => {
    for (const stop of cleanup) await stop();
  });

  /** Opens the snippet through wsbeat (in `mode`) to a busy or idle backend. */
  async function connect({ mode, busy }) {
    const backend = await startBackend({ tickMs: busy ? BUSY_TICK_MS : undefined });
    cleanup.push(() => backend.kill());
    const wsbeat = await startWsbeat({ upstream: backend.url, interval: "4s", mode });
    cleanup.push(() => wsbeat.stop());
    const page = await suite.browser.newPage();
    await page.goto(suite.pages.url(`ws4redis.html?ws=${encodeURIComponent(`${wsbeat.url}/`)}`));
    await page.waitForFunction(() => window.record.opened !== null, null, { timeout: PATIENCE_MS });
    return page;
  }

  /** Waits until the socket closed or `HOLD_MS` passed since it opened; returns the record. */
  async function hold(page) {
    await page.waitForFunction(
      (hold) => window.record.closed !== null || performance.now() - window.record.opened >= hold,
      HOLD_MS,
      { timeout: HOLD_MS + PATIENCE_MS, polling: 100 },
    );
    return page.evaluate(() => window.record);
  }

  // At least one heartbeat per wsbeat interval, less one for the phase at either end.
  const minHeartbeats = Math.floor(HOLD_MS / WSBEAT_INTERVAL_MS) - 1;

  it("interval mode, backend sending every 100 ms: stays connected for 30 s", async () => {
    const record = await hold(await connect({ mode: "interval", busy: true }));
    assert.equal(record.closed, null, "the snippet closed the connection");
    assert.ok(record.heartbeats >= minHeartbeats, `${record.heartbeats} heartbeats in 30 s`);
    assert.ok(record.messages > record.heartbeats, `backend was not busy: ${record.messages} messages`);
  });

  it("interval mode, idle backend: stays connected for 30 s", async () => {
    const record = await hold(await connect({ mode: "interval", busy: false }));
    assert.equal(record.closed, null, "the snippet closed the connection");
    assert.ok(record.heartbeats >= minHeartbeats, `${record.heartbeats} heartbeats in 30 s`);
    assert.equal(record.messages, 0);
  });

  it("idle mode, backend sending every 100 ms: the snippet drops (why interval is the default)", async () => {
    const record = await hold(await connect({ mode: "idle", busy: true }));
    assert.notEqual(record.closed, null, "the snippet stayed connected for 30 s");
    // wsbeat never had an idle interval to fill, so no heartbeat came, and the snippet
    // gave up at its third tick.
    assert.equal(record.heartbeats, 0);
    assert.ok(record.messages > 0);
    const lived = record.closed.at - record.opened;
    assert.ok(
      lived >= SNIPPET_MAX_MISSED * SNIPPET_TICK_MS - 50,
      `closed after ${lived} ms, before the snippet's third tick`,
    );
    assert.equal(record.closed.code, 1005, "the snippet's ws.close() sends no code");
  });
});
