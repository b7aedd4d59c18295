'use strict';
// ESLint (flat configuration): the recommended rules over the client's CommonJS sources,
// tests, scripts and benchmark. `npm run lint` runs it and the type check; ./dev lint runs that.
const js = require('@eslint/js');
const globals = require('globals');

module.exports = [
  { ignores: ['node_modules/', 'proto/'] },
  js.configs.recommended,
  {
    files: ['**/*.js'],
    languageOptions: { ecmaVersion: 2022, sourceType: 'commonjs', globals: { ...globals.node } },
  },
  {
    // Tests write 9223372036854775807 on purpose: what a user's lossy literal becomes.
    files: ['test/**/*.js'],
    rules: { 'no-loss-of-precision': 'off' },
  },
];
