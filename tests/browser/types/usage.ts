// Compiled (never run) against clients/js/wsbeat.d.ts by types.test.mjs: the published
// types describe the API the README shows.
import { CLOSE_MISSED_HEARTBEATS, DEFAULTS, WsBeat, WsBeatEvent, backoffDelay } from "../../../clients/js/wsbeat.js";

const ws = new WsBeat("wss://example.com/ws/chat", {
  interval: 5000,
  maxMissed: 3,
  minDelay: 500,
  maxDelay: 30000,
  jitter: 0.5,
  proofOfLife: "heartbeat",
  protocols: ["chat"],
});
ws.onmessage = (e: WsBeatEvent) => console.log(e.data);
ws.onclose = (e) => console.log(e.code, e.reason, e.willReconnect);
ws.onopen = (e) => console.log(e.reconnected, e.roundTrip);
ws.addEventListener("reconnect", (e) => console.log(e.attempt, e.delay));
ws.addEventListener("heartbeat", (e) => console.log(e.gap));
const sent: boolean = ws.send("hello");
const state: "connecting" | "open" | "waiting" | "closed" = ws.state;
const roundTrip: number | null = ws.stats.roundTrip;
const delay: number = backoffDelay(3, DEFAULTS);
const code: 4000 = CLOSE_MISSED_HEARTBEATS;
ws.close(1000, "bye");
console.log(sent, state, roundTrip, delay, code);
