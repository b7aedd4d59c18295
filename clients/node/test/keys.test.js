'use strict';
// Key parts to and from the wire, without a server.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { toKey, fromKey } = require('../src/keys.js');

test('integer key parts come back as BigInt, exactly', () => {
  const wire = (value) => ({ parts: [{ kind: 'intValue', intValue: value }] }); // proto-loader gives longs as strings
  assert.equal(fromKey(wire('9223372036854775807')), 9223372036854775807n);
  assert.notEqual(fromKey(wire('9223372036854775807')), fromKey(wire('9223372036854775806')));
  assert.equal(fromKey(wire('1')), 1n);
  assert.deepEqual(fromKey({ parts: [{ kind: 'intValue', intValue: '7' }, { kind: 'stringValue', stringValue: 'x' }] }), [7n, 'x']);
});

test('keys are sent from BigInt, number and string', () => {
  assert.deepEqual(toKey(9223372036854775807n), { parts: [{ intValue: '9223372036854775807' }] });
  assert.deepEqual(toKey(2n ** 64n), { parts: [{ stringValue: '18446744073709551616' }] }); // beyond int64: the sidecar says so
  assert.deepEqual(toKey(7), { parts: [{ intValue: 7 }] });
  assert.deepEqual(toKey('9223372036854775807'), { parts: [{ stringValue: '9223372036854775807' }] });
  assert.deepEqual(toKey([1, 'a', true, 1.5]), { parts: [{ intValue: 1 }, { stringValue: 'a' }, { boolValue: true }, { doubleValue: 1.5 }] });
});

test('an integer Number beyond 2^53 is refused: it was probably rounded already', () => {
  assert.throws(() => toKey(9223372036854775807), RangeError); // (the literal is 9223372036854775808)
  assert.throws(() => toKey(2 ** 53), /BigInt or a string/);
});
