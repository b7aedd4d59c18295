// Copies the API definition into the package, so a published package carries it.
const fs = require('node:fs');
const path = require('node:path');

const source = path.join(__dirname, '..', '..', '..', 'proto', 'cachesidecar', 'v1', 'cache.proto');
const target = path.join(__dirname, '..', 'proto', 'cachesidecar', 'v1', 'cache.proto');
fs.mkdirSync(path.dirname(target), { recursive: true });
fs.copyFileSync(source, target);
