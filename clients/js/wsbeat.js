// wsbeat.js: the browser half of the ws4redis heartbeat protocol, as a dependency-free
// ES module. It wraps a WebSocket, sends the heartbeat string every `interval`, takes a
// received heartbeat as proof that the path to the server is alive (and never hands it to
// the application), gives up on a socket after `maxMissed` intervals without one, and
// reconnects with capped exponential backoff and jitter.
//
// Every timer belongs to one socket and is cleared the moment that socket is given up, so
// no heartbeat is ever sent on a socket that is not OPEN (ws4redis.js keeps its heartbeat
// interval running across `onclose`, so a tick while the next socket is CONNECTING throws
// and closes the new socket).

/**
 * @typedef {object} WsBeatOptions
 * @property {number} [interval=5000] Milliseconds between our heartbeats, and the unit in
 *   which silence is counted. Make it longer than the server's heartbeat interval (wsbeat
 *   sends one every 4 s by default).
 * @property {string} [heartbeat="--heartbeat--"] The heartbeat text, both directions.
 * @property {number} [maxMissed=3] Give the socket up after this many intervals in a row
 *   without a received heartbeat.
 * @property {"heartbeat"|"any"} [proofOfLife="heartbeat"] What resets the missed count:
 *   only a heartbeat (the ws4redis rule; right for wsbeat's default `mode: interval`), or
 *   any message (for a server in `mode: idle`, which sends heartbeats only when quiet).
 * @property {number} [minDelay=500] Ceiling of the first reconnection delay, in ms; the
 *   ceiling doubles with each failed attempt.
 * @property {number} [maxDelay=30000] Upper bound of every reconnection delay, in ms.
 * @property {number} [jitter=0.5] Fraction of each delay that is random: the delay is
 *   drawn from [ceiling × (1 − jitter), ceiling].
 * @property {number} [connectTimeout=10000] Give a connection attempt up (and retry) if it
 *   is not open after this many ms.
 * @property {string|string[]} [protocols] Subprotocols, as for `new WebSocket`.
 * @property {"blob"|"arraybuffer"} [binaryType="blob"] As `WebSocket.binaryType`.
 * @property {typeof WebSocket} [WebSocket] The WebSocket class (default: the global one;
 *   pass Node's `ws` to use the module outside a browser).
 */

/**
 * @typedef {object} WsBeatStats
 * @property {number} heartbeatsReceived Heartbeats received, all connections.
 * @property {number} heartbeatsSent Heartbeats sent, all connections.
 * @property {number} missed Intervals since the last heartbeat on this connection.
 * @property {number} opens Connections opened.
 * @property {number} reconnects Connections opened after the first.
 * @property {number} attempt Failed attempts in a row (0 once a heartbeat arrives).
 * @property {number|null} roundTrip The current connection's opening round trip in ms:
 *   from `new WebSocket` to `open`, i.e. TCP connect plus the upgrade request and its 101
 *   (through wsbeat, which dials the backend before answering). The heartbeat protocol
 *   itself has no echo (the server drops our heartbeat and sends its own on its own clock),
 *   so no per-heartbeat round trip exists to report.
 * @property {number|null} heartbeatGap Ms between the last two heartbeats received on this
 *   connection: about the server's interval while the path is healthy; larger when it
 *   stalls.
 * @property {number|null} lastHeartbeatAt Wall-clock time (`Date.now()`) of the last
 *   heartbeat received.
 */

/**
 * The options in force: every one filled in but `protocols` and `WebSocket`.
 * @typedef {Required<Omit<WsBeatOptions, "protocols" | "WebSocket">> &
 *   Pick<WsBeatOptions, "protocols" | "WebSocket">} ResolvedOptions
 */

/** @typedef {"open" | "message" | "heartbeat" | "close" | "reconnect"} WsBeatEventType */
/** @typedef {ReturnType<typeof setTimeout>} Timer */

/**
 * The defaults of every option.
 * @type {Readonly<ResolvedOptions>}
 */
export const DEFAULTS = Object.freeze({
  interval: 5000,
  heartbeat: "--heartbeat--",
  maxMissed: 3,
  proofOfLife: "heartbeat",
  minDelay: 500,
  maxDelay: 30000,
  jitter: 0.5,
  connectTimeout: 10000,
  protocols: undefined,
  binaryType: "blob",
  WebSocket: undefined,
});

/** Close code we send (and report) when we give a socket up for missed heartbeats. */
export const CLOSE_MISSED_HEARTBEATS = 4000;
/** Close code we report when a connection attempt timed out before `open`. */
export const CLOSE_CONNECT_TIMEOUT = 4001;

const OPEN = 1;

/**
 * The delay before reconnection attempt `attempt` (1 for the first): a random point in
 * [ceiling × (1 − jitter), ceiling], where ceiling = min(maxDelay, minDelay × 2^(attempt−1)).
 * Never more than `maxDelay`.
 * @param {number} attempt
 * @param {{minDelay: number, maxDelay: number, jitter: number}} options
 * @param {() => number} [random] A source of numbers in [0, 1).
 * @returns {number}
 */
export function backoffDelay(attempt, options, random = Math.random) {
  const { minDelay, maxDelay, jitter } = options;
  const doublings = Math.min(Math.max(attempt - 1, 0), 30);
  const ceiling = Math.min(maxDelay, minDelay * 2 ** doublings);
  return ceiling * (1 - jitter * random());
}

/** An event of a {@link WsBeat}: the fields given are set on the event itself. */
export class WsBeatEvent extends Event {
  /**
   * @param {string} type
   * @param {object} [fields]
   */
  constructor(type, fields = {}) {
    super(type);
    Object.assign(this, fields);
  }
}

const monotonic =
  typeof performance !== "undefined" && typeof performance.now === "function"
    ? () => performance.now()
    : () => Date.now();

/**
 * A WebSocket that keeps itself alive with ws4redis heartbeats and reconnects.
 *
 * Events (also as `onopen`, `onmessage`, … properties):
 * - `open`: a connection is open (`roundTrip`, `reconnected`).
 * - `message`: an application message (`data`); heartbeats never arrive here.
 * - `heartbeat`: a heartbeat arrived (`gap`: ms since the previous one, or null).
 * - `close`: an open connection ended (`code`, `reason`, `wasClean`, `willReconnect`).
 *   When we give a socket up ourselves (missed heartbeats, `close()`), the event comes at
 *   once, without waiting for the closing handshake a dead peer would never answer.
 * - `reconnect`: the next attempt is scheduled (`attempt`, `delay` in ms).
 */
export class WsBeat extends EventTarget {
  /** @type {((e: WsBeatEvent) => void) | null} */ onopen = null;
  /** @type {((e: WsBeatEvent) => void) | null} */ onmessage = null;
  /** @type {((e: WsBeatEvent) => void) | null} */ onheartbeat = null;
  /** @type {((e: WsBeatEvent) => void) | null} */ onclose = null;
  /** @type {((e: WsBeatEvent) => void) | null} */ onreconnect = null;

  /** @type {string} */
  #url;
  /** @type {Readonly<ResolvedOptions>} */
  #opts;
  /** @type {typeof WebSocket} */
  #WebSocket;
  /** @type {WebSocket | null} the socket of the current attempt or connection */
  #ws = null;
  #open = false;
  #closed = false;
  /** @type {Timer | undefined} the open socket's heartbeat tick */
  #tickTimer = undefined;
  /** @type {Timer | undefined} the pending attempt's deadline */
  #connectTimer = undefined;
  /** @type {Timer | undefined} the next attempt */
  #retryTimer = undefined;
  #startedAt = 0;
  /** @type {number | null} monotonic time of the last heartbeat on this connection */
  #lastBeat = null;
  /** @type {WsBeatStats} */
  #stats = {
    heartbeatsReceived: 0,
    heartbeatsSent: 0,
    missed: 0,
    opens: 0,
    reconnects: 0,
    attempt: 0,
    roundTrip: null,
    heartbeatGap: null,
    lastHeartbeatAt: null,
  };

  /**
   * Connects at once.
   * @param {string | URL} url
   * @param {WsBeatOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    this.#url = String(url);
    this.#opts = checkOptions({ ...DEFAULTS, ...options });
    this.#WebSocket = this.#opts.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("wsbeat: no WebSocket class (pass options.WebSocket)");
    }
    // A bad URL throws here, to the caller, rather than being retried forever.
    this.#connect(true);
  }

  /** The URL connected to. */
  get url() {
    return this.#url;
  }

  /** `connecting`, `open`, `waiting` (for the next attempt) or `closed` (by `close()`). */
  get state() {
    if (this.#closed) return "closed";
    if (this.#open) return "open";
    return this.#ws ? "connecting" : "waiting";
  }

  /** A snapshot of the counters and timings. @returns {WsBeatStats} */
  get stats() {
    return { ...this.#stats };
  }

  /** The options in force (defaults filled in). */
  get options() {
    return { ...this.#opts };
  }

  /**
   * Sends an application message if a connection is open; nothing is queued.
   * @param {string | ArrayBufferLike | Blob | ArrayBufferView} data
   * @returns {boolean} whether it was handed to the socket
   */
  send(data) {
    const ws = this.#ws;
    if (!this.#open || !ws || ws.readyState !== OPEN) return false;
    ws.send(data);
    return true;
  }

  /**
   * Closes for good: no more heartbeats, no reconnection, every timer cleared.
   * @param {number} [code=1000] 1000 or 3000–4999, as for `WebSocket.close`.
   * @param {string} [reason=""]
   */
  close(code = 1000, reason = "") {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#drop(code, reason);
  }

  /** @param {boolean} [first] the constructor's attempt, whose errors are the caller's */
  #connect(first = false) {
    this.#startedAt = monotonic();
    let ws;
    try {
      ws = new this.#WebSocket(this.#url, this.#opts.protocols);
    } catch (e) {
      if (first) throw e;
      this.#retry();
      return;
    }
    ws.binaryType = this.#opts.binaryType;
    ws.onopen = () => ws === this.#ws && this.#onOpen(ws);
    ws.onmessage = (e) => ws === this.#ws && this.#onMessage(e);
    ws.onclose = (e) => ws === this.#ws && this.#lost(e.code, e.reason, e.wasClean);
    // An error is always followed by `close`, which is where we act.
    ws.onerror = () => {};
    this.#ws = ws;
    this.#connectTimer = setTimeout(
      () => this.#drop(CLOSE_CONNECT_TIMEOUT, "connect timeout"),
      this.#opts.connectTimeout,
    );
  }

  /** @param {WebSocket} ws */
  #onOpen(ws) {
    clearTimeout(this.#connectTimer);
    this.#connectTimer = undefined;
    this.#open = true;
    this.#lastBeat = null;
    const s = this.#stats;
    s.missed = 0;
    s.heartbeatGap = null;
    s.roundTrip = monotonic() - this.#startedAt;
    s.opens += 1;
    const reconnected = s.opens > 1;
    if (reconnected) s.reconnects += 1;
    this.#tickTimer = setInterval(() => this.#tick(ws), this.#opts.interval);
    this.#emit("open", { roundTrip: s.roundTrip, reconnected });
  }

  /** @param {WebSocket} ws */
  #tick(ws) {
    // The interval is cleared whenever `ws` stops being the open socket; the check is a
    // second line of defence, never the first.
    if (ws !== this.#ws || ws.readyState !== OPEN) return;
    const s = this.#stats;
    s.missed += 1;
    if (s.missed >= this.#opts.maxMissed) {
      this.#drop(CLOSE_MISSED_HEARTBEATS, `no heartbeat for ${s.missed} intervals`);
      return;
    }
    ws.send(this.#opts.heartbeat);
    s.heartbeatsSent += 1;
  }

  /** @param {MessageEvent} e */
  #onMessage(e) {
    const s = this.#stats;
    if (e.data === this.#opts.heartbeat) {
      const now = monotonic();
      const gap = this.#lastBeat === null ? null : now - this.#lastBeat;
      this.#lastBeat = now;
      s.missed = 0;
      s.attempt = 0;
      s.heartbeatsReceived += 1;
      s.heartbeatGap = gap;
      s.lastHeartbeatAt = Date.now();
      this.#emit("heartbeat", { gap });
      return;
    }
    if (this.#opts.proofOfLife === "any") s.missed = 0;
    this.#emit("message", { data: e.data });
  }

  /**
   * Gives the current socket up ourselves: detach it, close it, carry on as if lost.
   * @param {number} code
   * @param {string} reason
   */
  #drop(code, reason) {
    const ws = this.#ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        // Closing a socket that is already closing or closed: nothing more to do.
      }
    }
    this.#lost(code, reason, false);
  }

  /**
   * The current socket is gone (or never opened): clear its timers, report, retry.
   * @param {number} code
   * @param {string} reason
   * @param {boolean} wasClean
   */
  #lost(code, reason, wasClean) {
    clearInterval(this.#tickTimer);
    clearTimeout(this.#connectTimer);
    this.#tickTimer = this.#connectTimer = undefined;
    this.#ws = null;
    const wasOpen = this.#open;
    this.#open = false;
    if (wasOpen) {
      this.#emit("close", { code, reason, wasClean, willReconnect: !this.#closed });
    }
    if (!this.#closed) this.#retry();
  }

  #retry() {
    // A handler may have called close(); a retry may already be scheduled.
    if (this.#closed || this.#retryTimer !== undefined) return;
    const s = this.#stats;
    s.attempt += 1;
    const delay = backoffDelay(s.attempt, this.#opts);
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = undefined;
      if (!this.#closed) this.#connect();
    }, delay);
    this.#emit("reconnect", { attempt: s.attempt, delay });
  }

  /**
   * @param {WsBeatEventType} type
   * @param {object} fields
   */
  #emit(type, fields) {
    const event = new WsBeatEvent(type, fields);
    const handler = this[/** @type {`on${WsBeatEventType}`} */ (`on${type}`)];
    if (typeof handler === "function") {
      try {
        handler.call(this, event);
      } catch (e) {
        // A throwing handler must not break the connection's bookkeeping.
        reportLater(e);
      }
    }
    this.dispatchEvent(event);
  }
}

/** @param {unknown} error */
function reportLater(error) {
  if (typeof globalThis.reportError === "function") {
    globalThis.reportError(error);
  } else {
    setTimeout(() => {
      throw error;
    });
  }
}

/**
 * @param {ResolvedOptions} o
 * @returns {Readonly<ResolvedOptions>}
 */
function checkOptions(o) {
  /** @param {"interval" | "connectTimeout"} name */
  const positive = (name) => {
    if (!(Number.isFinite(o[name]) && o[name] > 0)) {
      throw new RangeError(`wsbeat: ${name} must be a positive number of ms, not ${o[name]}`);
    }
  };
  positive("interval");
  positive("connectTimeout");
  if (!(Number.isInteger(o.maxMissed) && o.maxMissed >= 1)) {
    throw new RangeError(`wsbeat: maxMissed must be an integer >= 1, not ${o.maxMissed}`);
  }
  if (!(Number.isFinite(o.minDelay) && o.minDelay >= 0)) {
    throw new RangeError(`wsbeat: minDelay must be >= 0, not ${o.minDelay}`);
  }
  if (!(Number.isFinite(o.maxDelay) && o.maxDelay >= o.minDelay)) {
    throw new RangeError(`wsbeat: maxDelay must be >= minDelay, not ${o.maxDelay}`);
  }
  if (!(o.jitter >= 0 && o.jitter <= 1)) {
    throw new RangeError(`wsbeat: jitter must be in [0, 1], not ${o.jitter}`);
  }
  if (typeof o.heartbeat !== "string" || o.heartbeat === "") {
    throw new TypeError("wsbeat: heartbeat must be a non-empty string");
  }
  if (o.proofOfLife !== "heartbeat" && o.proofOfLife !== "any") {
    throw new RangeError(`wsbeat: proofOfLife must be "heartbeat" or "any", not ${o.proofOfLife}`);
  }
  return Object.freeze(o);
}
