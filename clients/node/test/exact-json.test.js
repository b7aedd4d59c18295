'use strict';
// parseExact against JSON.parse: the same values, except the numbers JSON.parse cannot keep.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { parseExact } = require('../src/exact-json.js');

test('big integers come back as BigInt, safe ones as numbers', () => {
  const row = parseExact(Buffer.from('{"a": 9223372036854775807, "b": 9223372036854775806, "c": -9223372036854775808, "d": 42}'));
  assert.deepEqual(row, { a: 9223372036854775807n, b: 9223372036854775806n, c: -9223372036854775808n, d: 42 });
  assert.equal(parseExact(String(Number.MAX_SAFE_INTEGER)), Number.MAX_SAFE_INTEGER);
  assert.equal(parseExact(String(-Number.MAX_SAFE_INTEGER)), -Number.MAX_SAFE_INTEGER);
  assert.equal(parseExact('9007199254740992'), 9007199254740992n); // 2^53: the first unsafe one
});

test('numbers with a fraction or an exponent come back as their exact text', () => {
  assert.deepEqual(parseExact('[12345678901234567890.000000000000000001, 0.1, 1e+100, -2.50, 12.50E-3]'), [
    '12345678901234567890.000000000000000001',
    '0.1',
    '1e+100',
    '-2.50',
    '12.50E-3',
  ]);
});

test('everything else is what JSON.parse gives', () => {
  const text = '{"s": "h\\u00e9llo \\"q\\" \\\\ \\n", "t": true, "f": false, "n": null, "nested": {"a": [1, [], {}, "x"]}, "e": ""}';
  assert.deepEqual(parseExact(text), JSON.parse(text));
  assert.deepEqual(parseExact(' \n[ ]\t'), []);
  assert.deepEqual(parseExact('{"a": 1, "a": 2}'), { a: 2 });
});

test('a "__proto__" key is an own property, as with JSON.parse, not a prototype', () => {
  const row = parseExact('{"__proto__": {"polluted": true}, "id": 1}');
  assert.equal(Object.getPrototypeOf(row), Object.prototype);
  assert.equal(row.polluted, undefined);
  assert.deepEqual(Object.keys(row), ['__proto__', 'id']);
  assert.deepEqual(row, JSON.parse('{"__proto__": {"polluted": true}, "id": 1}'));
});

test('malformed input is a SyntaxError', () => {
  for (const bad of ['', '{', '{"a" 1}', '[1,]', '01', '1.', '"abc', '{"a": 1} x', 'tru', '"\u0001"', '-']) {
    assert.throws(() => parseExact(bad), SyntaxError, bad);
  }
});

test('any nesting depth: a loop, not recursion (the call stack ends near 3000 levels)', () => {
  let value = parseExact(`{"a":${'['.repeat(200000)}${']'.repeat(200000)},"b":${'9'.repeat(5000)}}`);
  assert.equal(value.b, 10n ** 5000n - 1n);
  let depth = 0;
  for (value = value.a; value.length; value = value[0]) depth++;
  assert.equal(depth, 199999);
  assert.deepEqual(parseExact('[[1,{"x":[2,{}]}],[]]'), [[1, { x: [2, {}] }], []]);
  for (const bad of ['[1,]', '{"a" 1}', '[1 2]', '{', '[1]x', '{"a":1,}', '[[]', '']) {
    assert.throws(() => parseExact(bad), SyntaxError, bad);
  }
});
