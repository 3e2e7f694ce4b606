// `wsbeat demo` as a person meets it: the page, served through wsbeat's plain-HTTP
// pass-through, renders (a screenshot, its size checked),
// shows heartbeats as they arrive, Pause silences the backend while the heartbeats go on,
// and Kill gets a 1011 from wsbeat and a reconnection.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { after, before, describe, it } from "node:test";

import { PATIENCE_MS, REPO, browserSuite, wsbeatBin } from "./lib.mjs";

const VIEWPORT = { width: 1280, height: 860 };
/** wsbeat's default heartbeat interval, which the demo uses. */
const HEARTBEAT_MS = 4000;

/**
 * Starts `wsbeat demo` on port 0; resolves with the addresses it prints: wsbeat's, the
 * backend's, and the page's (on wsbeat's port, passed through to the backend).
 */
async function startDemo() {
  const child = spawn(wsbeatBin(), ["demo", "--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  const lines = readline.createInterface({ input: child.stdout });
  const printed = {};
  const lastWord = (line) => line.split(/\s+/).pop();
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the demo printed no page URL")), PATIENCE_MS);
    child.once("exit", (code) => reject(new Error(`wsbeat demo exited (${code})`)));
    lines.on("line", (raw) => {
      const line = raw.trim();
      if (line.startsWith("echo backend")) printed.backend = new URL(lastWord(line)).host;
      if (line.startsWith("wsbeat in front of it")) printed.proxy = new URL(lastWord(line)).host;
      if (line.startsWith("demo page")) {
        clearTimeout(timer);
        printed.pageUrl = lastWord(line);
        resolve();
      }
    });
  });
  assert.equal(new URL(printed.pageUrl).host, printed.proxy, "the page is served through wsbeat");
  return { child, ...printed };
}

/** Width and height from a PNG's IHDR chunk. */
function pngSize(png) {
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a], "not a PNG");
  assert.equal(png.toString("latin1", 12, 16), "IHDR");
  return { width: png.readUInt32BE(16), height: png.readUInt32BE(20) };
}

describe("wsbeat demo in Chromium", () => {
  const suite = browserSuite();
  let demo;
  before(async () => {
    demo = await startDemo();
  });
  after(() => demo?.child.kill("SIGKILL"));

  it("renders, shows heartbeats, pauses the backend and survives a killed connection", async () => {
    const page = await suite.browser.newPage({ viewport: VIEWPORT });
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(demo.pageUrl);
    const text = (id) => page.locator(`#${id}`).textContent();

    await page.waitForFunction(() => document.getElementById("state").textContent === "open");
    assert.equal(await text("via"), `wsbeat ${demo.proxy}`);
    // Two heartbeats: two of wsbeat's intervals, with a margin.
    await page.waitForFunction(() => Number(document.getElementById("heartbeats").textContent) >= 2, null, {
      timeout: 2 * HEARTBEAT_MS + PATIENCE_MS,
    });
    await page.waitForFunction(() => Number(document.getElementById("messages").textContent) >= 2);
    await page.waitForFunction(() => document.getElementById("rtt").textContent !== "–");
    assert.equal(await page.locator("#strip .bar").count(), Number(await text("heartbeats")));
    assert.match(await page.locator("#log").innerText(), /--heartbeat--/);
    assert.match(await page.locator("#log").innerText(), /tick \d+/);

    const png = await page.screenshot({ fullPage: false });
    const shots = path.join(REPO, "target", "browser");
    mkdirSync(shots, { recursive: true });
    writeFileSync(path.join(shots, "demo.png"), png);
    assert.deepEqual(pngSize(png), VIEWPORT);
    // A rendered page (cards, text, bars) compresses far worse than a blank one (~5 KB).
    assert.ok(png.length > 30_000, `screenshot is only ${png.length} bytes`);

    // Pause: the backend's ticks stop, wsbeat's heartbeats go on.
    await page.click("#pause");
    await page.waitForFunction(() => document.getElementById("log").innerText.includes("backend: paused"));
    const beatsAtPause = Number(await text("heartbeats"));
    await page.waitForFunction((n) => Number(document.getElementById("heartbeats").textContent) >= n + 2, beatsAtPause, {
      timeout: 2 * HEARTBEAT_MS + PATIENCE_MS,
    });
    const sincePause = await page.evaluate(() => {
      const items = [...document.querySelectorAll("#log li")].map((li) => li.innerText);
      return items.slice(0, items.findIndex((t) => t.includes("backend: paused")));
    });
    assert.ok(sincePause.length >= 2, "heartbeats are logged after the pause");
    assert.ok(!sincePause.some((t) => /tick \d+/.test(t)), `a tick after the pause: ${sincePause}`);
    assert.equal(await text("state"), "open");

    // Kill: the backend drops its TCP connection; wsbeat closes the page with 1011 and the
    // client reconnects (first attempt within its minDelay, 500 ms).
    await page.click("#kill");
    await page.waitForFunction(() => document.getElementById("log").innerText.includes("code 1011"));
    await page.waitForFunction(() => document.getElementById("reconnects").textContent === "1");
    await page.waitForFunction(() => document.getElementById("state").textContent === "open");
    await page.screenshot({ path: path.join(shots, "demo-after-kill.png") });
    assert.deepEqual(errors, []);
  });

  it("the page loaded from the backend's own port still connects through wsbeat", async (t) => {
    const page = await suite.browser.newPage({ viewport: VIEWPORT });
    t.after(() => page.close());
    await page.goto(`http://${demo.backend}/`);
    await page.waitForFunction(() => document.getElementById("state").textContent === "open");
    assert.equal(await page.locator("#via").textContent(), `wsbeat ${demo.proxy}`);
    await page.waitForFunction(() => document.getElementById("log").innerText.includes(`/demo`));
  });
});
