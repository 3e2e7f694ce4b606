// wsbeat.js's own logic under Node, with Node's `ws` as the WebSocket and a `ws` server
// that speaks the heartbeat protocol itself: fast to run, and able to look at what a
// browser hides (every send's readyState, the process's pending timers).
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { CLOSE_MISSED_HEARTBEATS, WsBeat, backoffDelay } from "../../clients/js/wsbeat.js";
import { once, waitFor } from "./lib.mjs";

const HEARTBEAT = "--heartbeat--";

/**
 * A heartbeat server: sends the heartbeat every `beatMs` (none when not given), echoes
 * everything else, and drops each connection without a close frame after `dropAfterMs`.
 */
async function heartbeatServer({ beatMs, dropAfterMs } = {}) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await once(wss, "listening", "server listening");
  const server = { wss, connections: 0, received: [], closeCodes: [] };
  wss.on("connection", (ws) => {
    server.connections += 1;
    const timers = [];
    if (beatMs) timers.push(setInterval(() => ws.send(HEARTBEAT), beatMs));
    if (dropAfterMs) timers.push(setTimeout(() => ws.terminate(), dropAfterMs));
    ws.on("close", (code) => {
      server.closeCodes.push(code);
      timers.forEach(clearTimeout);
    });
    ws.on("error", () => {});
    ws.on("message", (data) => {
      server.received.push(data.toString());
      if (data.toString() !== HEARTBEAT) ws.send(data.toString());
    });
  });
  server.url = `ws://127.0.0.1:${wss.address().port}`;
  server.close = () => {
    for (const ws of wss.clients) ws.terminate();
    return new Promise((r) => wss.close(r));
  };
  return server;
}

/** Node's `ws`, recording the readyState of every send. */
function recordingWebSocket() {
  const sends = [];
  class Recording extends WebSocket {
    send(data) {
      sends.push({ readyState: this.readyState, data: String(data) });
      super.send(data);
    }
  }
  return { Recording, sends };
}

function collect(client) {
  const events = [];
  for (const type of ["open", "message", "heartbeat", "close", "reconnect"]) {
    client.addEventListener(type, (e) => events.push({ type, ...e, data: e.data }));
  }
  return events;
}

/**
 * Records the timers that wsbeat.js itself creates (told apart by the calling frame) and
 * which of them are still pending: neither cleared nor, for a timeout, fired.
 */
function watchClientTimers(t) {
  const pending = new Set();
  const saved = { setTimeout, setInterval, clearTimeout, clearInterval };
  // Frames: Error, fromClient, our setTimeout, its caller. Only a direct call counts (ws's
  // own close timer is created under a wsbeat.js frame too).
  const fromClient = () => new Error().stack.split("\n")[3].includes("clients/js/wsbeat.js");
  globalThis.setTimeout = (fn, ms, ...args) => {
    if (!fromClient()) return saved.setTimeout(fn, ms, ...args);
    const handle = saved.setTimeout(() => {
      pending.delete(handle);
      fn(...args);
    }, ms);
    pending.add(handle);
    return handle;
  };
  globalThis.setInterval = (fn, ms, ...args) => {
    const handle = saved.setInterval(fn, ms, ...args);
    if (fromClient()) pending.add(handle);
    return handle;
  };
  globalThis.clearTimeout = globalThis.clearInterval = (handle) => {
    pending.delete(handle);
    saved.clearTimeout(handle);
  };
  t.after(() => Object.assign(globalThis, saved));
  return pending;
}

describe("wsbeat.js logic (Node, `ws`)", () => {
  it("backoff: each delay lies in [ceiling × (1 − jitter), ceiling] and never passes maxDelay", () => {
    const options = { minDelay: 100, maxDelay: 1000, jitter: 0.5 };
    const ceilings = [100, 200, 400, 800, 1000, 1000];
    ceilings.forEach((ceiling, i) => {
      assert.equal(backoffDelay(i + 1, options, () => 0), ceiling);
      assert.equal(backoffDelay(i + 1, options, () => 0.999999), ceiling * (1 - 0.5 * 0.999999));
    });
    // Far-off attempts neither overflow nor exceed the cap.
    assert.equal(backoffDelay(10_000, options, () => 0), 1000);
  });

  it("rejects nonsense options with the option's name", () => {
    assert.throws(() => new WsBeat("ws://127.0.0.1:9", { interval: 0, WebSocket }), /interval/);
    assert.throws(() => new WsBeat("ws://127.0.0.1:9", { maxMissed: 1.5, WebSocket }), /maxMissed/);
    assert.throws(() => new WsBeat("ws://127.0.0.1:9", { minDelay: 10, maxDelay: 5, WebSocket }), /maxDelay/);
    assert.throws(() => new WsBeat("ws://127.0.0.1:9", { jitter: 2, WebSocket }), /jitter/);
    assert.throws(() => new WsBeat("ws://127.0.0.1:9", { heartbeat: "", WebSocket }), /heartbeat/);
    assert.throws(() => new WsBeat("not a url", { WebSocket }));
  });

  it("heartbeats reset the count and never reach the message handler", async (t) => {
    const server = await heartbeatServer({ beatMs: 30 });
    t.after(() => server.close());
    const client = new WsBeat(server.url, { interval: 100, WebSocket });
    t.after(() => client.close());
    const events = collect(client);
    await waitFor(() => client.state === "open", "open");
    client.send("app message");
    await waitFor(() => client.stats.heartbeatsReceived >= 10 && client.stats.heartbeatsSent >= 2, "beats");
    await waitFor(() => events.some((e) => e.type === "message"), "the echo");
    client.close();
    await server.close();
    assert.deepEqual(
      events.filter((e) => e.type === "message").map((e) => e.data),
      ["app message"],
    );
    assert.ok(events.filter((e) => e.type === "heartbeat").length >= 10);
    // Heartbeats every 30 ms against a 100 ms tick: the count never got far.
    assert.ok(client.stats.missed <= 1);
    assert.deepEqual(
      events.filter((e) => e.type === "close" || e.type === "reconnect").map((e) => e.type),
      ["close"],
    );
    assert.ok(server.received.includes(HEARTBEAT));
  });

  it("without heartbeats, closes with 4000 at the maxMissed-th tick", async (t) => {
    const server = await heartbeatServer();
    t.after(() => server.close());
    const { Recording, sends } = recordingWebSocket();
    const interval = 50;
    const client = new WsBeat(server.url, { interval, maxMissed: 3, minDelay: 10_000, maxDelay: 10_000, WebSocket: Recording });
    t.after(() => client.close());
    const events = collect(client);
    await waitFor(() => events.some((e) => e.type === "close"), "the close");
    const close = events.find((e) => e.type === "close");
    assert.equal(close.code, CLOSE_MISSED_HEARTBEATS);
    assert.equal(close.willReconnect, true);
    // Two heartbeats went out (ticks 1 and 2); tick 3 closed instead.
    assert.deepEqual(
      sends.map((s) => s.data),
      [HEARTBEAT, HEARTBEAT],
    );
    await waitFor(() => server.closeCodes.length === 1, "the server to see the close");
    assert.equal(server.closeCodes[0], CLOSE_MISSED_HEARTBEATS);
    client.close();
    await server.close();
  });

  it("heartbeat timers die with their socket: no send on a socket that is not OPEN, across reconnections", async (t) => {
    // Each connection is dropped (no close frame) after 120 ms, while ticks come every
    // 20 ms and reconnection takes 0–10 ms: the ws4redis.js fault would send on a
    // CONNECTING socket here, which throws.
    const server = await heartbeatServer({ beatMs: 10, dropAfterMs: 120 });
    t.after(() => server.close());
    const { Recording, sends } = recordingWebSocket();
    const client = new WsBeat(server.url, { interval: 20, minDelay: 10, maxDelay: 10, WebSocket: Recording });
    t.after(() => client.close());
    const events = collect(client);
    await waitFor(() => client.stats.opens >= 6, "six connections", 20_000);
    client.close();
    await server.close();
    assert.ok(sends.length > 6, `only ${sends.length} heartbeats sent`);
    assert.deepEqual(
      sends.filter((s) => s.readyState !== WebSocket.OPEN),
      [],
    );
    const lost = events.filter((e) => e.type === "close" && e.willReconnect);
    assert.ok(lost.length >= 5);
    assert.deepEqual(new Set(lost.map((e) => e.code)), new Set([1006]));
    assert.equal(client.stats.reconnects, client.stats.opens - 1);
  });

  it("close() clears every timer, whether open or waiting to reconnect", async (t) => {
    const pending = watchClientTimers(t);
    const server = await heartbeatServer();
    t.after(() => server.close());
    const client = new WsBeat(server.url, { interval: 20, maxMissed: 1000, minDelay: 5_000, maxDelay: 5_000, WebSocket });
    t.after(() => client.close());
    await waitFor(() => client.stats.heartbeatsSent >= 2, "ticks");
    assert.equal(pending.size, 1, "the open socket's tick");
    client.close();
    assert.equal(client.state, "closed");
    assert.equal(pending.size, 0);
    assert.equal(client.send("x"), false);

    // A client waiting between attempts leaves nothing behind either.
    await server.close();
    const waiting = new WsBeat(server.url, { minDelay: 5_000, maxDelay: 5_000, WebSocket });
    t.after(() => waiting.close());
    await waitFor(() => waiting.state === "waiting", "the first attempt to fail");
    assert.equal(pending.size, 1, "the retry timer");
    waiting.close();
    assert.equal(pending.size, 0);
  });
});
