// A plain Node `http` server with its default keep-alive timeout (5 s): it closes a
// connection that has been idle that long, whatever the client's pool thinks.
// `/hold` is answered after 100 ms; `/block?ms=N` blocks the event loop for N ms first
// (a long GC pause or a CPU-bound handler); anything else is answered at once.
// Prints its port on the first line of stdout; exits when stdin closes.
"use strict";
const http = require("node:http");

function answer(req, res) {
  const body = `hello from node ${req.method} ${req.url}\n`;
  res.writeHead(200, {
    "content-type": "text/plain",
    "content-length": Buffer.byteLength(body),
  });
  res.end(body);
}

const server = http.createServer((req, res) => {
  req.resume();
  req.on("end", () => {
    const url = new URL(req.url, "http://node");
    if (url.pathname === "/hold") {
      setTimeout(() => answer(req, res), 100);
    } else if (url.pathname === "/block") {
      const end = Date.now() + Number(url.searchParams.get("ms"));
      while (Date.now() < end) {
        // busy: no timer, no socket is served meanwhile
      }
      answer(req, res);
    } else {
      answer(req, res);
    }
  });
});
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
process.stdin.resume();
process.stdin.on("end", () => process.exit(0));
