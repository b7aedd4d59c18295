'use strict';
// Shared by the tests that need a real sidecar: ports, waiting on conditions,
// a PostgreSQL of their own, the daemon as a process, a TCP proxy that cuts.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');

const REPO = path.join(__dirname, '..', '..', '..');
// The Python with cache-sidecar installed: SIDECAR_PYTHON, else the repository's venv (./dev makes it).
const VENV_PYTHON = path.join(REPO, '.venv', 'bin', 'python');
const given = process.env.SIDECAR_PYTHON;
const PYTHON = given ? (given.includes('/') ? path.resolve(given) : given) : fs.existsSync(VENV_PYTHON) ? VENV_PYTHON : 'python3';

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function eventually(check, { timeoutMs = 20000, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${timeoutMs} ms (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function cleanEnv() {
  const env = { ...process.env };
  for (const name of Object.keys(env)) if (name.startsWith('PG') || name.startsWith('CACHE_SIDECAR_')) delete env[name];
  return env;
}

/** A PostgreSQL (pgserver, from the daemon's venv) that outlives daemon restarts; deleted when stopped. */
async function startPostgres() {
  const script = [
    'import sys, tempfile, warnings',
    'warnings.filterwarnings("ignore")',
    'import pgserver',
    'server = pgserver.get_server(tempfile.mkdtemp(prefix="node-test-pg-"), cleanup_mode="delete")',
    'print(server.get_uri(), flush=True)',
    'sys.stdin.read()', // until the test closes stdin (or dies)
  ].join('\n');
  const child = spawn(PYTHON, ['-c', script], { env: cleanEnv(), stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (chunk) => {
    out += chunk;
  });
  const died = new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`${PYTHON} could not start pgserver (exit ${code})`)));
  });
  const dsn = await Promise.race([eventually(() => out.includes('\n') && out.trim(), { timeoutMs: 60000, what: 'PostgreSQL started' }), died]);
  return {
    dsn,
    socketDir: decodeURIComponent(dsn.match(/[?&]host=([^&]+)/)[1]),
    async stop() {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.stdin.end();
      await exited;
    },
  };
}

/** `python -m sidecar serve <args>`, once `ready()` resolves truthy; `stop()` ends it with SIGTERM. */
async function startDaemon(args, ready) {
  const daemon = spawn(PYTHON, ['-m', 'sidecar', 'serve', '--log-level', 'warning', ...args], {
    cwd: REPO,
    env: cleanEnv(),
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const exited = new Promise((resolve) => daemon.once('exit', resolve));
  let stderr = '';
  daemon.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  const died = exited.then((code) => {
    throw new Error(`the daemon exited ${code}: ${stderr}`);
  });
  died.catch(() => {}); // (raced below, and a later stop() makes it reject too)
  await Promise.race([eventually(() => ready(stderr), { timeoutMs: 60000, what: 'daemon ready' }), died]);
  return {
    stderr: () => stderr,
    async stop() {
      daemon.kill('SIGTERM');
      return exited;
    },
    async kill() {
      daemon.kill('SIGKILL');
      return exited;
    },
  };
}

/** A TCP proxy to `port` whose connections can be cut, and new ones refused, at will. */
async function startProxy(port) {
  const sockets = new Set();
  let blocked = false;
  let connections = 0;
  const server = net.createServer((client) => {
    if (blocked) return client.destroy();
    connections++;
    const upstream = net.connect(port, '127.0.0.1');
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      sockets.add(a);
      a.on('error', () => b.destroy());
      a.on('close', () => {
        sockets.delete(a);
        b.destroy();
      });
      a.pipe(b);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    target: `127.0.0.1:${server.address().port}`,
    connections: () => connections,
    block() {
      blocked = true;
      for (const socket of sockets) socket.destroy();
    },
    unblock() {
      blocked = false;
    },
    close() {
      blocked = true;
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

module.exports = { freePort, eventually, startPostgres, startDaemon, startProxy, PYTHON, REPO };
