'use strict'
// Loads the compiled Unix-datagram sender (src/sender.c). When it is missing
// (no compiler at install time, another OS) the adapter stays inactive: the
// application runs on unchanged and nothing is reported.

const path = require('node:path')

const BUILT = [
  path.join(__dirname, '..', 'build', 'Release', 'poolscope_adapter.node'),
  path.join(__dirname, '..', 'build', 'Debug', 'poolscope_adapter.node'),
]

let native = null
let loadError = null

for (const file of BUILT) {
  try {
    native = require(file)
    loadError = null
    break
  } catch (err) {
    if (loadError === null) loadError = err
  }
}

module.exports = { native, loadError, BUILT }

if (require.main === module && process.argv.includes('--explain-build-failure')) {
  // npm's install script lands here when node-gyp failed: installing must not
  // fail the application's install, so explain and succeed.
  process.stderr.write(
    'poolscope-adapter: the native Unix datagram sender could not be built ' +
      '(node-gyp needs python3, make and a C compiler); the adapter will be ' +
      'inactive and report nothing. Run `npm rebuild poolscope-adapter` once ' +
      'they are installed.\n'
  )
}
