// Shared pieces of the browser tests: wsbeat as a child process, Node `ws` backends, a
// static server for the pages, and Debian's Chromium driven by playwright-core.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";
import { after, before } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";
import { WebSocketServer } from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(here, "../..");
export const CLIENT_JS = path.join(REPO, "clients/js/wsbeat.js");

/** The wsbeat binary: `WSBEAT_BIN` (cargo test sets it), else the debug build. */
export function wsbeatBin() {
  const bin = process.env.WSBEAT_BIN ?? path.join(REPO, "target/debug/wsbeat");
  if (!existsSync(bin)) {
    throw new Error(`wsbeat binary not found at ${bin}: run via \`cargo test --test browser\``);
  }
  return bin;
}

/** Generous bound for anything that should happen "soon" on a loaded 2-core machine. */
export const PATIENCE_MS = 10_000;

/**
 * Polls `probe` until it returns a truthy value, or throws after `timeoutMs`.
 * @template T
 * @param {() => T | Promise<T>} probe
 * @param {string} what
 * @returns {Promise<T>}
 */
export async function waitFor(probe, what, timeoutMs = PATIENCE_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resolves when `emitter` emits `event`, rejects after `timeoutMs`. */
export function once(emitter, event, what, timeoutMs = PATIENCE_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)),
      timeoutMs,
    );
    emitter.once(event, (...args) => {
      clearTimeout(timer);
      resolve(args);
    });
  });
}

/**
 * A Node `ws` backend that echoes, and sends `tick N` every `tickMs` when given (the busy
 * backend). It knows nothing of heartbeats and records what it receives, and any error
 * on its sockets (an inflate that fails, for one). With `deflate` it negotiates
 * permessage-deflate and compresses every message it sends, however short.
 * @param {{tickMs?: number, port?: number, deflate?: boolean}} [options]
 */
export async function startBackend({ tickMs, port = 0, deflate = false } = {}) {
  const perMessageDeflate = deflate ? { threshold: 0 } : false;
  const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate });
  await once(wss, "listening", "backend listening");
  const backend = {
    port: wss.address().port,
    received: [],
    /** Errors on its sockets, as messages. */
    errors: [],
    /** The `Sec-WebSocket-Extensions` of each handshake it got. */
    offers: [],
    connections: 0,
    wss,
    get url() {
      return `ws://127.0.0.1:${this.port}`;
    },
    /** Stops listening and drops every connection without a close frame. */
    async kill() {
      for (const ws of wss.clients) ws.terminate();
      await new Promise((r) => wss.close(r));
    },
  };
  wss.on("connection", (ws, req) => {
    backend.connections += 1;
    backend.offers.push(req.headers["sec-websocket-extensions"] ?? null);
    let n = 0;
    const timer = tickMs ? setInterval(() => ws.send(`tick ${++n}`), tickMs) : null;
    ws.on("close", () => clearInterval(timer));
    ws.on("error", (e) => backend.errors.push(String(e?.message ?? e)));
    ws.on("message", (data, isBinary) => {
      const text = isBinary ? data : data.toString();
      backend.received.push(text);
      ws.send(text, { binary: isBinary });
    });
  });
  return backend;
}

/**
 * Runs wsbeat in front of `upstream` with the given heartbeat settings, admin off, on
 * 127.0.0.1:0; resolves once it logs the address it listens on.
 * @param {{upstream: string, interval?: string, mode?: "interval"|"idle", extra?: string, admin?: boolean}} o
 */
export async function startWsbeat({
  upstream,
  interval = "4s",
  mode = "interval",
  extra = "",
  admin = false,
}) {
  const dir = mkdtempSync(path.join(tmpdir(), "wsbeat-browser-"));
  const config = path.join(dir, "wsbeat.yaml");
  writeFileSync(
    config,
    `upstream:\n  url: ${upstream}\nheartbeat:\n  interval: ${interval}\n  mode: ${mode}\n${extra}`,
  );
  const child = spawn(
    wsbeatBin(),
    [
      "--config",
      config,
      "--listen",
      "127.0.0.1:0",
      "--admin-listen",
      admin ? "127.0.0.1:0" : "off",
      "--log-format",
      "json",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const lines = readline.createInterface({ input: child.stderr });
  const log = [];
  let adminAddr = null;
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("wsbeat did not log `listening`")), PATIENCE_MS);
    let listening = null;
    child.once("exit", (code) => reject(new Error(`wsbeat exited early (${code}): ${log.join("\n")}`)));
    lines.on("line", (line) => {
      log.push(line);
      let record;
      try {
        record = JSON.parse(line);
      } catch {
        reject(new Error(`wsbeat logged a line that is not JSON: ${line}`));
        return;
      }
      if (record.message === "listening") listening = record.addr;
      if (record.message === "admin listening") adminAddr = record.addr;
      if (listening && (!admin || adminAddr)) {
        clearTimeout(timer);
        resolve(listening);
      }
    });
  });
  return {
    addr,
    /** The admin listener's address, with `admin: true`. */
    admin: adminAddr,
    url: `ws://${addr}`,
    pid: child.pid,
    log,
    /** SIGSTOP / SIGCONT: freeze and thaw the whole process. */
    signal(name) {
      child.kill(name);
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGCONT");
        child.kill("SIGKILL");
        await once(child, "exit", "wsbeat to exit");
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Serves the test pages (tests/browser/pages) and the client module at /wsbeat.js on
 * 127.0.0.1:0.
 */
export async function startPageServer() {
  const pages = path.join(here, "pages");
  const server = http.createServer((req, res) => {
    const name = new URL(req.url, "http://x").pathname;
    const file = name === "/wsbeat.js" ? CLIENT_JS : path.join(pages, path.basename(name));
    if (!existsSync(file)) {
      res.writeHead(404).end();
      return;
    }
    const type = file.endsWith(".js") ? "text/javascript" : "text/html; charset=utf-8";
    res.writeHead(200, { "content-type": type, "cache-control": "no-store" });
    res.end(readFileSync(file));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening", "page server listening");
  return {
    url: (page) => `http://127.0.0.1:${server.address().port}/${page}`,
    close: () => new Promise((r) => server.close(r)),
  };
}

/**
 * Headless Debian Chromium with a fresh profile (playwright makes a temporary one).
 * @param {string[]} [extraArgs] more command-line flags
 */
export async function launchChromium(extraArgs = []) {
  const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
  if (!existsSync(executablePath)) {
    throw new Error(`${executablePath} not found: run tests/browser/ci-deps.sh`);
  }
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      // Background pages' timers must not be throttled: the tests run several at once.
      "--disable-background-timer-throttling",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
      ...extraArgs,
    ],
  });
}

/**
 * For a `describe` block: Chromium and the page server, started before its tests and
 * stopped after them. The returned object's fields are set once `before` has run.
 * @returns {{browser: import("playwright-core").Browser, pages: Awaited<ReturnType<typeof startPageServer>>}}
 */
export function browserSuite() {
  const suite = /** @type {any} */ ({});
  before(async () => {
    suite.browser = await launchChromium();
    suite.pages = await startPageServer();
  });
  after(async () => {
    await suite.browser?.close();
    await suite.pages?.close();
  });
  return suite;
}
