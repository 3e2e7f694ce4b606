// Chromium against a TLS wsbeat with `http2: true` (issue 20): the page comes through
// wsbeat over HTTP/2, and the ws4redis snippet's WebSocket, if Chromium speaks RFC 8441,
// rides the page's own connection as an extended CONNECT stream. wsbeat's
// `wsbeat_client_http_connections_active{version}` says which it was: the test fails,
// saying so, if Chromium opened an HTTP/1.1 connection for the socket. Heartbeats arrive
// and the snippet stays connected for 30 s.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";

import { WebSocketServer } from "ws";

import { PATIENCE_MS, launchChromium, once, startWsbeat } from "./lib.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const HOLD_MS = 30_000;
const WSBEAT_INTERVAL_MS = 4_000;

/** A self-signed certificate for 127.0.0.1 and localhost, made with openssl. */
function certificate(dir) {
  const cert = path.join(dir, "tls.crt");
  const key = path.join(dir, "tls.key");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
  ], { stdio: "ignore" });
  return { cert, key };
}

/** One backend port for the page (plain HTTP) and the WebSocket (an echo). */
async function pageAndSocketBackend() {
  const page = readFileSync(path.join(here, "pages/ws4redis.html"));
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(page);
  });
  const wss = new WebSocketServer({ server });
  wss.on("connection", (ws) => ws.on("message", (data, binary) => ws.send(data, { binary })));
  server.listen(0, "127.0.0.1");
  await once(server, "listening", "backend listening");
  return {
    url: `ws://127.0.0.1:${/** @type {import("node:net").AddressInfo} */ (server.address()).port}`,
    close: () => {
      for (const ws of wss.clients) ws.terminate();
      return new Promise((r) => server.close(r));
    },
  };
}

/** `wsbeat_client_http_connections_active{version}` from the admin listener. */
async function connectionsByVersion(admin) {
  const text = await new Promise((resolve, reject) => {
    http
      .get(`http://${admin}/metrics`, (res) => {
        let body = "";
        res.on("data", (chunk) => (body += chunk));
        res.on("end", () => resolve(body));
      })
      .on("error", reject);
  });
  const value = (version) => {
    const line = text
      .split("\n")
      .find((l) => l.startsWith(`wsbeat_client_http_connections_active{version="${version}"} `));
    assert.ok(line, `no series for version ${version}`);
    return Number(line.split(" ")[1]);
  };
  return { h1: value("1.1"), h2: value("2") };
}

describe("Chromium and wsbeat over HTTP/2", () => {
  const cleanup = [];
  /** @type {import("playwright-core").Browser} */
  let browser;
  before(async () => {
    browser = await launchChromium(["--ignore-certificate-errors"]);
  });
  after(async () => {
    await browser?.close();
    for (const stop of cleanup) await stop();
  });

  it("the page and its WebSocket share one HTTP/2 connection; heartbeats for 30 s", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "wsbeat-h2-"));
    cleanup.push(async () => rmSync(dir, { recursive: true, force: true }));
    const { cert, key } = certificate(dir);
    const backend = await pageAndSocketBackend();
    cleanup.push(() => backend.close());
    const wsbeat = await startWsbeat({
      upstream: backend.url,
      interval: "4s",
      admin: true,
      extra: `http2: true\ntls:\n  cert: ${cert}\n  key: ${key}\n`,
    });
    cleanup.push(() => wsbeat.stop());
    const page = await browser.newPage();
    const origin = `https://${wsbeat.addr}`;
    await page.goto(`${origin}/ws4redis.html?ws=${encodeURIComponent(`wss://${wsbeat.addr}/`)}`);
    const protocol = await page.evaluate(
      () => /** @type {PerformanceNavigationTiming} */ (performance.getEntriesByType("navigation")[0]).nextHopProtocol,
    );
    assert.equal(protocol, "h2", "the page did not come over HTTP/2");
    await page.waitForFunction(() => window.record.opened !== null, null, { timeout: PATIENCE_MS });
    const open = await connectionsByVersion(wsbeat.admin);
    assert.equal(
      open.h1,
      0,
      "this Chromium does not use RFC 8441: it opened an HTTP/1.1 connection for the WebSocket",
    );
    assert.equal(open.h2, 1, "the page and the WebSocket are not on one HTTP/2 connection");
    await page.waitForFunction(
      (hold) => window.record.closed !== null || performance.now() - window.record.opened >= hold,
      HOLD_MS,
      { timeout: HOLD_MS + PATIENCE_MS, polling: 100 },
    );
    const record = await page.evaluate(() => window.record);
    assert.equal(record.closed, null, "the snippet closed the connection");
    const minHeartbeats = Math.floor(HOLD_MS / WSBEAT_INTERVAL_MS) - 1;
    assert.ok(record.heartbeats >= minHeartbeats, `${record.heartbeats} heartbeats in 30 s`);
    // Still the one connection.
    assert.deepEqual(await connectionsByVersion(wsbeat.admin), { h1: 0, h2: 1 });
  });
});
