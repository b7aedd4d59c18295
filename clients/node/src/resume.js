'use strict';
// Watch resumption, without I/O: what to ask for after a stream breaks, which
// items to skip, and when to tell the caller to start over. A port of the
// Python client's Resumer (clients/python/cache_sidecar_client/watch.py), so
// that both clients make the same decisions.

const { status } = require('@grpc/grpc-js');

// Statuses after which the stream resumes from its last revision. Not among
// them: FAILED_PRECONDITION (a row too large to send: it would be sent again).
const RESUMABLE = new Set([
  status.UNAVAILABLE,
  status.RESOURCE_EXHAUSTED, // fell behind: resume from the last revision
  status.ABORTED,
  status.INTERNAL, // e.g. a connection reset mid-stream
  status.UNKNOWN,
  status.DEADLINE_EXCEEDED,
]);

/**
 * Whether a stream that ended with `code` is resumed. RESOURCE_EXHAUSTED from
 * an established stream is the sidecar ending a subscriber that fell behind;
 * before that (no headers yet) it is grpc refusing the request itself as too
 * large, which would be refused again.
 */
function resumable(code, established) {
  if (code === status.RESOURCE_EXHAUSTED) return established;
  return RESUMABLE.has(code);
}

function sameOrOlder(revision, than) {
  return revision.epoch === than.epoch && BigInt(revision.number) <= BigInt(than.number);
}

class Resumer {
  /** @param {object} original the WatchRequest (plain object) first asked for */
  constructor(original, { maxDelayMs = 5000 } = {}) {
    this.original = { ...original };
    this.last = null; // the revision of the last item delivered
    this.failures = 0;
    this.maxDelayMs = maxDelayMs;
    this.inInitialState = Boolean(original.initialState); // a cut here cannot be resumed
    this.deliveredInitialRows = false;
  }

  nextRequest() {
    if (this.last === null) {
      this.inInitialState = Boolean(this.original.initialState);
      this.deliveredInitialRows = false;
      return this.original;
    }
    return { ...this.original, initialState: false, startRevision: this.last };
  }

  /** The stream's headers (a grpc Metadata): where it starts, should it be cut before any message. */
  established(metadata) {
    if (this.last !== null || this.inInitialState) return;
    const [value] = metadata ? metadata.get('cachesidecar-revision') : [];
    if (typeof value === 'string' && value.includes('/')) {
      const cut = value.lastIndexOf('/');
      this.last = { epoch: value.slice(0, cut), number: value.slice(cut + 1) };
    }
  }

  /** A batch at or before what was delivered (a resume may repeat the last one). */
  duplicate(item) {
    return item.type === 'changes' && this.last !== null && !this.inInitialState && sameOrOlder(item.revision, this.last);
  }

  seen(item) {
    this.failures = 0;
    if (item.type === 'reset') {
      this.inInitialState = Boolean(this.original.initialState); // the server sends it again
      this.deliveredInitialRows = false;
    }
    if (item.type === 'initialStateDone') this.inInitialState = false;
    if (this.inInitialState) {
      this.deliveredInitialRows = this.deliveredInitialRows || item.type === 'changes';
      return; // resuming mid-snapshot would skip rows
    }
    if (item.revision) this.last = item.revision;
  }

  /** The stream broke: a reset to deliver first if what was delivered cannot be continued. */
  interrupted() {
    if (this.inInitialState && this.deliveredInitialRows) {
      this.last = null;
      return { type: 'reset', revision: null, reason: 'resync: the initial state was interrupted' };
    }
    return null;
  }

  /** Milliseconds to wait before the next attempt: exponential, jittered, capped. */
  delayMs() {
    this.failures += 1;
    const ceiling = Math.min(this.maxDelayMs, 50 * 2 ** Math.min(this.failures, 20));
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  }

  /** The resume point is gone: start over from now (or the initial state), and say so. */
  outOfRange(details) {
    this.last = null;
    this.original.startRevision = null;
    return { type: 'reset', revision: null, reason: `resync: ${details}` };
  }
}

module.exports = { Resumer, resumable, RESUMABLE };
