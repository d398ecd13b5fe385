// Health: /api/health polled every 10 s; links to /metrics and /api/docs; "Send test", then
// that message's timeline, live from /api/logs/ws.

import { api } from '../api.js';
import { clear, fmtBytes, fmtNumber, fmtTime, h } from '../dom.js';
import { LiveStream } from '../live.js';
import { sendTestDialog } from '../sendtest.js';
import { adminButton, needsAdminNote, section, showError } from '../ui.js';
import { timelineTable } from './message.js';

const POLL_MS = 10000;

export async function render(root) {
  const statusBox = h('div', { id: 'health-status' });
  const facts = h('dl', { class: 'summary', id: 'health-facts' });
  const followBox = h('div', { id: 'send-test-follow' });
  const links = h('ul', { class: 'links' }, h('li', null, h('a', { href: '/metrics' }, 'Prometheus metrics (/metrics)')),
    h('li', null, h('a', { href: '/api/docs' }, 'API documentation (/api/docs)')));
  const send = adminButton('Send test', () => sendAndFollow(), { id: 'health-send-test' }, { sendRoleToo: true });
  clear(root, needsAdminNote(), section('Status', statusBox, facts, links), section('Test message', send, followBox));

  async function refresh() {
    try {
      // 503 means unhealthy and still carries the document.
      const { data, status } = await api('/api/health', { okStatuses: [503] });
      clear(statusBox, h('p', { class: `health health-${data.status}` }, 'Status: ', h('strong', { id: 'health-word' }, data.status),
        status === 503 && data.error ? ` (${data.error})` : ''));
      const q = data.queue;
      clear(facts, [
        ['Uptime', data.uptime_formatted], ['Started (UTC)', fmtTime(data.started_at)], ['Python', data.python_version],
        ['Threads', String(data.num_threads)], ['Memory (RSS / peak)', `${fmtBytes(data.memory?.rss)} / ${fmtBytes(data.memory?.peak_rss)}`],
        ['Database', `${data.database?.status}${data.database?.latency_ms != null ? `, ${data.database.latency_ms} ms` : ''}`],
        ['Delivery worker', `${data.worker?.status}${data.worker?.last_heartbeat ? `, last heartbeat ${fmtTime(data.worker.last_heartbeat)}` : ''}`],
        ['Queue', q ? `${fmtNumber(q.total)} (pending ${fmtNumber(q.pending)}, deferred ${fmtNumber(q.deferred)}, held ${fmtNumber(q.held)}, failed ${fmtNumber(q.failed)})` : '—'],
      ].map(([k, v]) => [h('dt', null, k), h('dd', { dataset: { field: k } }, v)]));
    } catch (error) {
      clear(statusBox, h('p', { class: 'health health-unhealthy' }, 'Status: ', h('strong', { id: 'health-word' }, 'unreachable')));
      showError(error, 'Health');
    }
  }

  let following = null;
  let stream = null;
  const events = new Map();
  function showTimeline() {
    const items = [...events.values()].sort((a, b) => b.id - a.id);
    clear(followBox, h('p', null, 'Following ', h('a', { href: `/ui/message/${encodeURIComponent(following)}`, class: 'mono' }, following), ' live:'),
      timelineTable(items, `Events of ${following}, newest first`));
  }
  function take(items) {
    let changed = false;
    for (const e of items) if (e.message_id === following && !events.has(e.id)) { events.set(e.id, e); changed = true; }
    if (changed) showTimeline();
  }
  function openStream() {
    // Open (and wait for) the stream before sending: every event after the handshake arrives.
    return new Promise((resolve) => {
      if (stream) { resolve(); return; }
      stream = new LiveStream('/api/logs/ws', {
        params: { type: 'message_event' },
        onFrames(frames) { take(frames.map((f) => f.data)); },
        async poll() { if (following) take((await api('/api/logs/messages', { query: { message_id: following } })).data.logs); },
      }).start();
      const started = Date.now();
      const check = () => ((stream.state === 'live' || Date.now() - started > 3000) ? resolve() : setTimeout(check, 50));
      check();
    });
  }
  async function sendAndFollow() {
    await openStream();
    const id = await sendTestDialog();
    if (!id) return;
    following = id;
    events.clear();
    showTimeline();
    try { take((await api('/api/logs/messages', { query: { message_id: id } })).data.logs); } catch (error) { showError(error, 'Timeline'); }
  }

  await refresh();
  setInterval(refresh, POLL_MS);
}
