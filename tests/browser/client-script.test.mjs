// `client_script`: wsbeat serves its own browser client, and a page in Chromium imports it
// from wsbeat's port as an ES module (which a browser refuses unless the type is
// JavaScript and, from another origin, CORS allows it), then uses it through that wsbeat.
// Without the setting, the same path goes to the backend like any other request.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { browserSuite, startBackend, startWsbeat } from "./lib.mjs";

const SCRIPT = "/_wsbeat.js";

describe("client_script in Chromium", { concurrency: true }, () => {
  const suite = browserSuite();

  /** A page on the page server's origin: wsbeat's port is another origin. */
  async function blankPage(t) {
    const page = await suite.browser.newPage();
    await page.goto(suite.pages.url("blank.html"));
    t.after(() => page.close());
    return page;
  }

  it("a page imports the client from wsbeat and hears its heartbeats", async (t) => {
    const backend = await startBackend();
    const wsbeat = await startWsbeat({
      upstream: backend.url,
      interval: "200ms",
      extra: `client_script: ${SCRIPT}\n`,
    });
    t.after(() => wsbeat.stop());
    t.after(() => backend.kill());
    const page = await blankPage(t);
    const result = await page.evaluate(
      async ([script, url]) => {
        const { WsBeat } = await import(script);
        return new Promise((resolve) => {
          const client = new WsBeat(url, { interval: 400 });
          const seen = [];
          client.addEventListener("message", (e) => seen.push(e.data));
          client.addEventListener("open", () => client.send("through the served client"));
          client.addEventListener("heartbeat", () => {
            if (seen.length === 0) return;
            client.close();
            resolve({ seen, stats: client.stats });
          });
        });
      },
      [`http://${wsbeat.addr}${SCRIPT}`, `${wsbeat.url}/`],
    );
    assert.deepEqual(result.seen, ["through the served client"]);
    assert.ok(result.stats.heartbeatsReceived >= 1, JSON.stringify(result.stats));
  });

  it("without the setting the path is the backend's, and the import fails", async (t) => {
    const backend = await startBackend();
    const wsbeat = await startWsbeat({ upstream: backend.url });
    t.after(() => wsbeat.stop());
    t.after(() => backend.kill());
    const page = await blankPage(t);
    const error = await page.evaluate(
      (script) => import(script).then(() => "imported", (e) => String(e)),
      `http://${wsbeat.addr}${SCRIPT}`,
    );
    assert.notEqual(error, "imported");
  });
});
