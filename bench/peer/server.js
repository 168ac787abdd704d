// The peer for scripts/bench.sh: Socket.IO 4 with @socket.io/redis-adapter, several
// processes sharing one Redis. Usage: node server.js PORT REDIS_URL [bridge]
// Clients emit "subscribe" CHANNEL (answered with "ack") and receive "message" events.
// The process started with "bridge" PSUBSCRIBEs gw:ch:* (what the gateway's backends publish
// to) and broadcasts each message with io.to(channel).emit, so the adapter carries it to the
// other processes, as a Socket.IO deployment would.
const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const [port, redisUrl, role] = process.argv.slice(2);

(async () => {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const http = createServer();
  const io = new Server(http, { transports: ["websocket"], serveClient: false, perMessageDeflate: false });
  io.adapter(createAdapter(pub, sub));
  io.on("connection", (socket) => {
    socket.on("subscribe", (channel) => {
      socket.join(channel);
      socket.emit("ack");
    });
  });
  if (role === "bridge") {
    const b = pub.duplicate();
    await b.connect();
    await b.pSubscribe("gw:ch:*", (message, channel) => {
      io.to(channel.slice("gw:ch:".length)).emit("message", JSON.parse(message));
    });
  }
  http.listen(Number(port), "127.0.0.1", () => console.error(`peer on ${port}`));
})();
