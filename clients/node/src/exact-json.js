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
// gives. Nesting of any depth is read (a loop over an explicit stack, not recursion:
// a jsonb nested some thousands deep would overflow the call stack). PostgreSQL prints numeric and double precision values the same way, so
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

  /** One JSON value, read with a loop over an explicit stack (no recursion: any depth). */
  value() {
    const { text } = this;
    // open containers, innermost last: { container, key } (key: the member awaiting its value)
    const stack = [];
    for (;;) {
      this.space();
      let value;
      const c = text[this.at];
      if (c === '{' || c === '[') {
        this.at++;
        this.space();
        if (text[this.at] === (c === '{' ? '}' : ']')) {
          this.at++;
          value = c === '{' ? {} : [];
        } else {
          const frame = { container: c === '{' ? {} : [], key: null };
          if (c === '{') frame.key = this.memberName();
          stack.push(frame);
          continue;
        }
      } else {
        value = this.scalar();
      }
      // `value` is complete: into its container, then on to the next value
      for (;;) {
        if (!stack.length) return value;
        const frame = stack[stack.length - 1];
        const { container } = frame;
        if (Array.isArray(container)) container.push(value);
        else if (frame.key === '__proto__') {
          // a plain assignment would replace the prototype; JSON.parse makes an own property
          Object.defineProperty(container, frame.key, { value, writable: true, enumerable: true, configurable: true });
        } else container[frame.key] = value;
        this.space();
        const closing = Array.isArray(container) ? ']' : '}';
        const next = text[this.at++];
        if (next === ',') {
          if (!Array.isArray(container)) frame.key = this.memberName();
          break;
        }
        if (next !== closing) {
          this.at--;
          this.fail(`expected ',' or '${closing}'`);
        }
        stack.pop();
        value = container;
      }
    }
  }

  /** `"name":` (after space): the name. */
  memberName() {
    this.space();
    if (this.text[this.at] !== '"') this.fail('expected a string key');
    const key = this.string();
    this.space();
    if (this.text[this.at] !== ':') this.fail("expected ':'");
    this.at++;
    return key;
  }

  scalar() {
    const c = this.text[this.at];
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
