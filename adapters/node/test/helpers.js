'use strict'
// A listening Unix stream socket in a temp dir, as the agent binds it, and
// the golden shapes that every message the adapter sends must have.

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const net = require('node:net')
const { senderFor } = require('../lib/sender')

// The golden messages (adapters/protocol/golden/, one file per kind): every
// message the adapter sends must have the shape of that kind's examples.
const GOLDEN_DIR = path.join(__dirname, '..', '..', 'protocol', 'golden')

function jsonType(value) {
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'array'
  if (typeof value === 'number') return Number.isInteger(value) ? 'integer' : 'number'
  return typeof value // string, boolean, object
}

/**
 * What examples (JSON objects) have: each key's JSON types, the keys all
 * of them have, and for lists of objects the shape of their items.
 */
function shapeOf(examples) {
  const values = new Map()
  for (const e of examples) {
    for (const [k, v] of Object.entries(e)) values.set(k, [...(values.get(k) || []), v])
  }
  const types = new Map([...values].map(([k, vs]) => [k, new Set(vs.map(jsonType))]))
  const required = Object.keys(examples[0] || {}).filter((k) => examples.every((e) => k in e))
  // Lists: of objects, their items' shape; of anything else (a stack's
  // frames), their items' JSON types.
  const items = new Map()
  for (const [k, vs] of values) {
    const listed = vs.filter(Array.isArray).flat()
    if (listed.length === 0) continue
    const objects = listed.every((x) => jsonType(x) === 'object')
    items.set(k, objects ? shapeOf(listed) : { itemTypes: new Set(listed.map(jsonType)) })
  }
  return { types, required, items }
}

const GOLDEN = (() => {
  const byKind = new Map()
  for (const name of fs.readdirSync(GOLDEN_DIR).sort()) {
    if (!name.endsWith('.json')) continue
    for (const m of JSON.parse(fs.readFileSync(path.join(GOLDEN_DIR, name), 'utf8')).valid) {
      byKind.set(m.kind, [...(byKind.get(m.kind) || []), m])
    }
  }
  return new Map([...byKind].map(([kind, examples]) => [kind, shapeOf(examples)]))
})()

/** Kinds whose messages were checked against the golden shapes, in this process. */
const checkedKinds = new Set()

/**
 * Asserts that `m` has the golden shape of its kind: only keys the examples
 * have, each with a JSON type they give it, and every key all of them have.
 * Values (times, fds, addresses) are compared by type only.
 */
function checkGoldenShape(m, shape = undefined, where = 'message') {
  if (shape === undefined) {
    shape = GOLDEN.get(m.kind)
    if (shape === undefined) throw new Error(`no golden file for ${JSON.stringify(m)}`)
  }
  const text = JSON.stringify(m)
  for (const k of shape.required) {
    if (!(k in m)) throw new Error(`${where} lacks ${k}: ${text}`)
  }
  for (const [k, v] of Object.entries(m)) {
    const types = shape.types.get(k)
    if (types === undefined) throw new Error(`${where} has ${k}, no golden example has: ${text}`)
    if (!types.has(jsonType(v))) throw new Error(`${where}: ${k} is a ${jsonType(v)}, golden: ${[...types]} (${text})`)
    const items = shape.items.get(k)
    if (items === undefined || !Array.isArray(v)) continue
    for (const item of v) {
      if (items.itemTypes === undefined) checkGoldenShape(item, items, `${where}.${k}[]`)
      else if (!items.itemTypes.has(jsonType(item))) throw new Error(`${where}: an item of ${k} is a ${jsonType(item)}, golden: ${[...items.itemTypes]} (${text})`)
    }
  }
  if (where === 'message') checkedKinds.add(m.kind)
}

/**
 * A listening Unix stream socket in a temp dir, as the agent binds it: reads
 * newline-delimited JSON from every stream it accepts. Sends are
 * asynchronous, so `await rx.messages()` first waits until every message the
 * senders of this path wrote has arrived.
 */
class Receiver {
  /**
   * `golden: false` for tests of the transport that send hand-made payloads
   * rather than the adapter's messages: their shapes are not the golden ones.
   */
  constructor({ golden = true } = {}) {
    this.golden = golden
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'poolscope-node-'))
    this.path = path.join(this.dir, 'adapter-stream.sock')
    /** Lines received and not yet taken by messages()/drain(). */
    this.queue = []
    /** Lines received in all. */
    this.received = 0
    /** Lines the senders wrote that will never arrive (a test that drops
     * streams says how many). */
    this.lost = 0
    this.streams = new Set()
    this.accepted = 0
    this.onStream = (s) => {
      this.accepted += 1
      this.streams.add(s)
      let partial = ''
      s.setEncoding('utf8')
      s.on('data', (chunk) => {
        const lines = (partial + chunk).split('\n')
        partial = lines.pop()
        for (const text of lines) {
          if (text === '') continue
          this.received += 1
          this.queue.push(text)
        }
      })
      s.on('error', () => {})
      s.on('close', () => this.streams.delete(s))
    }
    this.listen()
  }

  listen() {
    this.server = net.createServer(this.onStream)
    this.listening = new Promise((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen(this.path, resolve)
    })
    return this.listening
  }

  /**
   * Every line received so far, once what `senders` wrote has arrived
   * (default: the shared sender of this path, which instrument() uses):
   * [{ text, json }].
   */
  async drain(senders = [senderFor(this.path)], timeoutMs = 5000) {
    await this.listening
    await eventually(() => {
      const sent = senders.reduce((n, s) => n + s.stats().sent, 0)
      return senders.every((s) => s.stats().waiting === 0 && !s.stats().batching) && this.received + this.lost >= sent
    }, timeoutMs)
    const out = this.queue.map((text) => {
      const json = JSON.parse(text)
      if (this.golden) checkGoldenShape(json)
      return { text, json }
    })
    this.queue = []
    return out
  }

  /** The messages (parsed) received so far (see drain), acquires shown
   * unfolded (see `unfolded`). */
  async messages(senders = undefined, timeoutMs = undefined) {
    return unfolded((await this.drain(senders, timeoutMs)).map((m) => m.json))
  }

  /** The agent exits: stops listening, drops every stream, removes the file. */
  async stop() {
    for (const s of this.streams) s.destroy()
    await new Promise((resolve) => this.server.close(() => resolve()))
  }

  close() {
    for (const s of this.streams) s.destroy()
    this.server.close()
    fs.rmSync(this.dir, { recursive: true, force: true })
  }
}

/**
 * A TCP server on 127.0.0.1 that accepts and never says a word, closed
 * with its sockets after the test `t`; resolves with its port.
 */
function silentTcpServer(t) {
  const sockets = new Set()
  const server = net.createServer((s) => {
    sockets.add(s)
    s.on('close', () => sockets.delete(s))
    s.on('error', () => {})
  })
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      t.after(() => {
        for (const s of sockets) s.destroy()
        server.close()
      })
      resolve(server.address().port)
    })
  })
}

/** Polls `f` every few ms until it returns a truthy value (or times out). */
async function eventually(f, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const v = f()
    if (v) return v
    if (Date.now() > deadline) throw new Error('timed out')
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/**
 * `messages` as if every acquire had sent its acquire_start when it began:
 * the adapter leaves out the start of an acquire that ends in the same turn
 * of the event loop, its acquire_end carrying `wait_ns` instead, and sends
 * the start of one still waiting when the turn ends, after the turn's other
 * messages. Whether an acquire that opens a connection ends within its turn
 * depends on timing, so tests compare this form: an acquire_start
 * (`folded: true`) put back for each folded acquire_end, a `checkout` (a
 * whole short checkout in one message) shown as its acquire_end and
 * release, a `checkouts` (short checkouts of one connection, folded) as
 * each one's acquire_start, acquire_end and release, and every acquire_start and acquire_end made so moved back
 * before the messages that came after it (larger mono_ns). Nothing else
 * moves.
 */
function unfolded(messages) {
  const out = []
  const place = (start) => {
    let at = out.length
    while (at > 0 && out[at - 1].mono_ns > start.mono_ns) at--
    out.splice(at, 0, start)
  }
  // A whole short checkout: its acquire_end (and folded start) when it
  // was handed out, then the release.
  const unfoldCheckout = (m) => {
    const { wait_ns: waitNs, use_ns: useNs, ...rest } = m
    const end = { ...rest, kind: 'acquire_end', result: 'ok', mono_ns: m.mono_ns - useNs }
    if (waitNs !== undefined) {
      const start = { v: m.v, kind: 'acquire_start', pool: m.pool }
      if (m.request !== undefined) start.request = m.request
      if (m.tid !== undefined) start.tid = m.tid
      start.mono_ns = end.mono_ns - waitNs
      start.folded = true
      place(start)
    }
    place(end)
    const release = { v: m.v, kind: 'release', pool: m.pool }
    if (m.local_address !== undefined) release.local_address = m.local_address
    if (m.fd !== undefined) release.fd = m.fd
    if (m.conn !== undefined) release.conn = m.conn
    release.mono_ns = m.mono_ns
    release.folded = true
    out.push(release)
  }
  for (const m of messages) {
    if (m.kind === 'acquire_end' && m.wait_ns !== undefined) {
      const { wait_ns: waitNs, ...end } = m
      const start = { v: m.v, kind: 'acquire_start', pool: m.pool, request: m.request }
      if (m.tid !== undefined) start.tid = m.tid
      start.mono_ns = m.mono_ns - waitNs
      start.folded = true
      place(start)
      out.push(end)
    } else if (m.kind === 'checkout') {
      unfoldCheckout(m)
    } else if (m.kind === 'checkouts') {
      // Short checkouts of one connection, folded: each as a checkout
      // without its request id (its acquire_start was never sent), all
      // released by the message's time.
      const { waits_ns: waits, uses_ns: uses, ...rest } = m
      waits.forEach((waitNs, i) => unfoldCheckout({ ...rest, wait_ns: waitNs, use_ns: uses[i] }))
    } else if (m.kind === 'acquire_start') {
      place(m)
    } else {
      out.push(m)
    }
  }
  return out
}

/** The first message `rx` got, a registration, without its (checked)
 * `mono_ns`. */
async function registration(rx) {
  const [reg] = await rx.messages()
  const { mono_ns: monoNs, ...rest } = reg
  if (!(Number.isInteger(monoNs) && monoNs > 0)) throw new Error(`no mono_ns in ${JSON.stringify(reg)}`)
  return rest
}

/** Asserts that `m` is one acquire that ended without a connection, with
 * `result`. */
function assertFailedAcquire(m, result) {
  const got = m.map((x) => x.kind)
  if (JSON.stringify(got) !== '["acquire_start","acquire_end"]') throw new Error(`not one failed acquire: ${JSON.stringify(m)}`)
  if (m[1].result !== result) throw new Error(`result ${m[1].result}, not ${result}: ${JSON.stringify(m)}`)
  if (m[1].request !== m[0].request) throw new Error(`the end of another request: ${JSON.stringify(m)}`)
  if (m[1].local_address !== undefined || m[1].fd !== undefined) throw new Error(`names a connection: ${JSON.stringify(m)}`)
}

/** Messages from `rx` until there are at least `n` (or times out). */
async function collect(rx, n, timeoutMs = 5000) {
  const got = []
  const deadline = Date.now() + timeoutMs
  for (;;) {
    got.push(...(await rx.messages()))
    if (got.length >= n) return got
    if (Date.now() > deadline) throw new Error(`timed out with ${got.length} of ${n} messages: ${JSON.stringify(got)}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** Keeps the thread busy for `ms` milliseconds, by a clock finer than
 * Date.now()'s milliseconds (which could end the wait after ms - 1). */
function busyFor(ms) {
  const until = process.hrtime.bigint() + BigInt(Math.round(ms * 1e6))
  while (process.hrtime.bigint() < until) {
    // busy on purpose: the caller's own work within its turn
  }
}

module.exports = {
  Receiver,
  busyFor,
  assertFailedAcquire,
  collect,
  registration,
  eventually,
  silentTcpServer,
  unfolded,
  GOLDEN,
  checkGoldenShape,
  checkedKinds,
}
