// A node-postgres (`pg`) client driven by one JSON request per line on
// stdin, one JSON answer line each ({"ok": true, ...} or {"ok": false,
// "error": "..."}). Run with NODE_PATH=adapters/node/node_modules (where
// `cargo xtask setup` installs pg). Its first line says it is ready, with
// its pid. It holds at most one client, so that the test knows the socket.
//
//   {"op": "connect", "port": P, "tls": true}
//       a pg.Client to postgres@127.0.0.1:P; with tls, `ssl:
//       {rejectUnauthorized: false}` (TLS, the certificate not verified)
//       -> {"local_port": PORT}
//   {"op": "sql", "sql": "..."}  one statement (simple query) -> {"rows": [...]}
//   {"op": "close"}

"use strict";

const readline = require("readline");
const { Client } = require("pg");

let client = null;

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

async function handle(req) {
  switch (req.op) {
    case "connect": {
      const c = new Client({
        host: "127.0.0.1",
        port: Number(req.port),
        user: "postgres",
        database: "postgres",
        ssl: req.tls ? { rejectUnauthorized: false } : false,
      });
      await c.connect();
      client = c;
      // pg keeps the TCP socket under the TLS one.
      const socket = c.connection.stream;
      const tcp = socket.localPort !== undefined ? socket : socket._parent;
      return { local_port: tcp.localPort, encrypted: Boolean(socket.encrypted) };
    }
    case "sql": {
      const result = await client.query(req.sql);
      return { rows: result.rows.map((r) => Object.values(r)) };
    }
    case "close":
      if (client) {
        await client.end();
        client = null;
      }
      return {};
    default:
      throw new Error("unknown op " + JSON.stringify(req.op));
  }
}

async function main() {
  reply({ ok: true, pid: process.pid });
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let answer;
    try {
      answer = await handle(JSON.parse(line));
      answer.ok = true;
    } catch (e) {
      answer = { ok: false, error: String(e && e.stack ? e.stack : e) };
    }
    reply(answer);
  }
  process.exit(0);
}

main();
