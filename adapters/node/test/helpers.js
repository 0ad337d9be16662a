'use strict'
// A receiving Unix datagram socket in a temp dir, as the agent binds it
// (SO_PASSCRED), read synchronously: sends are synchronous, so whatever the
// adapter sent is already queued when a test looks.

const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { native } = require('../lib/native')

class Receiver {
  constructor() {
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
      out.push({ text, json: JSON.parse(text), pid: got.pid, uid: got.uid })
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

module.exports = { Receiver, eventually, queueLength }
