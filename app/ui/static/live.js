// One WebSocket stream that survives: every close reconnects with the last frame's cursor
// (backoff 1-30 s with jitter), so nothing is missed or repeated; after 3 failures within 15 s
// the page polls the REST API instead, and says so, while reconnecting keeps being tried.

import { websocketUrl } from './api.js';

const FLUSH_MS = 250;
const FAILURE_WINDOW_MS = 15000;
const FAILURES_BEFORE_POLLING = 3;
const MAX_BACKOFF_MS = 30000;

const streams = new Set();
const statusListeners = new Set();

/** The combined state of the page's streams, for the footer: live, connecting, polling, offline. */
export function onLiveStatus(listener) {
  statusListeners.add(listener);
  listener(combinedStatus());
}

function combinedStatus() {
  const states = [...streams].map((s) => s.state);
  if (!states.length) return { state: 'none' };
  for (const state of ['offline', 'polling', 'connecting']) {
    const stream = [...streams].find((s) => s.state === state);
    if (stream) return { state, pollSeconds: stream.pollMs / 1000 };
  }
  return { state: 'live' };
}

function announce() {
  const status = combinedStatus();
  for (const listener of statusListeners) listener(status);
}

export class LiveStream {
  /**
   * path: '/api/queue/ws' or '/api/logs/ws'; params: its query filters; resume: since_* ids to
   * start from (no gap between a page's first REST read and the stream); onFrames(frames): the
   * batched frames, every 250 ms at most; poll(): the REST fallback, every pollMs while polling.
   */
  constructor(path, { params = {}, resume = {}, onFrames, poll = null, pollMs = 10000 }) {
    Object.assign(this, { path, params, resume, onFrames, poll, pollMs });
    this.cursor = null;
    this.ws = null;
    this.state = 'connecting';
    this.failures = [];
    this.attempt = 0;
    this.buffer = [];
    this.flushTimer = null;
    this.retryTimer = null;
    this.pollTimer = null;
    this.stopped = false;
    this.offline = !navigator.onLine;
    this.onOffline = () => { this.offline = true; this.setState('offline'); this.ws?.close(); };
    this.onOnline = () => { this.offline = false; this.attempt = 0; this.connectNow(); };
  }

  start() {
    streams.add(this);
    window.addEventListener('offline', this.onOffline);
    window.addEventListener('online', this.onOnline);
    if (this.offline) this.setState('offline');
    else this.connect();
    return this;
  }

  stop() {
    this.stopped = true;
    streams.delete(this);
    window.removeEventListener('offline', this.onOffline);
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.retryTimer);
    clearInterval(this.pollTimer);
    this.ws?.close();
    announce();
  }

  setState(state) {
    this.state = state;
    announce();
  }

  connectNow() {
    clearTimeout(this.retryTimer);
    if (!this.ws) this.connect();
  }

  connect() {
    if (this.stopped || this.offline) return;
    const params = { ...this.params, ...(this.cursor ? { cursor: this.cursor } : this.resume) };
    let ws;
    try {
      ws = new WebSocket(websocketUrl(this.path, params));
    } catch {
      this.failed();
      return;
    }
    this.ws = ws;
    if (this.state !== 'polling') this.setState('connecting');
    ws.onopen = () => {
      this.attempt = 0;
      this.stopPolling();
      this.setState('live');
    };
    ws.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.cursor) this.cursor = frame.cursor;
      this.buffer.push(frame);
      if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), FLUSH_MS);
    };
    ws.onclose = () => {
      if (this.ws === ws) this.ws = null;
      if (this.stopped) return;
      if (this.offline) { this.setState('offline'); return; }
      this.failed();
    };
  }

  flush() {
    this.flushTimer = null;
    const frames = this.buffer;
    this.buffer = [];
    if (frames.length) this.onFrames(frames);
  }

  failed() {
    const now = Date.now();
    this.failures = this.failures.filter((t) => now - t < FAILURE_WINDOW_MS);
    this.failures.push(now);
    if (this.failures.length >= FAILURES_BEFORE_POLLING && this.poll && this.state !== 'polling') {
      this.startPolling();
    } else if (this.state !== 'polling') {
      this.setState('connecting');
    }
    const base = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** this.attempt);
    this.attempt += 1;
    const delay = Math.max(1000, base * (0.75 + Math.random() * 0.5));
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  startPolling() {
    this.setState('polling');
    const run = () => { this.poll().catch(() => {}); };
    run();
    this.pollTimer = setInterval(run, this.pollMs);
  }

  stopPolling() {
    clearInterval(this.pollTimer);
    this.pollTimer = null;
  }
}
