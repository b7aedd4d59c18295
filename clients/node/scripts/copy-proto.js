// Copies the API definition into the package, so that it carries it. Run as 'prepare': by
// npm pack (the tarball of ./dev dist), by npm install in this folder, and by
// 'npm install --install-links <this folder>' (which packs the folder first).
const fs = require('node:fs');
const path = require('node:path');

const source = path.join(__dirname, '..', '..', '..', 'proto', 'cachesidecar', 'v1', 'cache.proto');
const target = path.join(__dirname, '..', 'proto', 'cachesidecar', 'v1', 'cache.proto');
if (!fs.existsSync(source) && fs.existsSync(target)) {
  process.exit(0); // an unpacked package outside the repository: it has its copy
}
fs.mkdirSync(path.dirname(target), { recursive: true });
fs.copyFileSync(source, target);
