'use strict';
// Keys between JavaScript values and the API's KeyPart messages.
//
// Integer key parts travel as sint64 and come back as BigInt, whatever the
// column's width, so that two bigint keys never compare equal after rounding
// to a double (9223372036854775807 and ...806 are the same Number).

const INT64_MIN = -(2n ** 63n);
const INT64_MAX = 2n ** 63n - 1n;

function inInt64(value) {
  return value >= INT64_MIN && value <= INT64_MAX;
}

function keyPart(value) {
  if (typeof value === 'boolean') return { boolValue: value };
  if (typeof value === 'bigint') return inInt64(value) ? { intValue: value.toString() } : { stringValue: value.toString() };
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) return { doubleValue: value };
    if (!Number.isSafeInteger(value)) {
      // the literal the caller wrote was probably rounded already: refuse rather than read another row
      throw new RangeError(`key part ${value} is beyond Number.MAX_SAFE_INTEGER: send it as a BigInt or a string`);
    }
    return { intValue: value };
  }
  if (typeof value === 'string') return { stringValue: value };
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return { bytesValue: Buffer.from(value) };
  if (value instanceof Date) return { stringValue: value.toISOString() };
  throw new TypeError(`cannot send ${typeof value} as a key part`);
}

/** A scalar for a one-column key, an array for a composite key. */
function toKey(key) {
  return { parts: (Array.isArray(key) ? key : [key]).map(keyPart) };
}

/** An event's key: a scalar for one column, an array for several; integers as BigInt. */
function fromKey(key) {
  if (!key) return null;
  const values = key.parts.map((part) => {
    const value = part[part.kind];
    return part.kind === 'intValue' ? BigInt(value) : value;
  });
  return values.length === 1 ? values[0] : values;
}

/** BatchGetRequest key fields: the compact lists when every key allows it. */
function batchKeys(keys) {
  const integer = (k) => Number.isSafeInteger(k) || (typeof k === 'bigint' && inInt64(k));
  if (keys.length && keys.every(integer)) return { intKeys: keys.map(String) };
  if (keys.length && keys.every((k) => typeof k === 'string')) return { stringKeys: keys };
  return { keys: keys.map(toKey) };
}

module.exports = { keyPart, toKey, fromKey, batchKeys };
