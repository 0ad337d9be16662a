'use strict'
// A receiving Unix datagram socket in a temp dir, as the agent binds it
// (SO_PASSCRED), read synchronously: sends are synchronous, so whatever the
// adapter sent is already queued when a test looks.

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { native } = require('../lib/native')

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
  const items = new Map()
  for (const [k, vs] of values) {
    const listed = vs.filter(Array.isArray).flat()
    if (listed.length > 0) items.set(k, shapeOf(listed))
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
    if (shape.items.has(k)) for (const item of v) checkGoldenShape(item, shape.items.get(k), `${where}.${k}[]`)
  }
  if (where === 'message') checkedKinds.add(m.kind)
}

class Receiver {
  /**
   * `golden: false` for tests of the transport that send hand-made payloads
   * rather than the adapter's messages: their shapes are not the golden ones.
   */
  constructor({ golden = true } = {}) {
    this.golden = golden
    if (native === null) throw new Error('the native sender is not built: run npm install (node-gyp)')
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'poolscope-node-'))
    this.path = path.join(this.dir, 'adapter.sock')
    this.fd = native.bind(this.path)
    if (this.fd < 0) throw new Error(`cannot bind ${this.path}: errno ${-this.fd}`)
  }

  /** Every datagram queued now: { text, json, pid, uid }. */
  drain() {
    const out = []
    for (;;) {
      const got = native.recv(this.fd)
      if (got === null) return out
      if (typeof got === 'number') throw new Error(`recv failed: errno ${-got}`)
      const text = got.data.toString('utf8')
      const json = JSON.parse(text)
      if (this.golden) checkGoldenShape(json)
      out.push({ text, json, pid: got.pid, uid: got.uid })
    }
  }

  /** The messages (parsed) queued now. */
  messages() {
    return this.drain().map((m) => m.json)
  }

  close() {
    native.close(this.fd)
    fs.rmSync(this.dir, { recursive: true, force: true })
  }
}

/**
 * How many datagrams a receiving socket queues before senders get EAGAIN:
 * net.unix.max_dgram_qlen as the socket was created, or less. Read it after
 * creating the Receiver: a poolscope agent starting meanwhile may raise it
 * (never lower it), and then this overstates the socket's limit, which is
 * what a test that means to fill the queue needs.
 */
function queueLength() {
  try {
    const n = Number(fs.readFileSync('/proc/sys/net/unix/max_dgram_qlen', 'utf8').trim())
    return Number.isInteger(n) && n > 0 ? n : 10
  } catch (err) {
    return 10
  }
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

module.exports = { Receiver, eventually, queueLength, GOLDEN, checkGoldenShape, checkedKinds }
