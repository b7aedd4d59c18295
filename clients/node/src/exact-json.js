'use strict';
// An exact JSON parser for rows: JSON.parse turns every number into a double,
// so bigint values beyond 2^53 and numerics lose digits, and its reviver cannot
// see the source text on Node 18/20. This tokenizer keeps the text of numbers:
//
//   integer literal within ±Number.MAX_SAFE_INTEGER    -> number
//   integer literal beyond it                          -> BigInt
//   literal with a fraction or an exponent             -> string, the exact source text
//
// Everything else (strings, objects, arrays, true/false/null) is what JSON.parse
// gives. PostgreSQL prints numeric and double precision values the same way, so
// a double precision column comes back as a string too (Number() it if you want).

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

class ExactParser {
  constructor(text) {
    this.text = text;
    this.at = 0;
  }

  fail(what) {
    const shown = this.at < this.text.length ? `'${this.text[this.at]}'` : 'end of input';
    throw new SyntaxError(`exact JSON: ${what} at position ${this.at} (found ${shown})`);
  }

  space() {
    const { text } = this;
    for (;;) {
      const c = text.charCodeAt(this.at);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) this.at++;
      else return;
    }
  }

  value() {
    this.space();
    const c = this.text[this.at];
    if (c === '{') return this.object();
    if (c === '[') return this.array();
    if (c === '"') return this.string();
    if (c === '-' || (c >= '0' && c <= '9')) return this.number();
    for (const [word, result] of [['true', true], ['false', false], ['null', null]]) {
      if (this.text.startsWith(word, this.at)) {
        this.at += word.length;
        return result;
      }
    }
    return this.fail('expected a value');
  }

  object() {
    const result = {};
    this.at++;
    this.space();
    if (this.text[this.at] === '}') {
      this.at++;
      return result;
    }
    for (;;) {
      this.space();
      if (this.text[this.at] !== '"') this.fail('expected a string key');
      const key = this.string();
      this.space();
      if (this.text[this.at] !== ':') this.fail("expected ':'");
      this.at++;
      const value = this.value();
      if (key === '__proto__') {
        // a plain assignment would replace the prototype; JSON.parse makes an own property
        Object.defineProperty(result, key, { value, writable: true, enumerable: true, configurable: true });
      } else {
        result[key] = value;
      }
      this.space();
      const next = this.text[this.at++];
      if (next === '}') return result;
      if (next !== ',') {
        this.at--;
        this.fail("expected ',' or '}'");
      }
    }
  }

  array() {
    const result = [];
    this.at++;
    this.space();
    if (this.text[this.at] === ']') {
      this.at++;
      return result;
    }
    for (;;) {
      result.push(this.value());
      this.space();
      const next = this.text[this.at++];
      if (next === ']') return result;
      if (next !== ',') {
        this.at--;
        this.fail("expected ',' or ']'");
      }
    }
  }

  string() {
    const { text } = this;
    const start = this.at;
    let escaped = false;
    for (let i = start + 1; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c === 0x5c) {
        escaped = true;
        i++;
      } else if (c === 0x22) {
        this.at = i + 1;
        // JSON.parse unescapes (and validates) the one token it is given
        return escaped ? JSON.parse(text.slice(start, i + 1)) : text.slice(start + 1, i);
      } else if (c < 0x20) {
        this.at = i;
        this.fail('control character in a string');
      }
    }
    this.at = text.length;
    return this.fail('unterminated string');
  }

  number() {
    const match = /-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/y;
    match.lastIndex = this.at;
    const found = match.exec(this.text);
    if (!found) this.fail('malformed number');
    this.at = match.lastIndex;
    const literal = found[0];
    if (found[1] !== undefined || found[2] !== undefined) return literal;
    if (literal.length < 16) return Number(literal); // at most 15 digits: always safe
    const big = BigInt(literal);
    return big > MAX_SAFE || big < -MAX_SAFE ? big : Number(literal);
  }
}

/**
 * Parses a row (a Buffer or a string of JSON) exactly: integers beyond
 * Number.MAX_SAFE_INTEGER as BigInt, numbers with a fraction or an exponent
 * as their source text (strings), the rest as JSON.parse would.
 */
function parseExact(bytes) {
  const parser = new ExactParser(typeof bytes === 'string' ? bytes : Buffer.isBuffer(bytes) ? bytes.toString('utf8') : Buffer.from(bytes).toString('utf8'));
  const result = parser.value();
  parser.space();
  if (parser.at !== parser.text.length) parser.fail('unexpected text after the value');
  return result;
}

module.exports = { parseExact };
