'use strict'
// What holder stacks cost (lib/stacks.js): CPU per acquire+release pair of a
// pg.Pool whose clients are fakes (no I/O, no database), with the adapter
// sending to a Unix socket this process listens on, the way the pairs mode
// of pool_bench.js loops (the event loop turns every 64 pairs). Run it with
// POOLSCOPE_ADAPTER_STACKS=off and without, a few times each, alternating:
//
//   for i in 1 2 3; do for s in on off; do
//     POOLSCOPE_ADAPTER_STACKS=$s node bench/stack_cost.js; done; done
//
// With the default capture interval (1 ms, POOLSCOPE_ADAPTER_STACK_INTERVAL_US)
// a loop this fast captures at one checkout in a few hundred; set
// POOLSCOPE_ADAPTER_STACK_INTERVAL_US=0 to measure a capture at every one.
//
// N pairs measured (after 100,000 of warm-up); DEPTH more synchronous
// frames between the loop and the acquire (0: the acquire is the loop's
// own, an async function resumed by the microtask queue); ADAPTER=off
// leaves the pool uninstrumented; PREPARE=1 installs an application's
// Error.prepareStackTrace first. Prints one JSON line.

const fs = require('node:fs')
const net = require('node:net')
const os = require('node:os')
const path = require('node:path')
const { EventEmitter } = require('node:events')
const { Pool } = require('pg')
const adapter = require('../lib/index')
const { stackIntervalFromEnv } = require('../lib/stacks')

const N = Number(process.env.N || 300000)
const DEPTH = Number(process.env.DEPTH || 0)
const ADAPTER = process.env.ADAPTER !== 'off'
const PREPARE = process.env.PREPARE === '1'
if (PREPARE) Error.prepareStackTrace = (err, sites) => `${err}: ${sites.length} frames`

let nextPort = 40000
/** Enough of pg.Client for pg-pool, with a socket the adapter can name. */
class FakeClient extends EventEmitter {
  constructor() {
    super()
    this._queryable = true
    this._ending = false
    this.connection = { stream: { localAddress: '127.0.0.1', localPort: nextPort++, _handle: { fd: 100 + nextPort - 40000 } } }
  }

  connect(cb) {
    setImmediate(() => cb())
  }

  query(text, values, cb) {
    setImmediate(() => cb(undefined, { rows: [] }))
  }

  end(cb) {
    if (cb) setImmediate(cb)
  }

  ref() {}
  unref() {}
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'poolscope-stack-cost-'))
  const socketPath = path.join(dir, 'adapter-stream.sock')
  const server = net.createServer((s) => {
    s.on('data', () => {})
    s.on('error', () => {})
  })
  await new Promise((resolve) => server.listen(socketPath, resolve))
  const pool = new Pool({ max: 4, Client: FakeClient })
  if (ADAPTER) adapter.instrument(pool, { name: 'stack-cost', socketPath })
  ;(await pool.connect()).release()
  while (ADAPTER && !adapter.stats(pool).connected) await new Promise((resolve) => setTimeout(resolve, 5))
  const deeper = (n, f) => (n === 0 ? f() : deeper(n - 1, f))
  const acquire = () => pool.connect()
  async function pairs(n) {
    for (let i = 0; i < n; i++) {
      const client = await (DEPTH > 0 ? deeper(DEPTH, acquire) : pool.connect())
      client.release()
      if ((i & 63) === 63) await new Promise((resolve) => setImmediate(resolve))
    }
  }
  await pairs(100000)
  const none = { sent: 0, dropped: 0 }
  const s0 = ADAPTER ? adapter.stats(pool) : none
  const cpu0 = process.cpuUsage()
  await pairs(N)
  const cpu = process.cpuUsage(cpu0)
  const s1 = ADAPTER ? adapter.stats(pool) : none
  const stacks = ADAPTER ? !/^\s*(off|0|false)\s*$/i.test(process.env.POOLSCOPE_ADAPTER_STACKS || '') : false
  process.stdout.write(
    `${JSON.stringify({
      adapter: ADAPTER,
      stacks,
      prepare: PREPARE,
      depth: DEPTH,
      stack_interval_us: stackIntervalFromEnv(),
      ns_per_pair: Math.round(((cpu.user + cpu.system) * 1000) / N),
      sent: s1.sent - s0.sent,
      dropped: s1.dropped - s0.dropped,
    })}\n`
  )
  server.close()
  fs.rmSync(dir, { recursive: true, force: true })
  process.exit(0)
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : err}\n`)
  process.exit(1)
})
