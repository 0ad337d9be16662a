'use strict'
// The README's examples are the code the tests run.

const test = require('node:test')
const assert = require('node:assert/strict')
const fs = require('node:fs')
const path = require('node:path')

const root = path.join(__dirname, '..')

test('the README shows examples/sqlite-pool/handle_pool.js as it is', () => {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8')
  const at = readme.indexOf('examples/sqlite-pool/handle_pool.js')
  assert.ok(at >= 0, 'the README names the example file')
  const open = readme.indexOf('```js\n', at) + '```js\n'.length
  const shown = readme.slice(open, readme.indexOf('```\n', open))
  const file = fs.readFileSync(path.join(root, 'examples', 'sqlite-pool', 'handle_pool.js'), 'utf8')
  const code = file.slice(file.indexOf('const Database'), file.indexOf('module.exports')).trimEnd() + '\n'
  assert.equal(shown, code)
})
