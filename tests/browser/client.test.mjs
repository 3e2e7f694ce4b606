// wsbeat.js in Chromium, through a real wsbeat: the application sees only its own
// messages; it reconnects within its backoff bound after the backend restarts; and when
// wsbeat freezes (SIGSTOP) it gives the socket up after `maxMissed` intervals and comes
// back after SIGCONT. Short intervals: wsbeat beats every 200 ms, the client ticks every
// 400 ms.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { PATIENCE_MS, browserSuite, startBackend, startWsbeat } from "./lib.mjs";

const WSBEAT_INTERVAL = "200ms";
const CLIENT = { interval: 400, maxMissed: 3, minDelay: 100, maxDelay: 1000, jitter: 0.5, connectTimeout: 2000 };

describe("wsbeat.js in Chromium", { concurrency: true }, () => {
  const suite = browserSuite();

  /**
   * A page with `track()` loaded. Uncaught exceptions are kept (a heartbeat sent on a
   * CONNECTING socket throws); the browser's own console errors for refused handshakes
   * are expected and not.
   */
  async function clientPage(t) {
    const page = await suite.browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(suite.pages.url("client.html"));
    await page.waitForFunction(() => window.ready === true);
    t.after(() => page.close());
    return { page, errors };
  }

  /**
   * A backend, wsbeat (200 ms heartbeats) in front of it, and a page tracking a WsBeat
   * through it. `setup.backend` is the one stopped at the end (a test may replace it).
   */
  async function through(t, backendOptions) {
    const setup = { backend: await startBackend(backendOptions) };
    setup.wsbeat = await startWsbeat({ upstream: setup.backend.url, interval: WSBEAT_INTERVAL });
    t.after(() => setup.wsbeat.stop());
    t.after(() => setup.backend.kill());
    Object.assign(setup, await clientPage(t));
    await setup.page.evaluate(([u, o]) => window.track(u, o), [`${setup.wsbeat.url}/`, CLIENT]);
    return setup;
  }
  const events = (page, type) => page.evaluate((ty) => window.events.filter((e) => e.type === ty), type);
  const countOf = (page, type, n, timeout = PATIENCE_MS) =>
    page.waitForFunction(([ty, k]) => window.events.filter((e) => e.type === ty).length >= k, [type, n], {
      timeout,
    });

  it("the application sees only its own messages, never a heartbeat", async (t) => {
    const { backend, page, errors } = await through(t, { tickMs: 50 });
    await countOf(page, "open", 1);
    await page.evaluate(() => window.client.send("hello from the app"));
    await countOf(page, "heartbeat", 5);
    await page.waitForFunction(() => window.events.some((e) => e.data === "hello from the app"));
    const stats = await page.evaluate(() => {
      window.client.close();
      return window.client.stats;
    });
    const messages = (await events(page, "message")).map((e) => e.data);
    assert.ok(!messages.includes("--heartbeat--"), "a heartbeat reached the message handler");
    // Every message is the backend's: its ticks, in order and none lost, and our echo.
    const ticks = messages.filter((m) => m !== "hello from the app");
    assert.deepEqual(
      ticks,
      ticks.map((_, i) => `tick ${i + 1}`),
    );
    assert.equal(messages.length, ticks.length + 1);
    // Our heartbeats went out and wsbeat dropped them: the backend saw only the app's text.
    assert.ok(stats.heartbeatsSent > 0);
    assert.deepEqual(backend.received, ["hello from the app"]);
    assert.ok(stats.heartbeatsReceived >= 5);
    assert.deepEqual(errors, []);
  });

  it("reconnects within the backoff bound after the backend restarts", async (t) => {
    const setup = await through(t);
    const { page, errors } = setup;
    const port = setup.backend.port;
    await countOf(page, "heartbeat", 1);

    await setup.backend.kill();
    // wsbeat reports the lost backend with 1011; every attempt while it is down gets 502.
    await countOf(page, "close", 1);
    const [closed] = await events(page, "close");
    assert.equal(closed.code, 1011);
    assert.equal(closed.willReconnect, true);
    // Let the backoff reach its cap before the backend comes back.
    const capped = Math.ceil(Math.log2(CLIENT.maxDelay / CLIENT.minDelay)) + 2;
    await countOf(page, "reconnect", capped, PATIENCE_MS * 2);

    setup.backend = await startBackend({ port });
    const restarted = Date.now();
    await countOf(page, "open", 2, CLIENT.maxDelay + PATIENCE_MS);
    const took = Date.now() - restarted;
    // The next attempt is at most maxDelay away; the margin covers the handshake through
    // wsbeat and a loaded machine.
    const margin = 3000;
    assert.ok(took <= CLIENT.maxDelay + margin, `reconnected ${took} ms after the backend restarted`);

    // Each delay lies in [ceiling × (1 − jitter), ceiling], ceiling = min(max, min × 2^(n−1)).
    for (const { attempt, delay } of await events(page, "reconnect")) {
      const ceiling = Math.min(CLIENT.maxDelay, CLIENT.minDelay * 2 ** (attempt - 1));
      assert.ok(delay <= ceiling && delay >= ceiling * (1 - CLIENT.jitter), `attempt ${attempt}: ${delay} ms`);
    }
    await page.evaluate(() => window.client.send("after the restart"));
    await page.waitForFunction(() => window.events.some((e) => e.data === "after the restart"));
    await page.evaluate(() => window.client.close());
    assert.deepEqual(errors, []);
  });

  it("gives the socket up after maxMissed intervals when wsbeat freezes, and recovers after SIGCONT", async (t) => {
    const { wsbeat, page, errors } = await through(t);
    await countOf(page, "heartbeat", 2);

    const frozenAt = await page.evaluate(() => performance.now());
    wsbeat.signal("SIGSTOP");
    const deadline = CLIENT.maxMissed * CLIENT.interval;
    const margin = 3000;
    await countOf(page, "close", 1, deadline + margin);
    const [closed] = await events(page, "close");
    assert.equal(closed.code, 4000, `closed by ${closed.code} ${closed.reason}`);
    assert.ok(closed.at - frozenAt <= deadline + margin, `closed ${closed.at - frozenAt} ms after the freeze`);
    assert.equal(closed.willReconnect, true);

    wsbeat.signal("SIGCONT");
    // The attempt pending at SIGCONT completes, or the next one does: connectTimeout and
    // one maxDelay at most.
    await countOf(page, "open", 2, CLIENT.connectTimeout + CLIENT.maxDelay + PATIENCE_MS);
    const heartbeatsBefore = (await events(page, "heartbeat")).length;
    await countOf(page, "heartbeat", heartbeatsBefore + 2);
    await page.evaluate(() => window.client.send("after the thaw"));
    await page.waitForFunction(() => window.events.some((e) => e.data === "after the thaw"));
    await page.evaluate(() => window.client.close());
    assert.deepEqual(errors, []);
  });
});
