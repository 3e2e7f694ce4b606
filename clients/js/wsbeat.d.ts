// Types for wsbeat.js: the browser half of the ws4redis heartbeat protocol.

export interface WsBeatOptions {
  /** Milliseconds between our heartbeats, and the unit in which silence is counted (5000). */
  interval?: number;
  /** The heartbeat text, both directions ("--heartbeat--"). */
  heartbeat?: string;
  /** Give the socket up after this many intervals in a row without a heartbeat (3). */
  maxMissed?: number;
  /** What resets the missed count: only a heartbeat ("heartbeat"), or any message ("any"). */
  proofOfLife?: "heartbeat" | "any";
  /** Ceiling of the first reconnection delay in ms; doubles per failed attempt (500). */
  minDelay?: number;
  /** Upper bound of every reconnection delay in ms (30000). */
  maxDelay?: number;
  /** Fraction of each delay that is random, in [0, 1] (0.5). */
  jitter?: number;
  /** Give a connection attempt up if it is not open after this many ms (10000). */
  connectTimeout?: number;
  /** Subprotocols, as for `new WebSocket`. */
  protocols?: string | string[];
  /** As `WebSocket.binaryType` ("blob"). */
  binaryType?: "blob" | "arraybuffer";
  /** The WebSocket class; default: the global one. */
  WebSocket?: typeof WebSocket;
}

export interface WsBeatStats {
  heartbeatsReceived: number;
  heartbeatsSent: number;
  /** Intervals since the last heartbeat on this connection. */
  missed: number;
  opens: number;
  /** Connections opened after the first. */
  reconnects: number;
  /** Failed attempts in a row (0 once a heartbeat arrives). */
  attempt: number;
  /**
   * The current connection's opening round trip in ms (new WebSocket → open: TCP connect,
   * upgrade request, 101). The heartbeat protocol has no echo, so there is no per-heartbeat
   * round trip.
   */
  roundTrip: number | null;
  /** Ms between the last two heartbeats received on this connection. */
  heartbeatGap: number | null;
  /** `Date.now()` of the last heartbeat received. */
  lastHeartbeatAt: number | null;
}

export class WsBeatEvent extends Event {
  constructor(type: string, fields?: object);
  /** `message`: the application message. */
  readonly data?: string | ArrayBuffer | Blob;
  /** `close`: the close code (4000: missed heartbeats, given up by us). */
  readonly code?: number;
  readonly reason?: string;
  readonly wasClean?: boolean;
  readonly willReconnect?: boolean;
  /** `open`: the opening round trip in ms; whether this is a reconnection. */
  readonly roundTrip?: number;
  readonly reconnected?: boolean;
  /** `heartbeat`: ms since the previous heartbeat on this connection, or null. */
  readonly gap?: number | null;
  /** `reconnect`: the attempt number (1 = first) and its delay in ms. */
  readonly attempt?: number;
  readonly delay?: number;
}

export interface WsBeatEventMap {
  open: WsBeatEvent;
  message: WsBeatEvent;
  heartbeat: WsBeatEvent;
  close: WsBeatEvent;
  reconnect: WsBeatEvent;
}

export const DEFAULTS: Readonly<Required<Omit<WsBeatOptions, "protocols" | "WebSocket">>> &
  Readonly<Pick<WsBeatOptions, "protocols" | "WebSocket">>;
export const CLOSE_MISSED_HEARTBEATS: 4000;
export const CLOSE_CONNECT_TIMEOUT: 4001;

/** The delay before attempt `attempt` (1 = first): never more than `maxDelay`. */
export function backoffDelay(
  attempt: number,
  options: { minDelay: number; maxDelay: number; jitter: number },
  random?: () => number,
): number;

export class WsBeat extends EventTarget {
  constructor(url: string | URL, options?: WsBeatOptions);
  readonly url: string;
  readonly state: "connecting" | "open" | "waiting" | "closed";
  readonly stats: WsBeatStats;
  readonly options: Readonly<WsBeatOptions>;
  onopen: ((event: WsBeatEvent) => void) | null;
  onmessage: ((event: WsBeatEvent) => void) | null;
  onheartbeat: ((event: WsBeatEvent) => void) | null;
  onclose: ((event: WsBeatEvent) => void) | null;
  onreconnect: ((event: WsBeatEvent) => void) | null;
  /** Sends if a connection is open; returns whether it did. Nothing is queued. */
  send(data: string | ArrayBufferLike | Blob | ArrayBufferView): boolean;
  /** Closes for good: no heartbeats, no reconnection, every timer cleared. */
  close(code?: number, reason?: string): void;
  addEventListener<K extends keyof WsBeatEventMap>(
    type: K,
    listener: (event: WsBeatEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
}
