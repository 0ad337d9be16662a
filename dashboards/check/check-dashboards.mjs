#!/usr/bin/env node
// Type-checks Grafana dashboards against @grafana/schema's `Dashboard`.
//
// Each dashboard JSON is wrapped, unchanged, as
//   import type { Dashboard } from '@grafana/schema';
//   export const d = <json> satisfies Dashboard;
// in a temporary directory and compiled with `tsc --noEmit --strict` using
// dashboards/tsconfig.json. `satisfies` also rejects properties the schema
// does not know, so a misspelt field fails as well as a wrong type. Each
// dashboard's schemaVersion must also be @grafana/schema's current one.
//
// Usage: node check/check-dashboards.mjs [FILE.json...]
// Without arguments: every dashboard (*.json with a "schemaVersion") in
// dashboards/. Exit status 0 when all pass, 1 on type errors, 2 on usage or
// set-up errors (e.g. `npm ci` not run).

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc');
const schema = join(root, 'node_modules', '@grafana', 'schema', 'package.json');
// The wrapper's first line; the JSON starts on the second, so a line in the
// generated .ts file is that line minus one in the dashboard.
const HEADER = "import type { Dashboard } from '@grafana/schema';\n";

// Errors that are not type errors; thrown so that the temp dir is removed.
class SetupError extends Error {}

function fail(message) {
  console.error(`check-dashboards: ${message}`);
  process.exit(2);
}

for (const needed of [tsc, schema]) {
  if (!existsSync(needed)) {
    fail(`${needed} is missing: run \`npm ci\` in ${root} (cargo xtask setup does)`);
  }
}

function isDashboard(file) {
  try {
    const value = JSON.parse(readFileSync(file, 'utf8'));
    return value !== null && typeof value === 'object' && 'schemaVersion' in value;
  } catch {
    return false;
  }
}

const files = process.argv.length > 2
  ? process.argv.slice(2).map((f) => resolve(f))
  : readdirSync(root)
    .filter((f) => f.endsWith('.json'))
    .map((f) => join(root, f))
    .filter(isDashboard)
    .sort();
if (files.length === 0) {
  fail(`no dashboards in ${root}`);
}

const work = mkdtempSync(join(tmpdir(), 'poolscope-dashboards-'));
try {
  // Module resolution walks up from the generated files to this link.
  symlinkSync(join(root, 'node_modules'), join(work, 'node_modules'), 'dir');
  const generated = new Map();
  for (const file of files) {
    let text;
    try {
      text = readFileSync(file, 'utf8');
      JSON.parse(text);
    } catch (e) {
      throw new SetupError(`${file}: ${e.message}`);
    }
    const ts = `${basename(file, '.json')}.ts`;
    if (generated.has(ts)) {
      throw new SetupError(`two dashboards named ${basename(file)}`);
    }
    writeFileSync(join(work, ts), `${HEADER}export const d = ${text.trimEnd()} satisfies Dashboard;\n`);
    generated.set(ts, file);
  }
  writeFileSync(join(work, 'tsconfig.json'), JSON.stringify({
    extends: join(root, 'tsconfig.json'),
    files: [...generated.keys()],
  }, null, 2));
  const result = spawnSync(process.execPath, [tsc, '-p', join(work, 'tsconfig.json'), '--noEmit', '--strict', '--pretty', 'false'], {
    cwd: work,
    encoding: 'utf8',
  });
  if (result.error) {
    throw new SetupError(`cannot run tsc: ${result.error.message}`);
  }
  // Point tsc's messages at the dashboard files: "pools.ts(12,7): error ..."
  // becomes "/…/dashboards/pools.json(11,7): error ...".
  const output = `${result.stdout}${result.stderr}`.replace(
    /^([\w.-]+\.ts)\((\d+),(\d+)\)/gm,
    (whole, ts, line, col) => (generated.has(ts) ? `${generated.get(ts)}(${Number(line) - 1},${col})` : whole),
  );
  if (output.trim()) {
    console.log(output.trimEnd());
  }
  // The type says only `schemaVersion: number`; Grafana migrates older
  // dashboards on load, so a dashboard must be at the package's version.
  const { defaultDashboard } = await import('@grafana/schema');
  const current = defaultDashboard.schemaVersion;
  const outdated = files.filter((f) => JSON.parse(readFileSync(f, 'utf8')).schemaVersion !== current);
  for (const file of outdated) {
    console.log(`${file}: schemaVersion is not ${current}, the current one of @grafana/schema`);
  }
  if (result.status !== 0 || outdated.length > 0) {
    console.error(`check-dashboards: errors in the ${files.length} dashboard(s) checked`);
    process.exitCode = 1;
  } else {
    for (const file of files) {
      console.log(`ok: ${file}`);
    }
  }
} catch (e) {
  if (!(e instanceof SetupError)) {
    throw e;
  }
  console.error(`check-dashboards: ${e.message}`);
  process.exitCode = 2;
} finally {
  rmSync(work, { recursive: true, force: true });
}
