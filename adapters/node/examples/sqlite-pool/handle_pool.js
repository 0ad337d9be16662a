'use strict'
// A pool of SQLite handles (better-sqlite3 12.x) that the application keeps
// itself, reported to poolscope through the generic reporter: the handles
// have no socket, so the agent knows them by the ids the reporter gives
// them. The README of adapters/node shows this file; the integration test
// (tests/tests/adapter_node.rs) runs it against the agent.

const Database = require('better-sqlite3')
const { reportPool } = require('poolscope-adapter')

class HandlePool {
  constructor(path, { max = 4, timeoutMs = 30_000, name = 'handles' } = {}) {
    Object.assign(this, { path, max, timeoutMs, idle: [], open: 0, waiters: [] })
    this.report = reportPool({ name, dbSystem: 'sqlite', serverAddress: path, max, library: 'handle_pool' })
  }

  /** Resolves with a handle; rejects with 'pool full' after timeoutMs. */
  acquire() {
    const waiting = this.report.acquire() // before the pool may wait
    if (this.idle.length > 0 || this.open < this.max) return Promise.resolve(this.handOut(waiting))
    return new Promise((resolve, reject) => {
      const waiter = { waiting, resolve }
      waiter.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1)
        waiting.timeout()
        reject(new Error('pool full'))
      }, this.timeoutMs)
      this.waiters.push(waiter)
    })
  }

  handOut(waiting) {
    let handle = this.idle.pop()
    if (handle === undefined) {
      handle = new Database(this.path)
      this.open += 1
      this.report.connectionCreated(handle)
    }
    waiting.ok(handle)
    return handle
  }

  release(handle) {
    this.report.released(handle)
    this.idle.push(handle)
    const waiter = this.waiters.shift()
    if (waiter !== undefined) {
      clearTimeout(waiter.timer)
      waiter.resolve(this.handOut(waiter.waiting))
    }
  }

  discard(handle) {
    this.report.connectionClosed(handle)
    handle.close()
    this.open -= 1
  }

  /** Used, idle and max, as the pool itself counts them. */
  state() {
    return { used: this.open - this.idle.length, idle: this.idle.length, max: this.max, pending: this.waiters.length }
  }
}

module.exports = { HandlePool }
