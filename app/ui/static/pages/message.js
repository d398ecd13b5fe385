// One message: summary, recipients, timeline (with the actor), headers, raw source and .eml
// download; after it left the queue, its history from /api/logs/messages.

import { api } from '../api.js';
import { clear, fmtBytes, fmtTime, h, table } from '../dom.js';
import { LiveStream } from '../live.js';
import { adminButton, confirmDialog, needsAdminNote, section, showError, stateBadge, toast } from '../ui.js';

const ACTIONS = {
  pending: ['hold', 'delete'],
  deferred: ['retry', 'hold', 'delete'],
  held: ['release', 'delete'],
  failed: ['retry', 'delete'],
};
const LABELS = { retry: 'Retry', hold: 'Hold', release: 'Release', delete: 'Delete' };

export function timelineTable(events, caption) {
  const { wrap, tbody } = table(caption, ['Time (UTC)', 'Event', 'Recipient', 'Remote host', 'SMTP code', 'Details (actor)']);
  wrap.querySelector('table').classList.add('timeline');
  for (const e of events) {
    tbody.append(h('tr', { dataset: { eventId: String(e.id), eventType: e.event_type } },
      h('td', null, fmtTime(e.timestamp)), h('td', null, h('span', { class: `badge event-${e.event_type}` }, e.event_type)),
      h('td', null, e.recipient || ''), h('td', null, e.delivery_host || ''), h('td', { class: 'num' }, e.smtp_code ?? ''),
      h('td', { class: 'event-message' }, e.message || '')));
  }
  if (!events.length) tbody.append(h('tr', null, h('td', { colspan: 6, class: 'muted' }, 'No event recorded.')));
  return wrap;
}

export async function render(root) {
  const id = decodeURIComponent(window.location.pathname.split('/').pop());
  const title = document.getElementById('page-title');
  title.textContent = `Message ${id}`;
  document.title = `Message ${id} · Elemta`;
  const body = h('div', { id: 'message-body' });
  clear(root, needsAdminNote(), body);
  let refreshTimer = null;

  async function showHistory(reason) {
    try {
      const { data } = await api('/api/logs/messages', { query: { message_id: id, limit: 1000 } });
      clear(body, h('p', { class: 'note', id: 'message-gone' }, reason),
        section('History', timelineTable(data.logs, `Recorded events of ${id}, newest first`)));
    } catch (error) {
      showError(error, 'Loading the history');
    }
  }

  async function act(action) {
    if (action === 'delete' && !(await confirmDialog('Delete message', `Delete ${id}? This cannot be undone.`, 'Delete', { danger: true }))) return;
    try {
      const path = `/api/queue/message/${encodeURIComponent(id)}`;
      const { data } = await api(action === 'delete' ? path : `${path}/${action}`, { method: action === 'delete' ? 'DELETE' : 'POST' });
      toast(data.message);
      await load();
    } catch (error) {
      showError(error, `${LABELS[action]} ${id}`);
    }
  }

  async function download() {
    try {
      const { data } = await api(`/api/queue/message/${encodeURIComponent(id)}`, { query: { format: 'raw' }, as: 'blob' });
      const url = URL.createObjectURL(data);
      const link = h('a', { href: url, download: `${id}.eml`, class: 'visually-hidden' }, 'download');
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      showError(error, 'Download');
    }
  }

  async function load() {
    let m;
    let raw;
    try {
      [m, raw] = await Promise.all([
        api(`/api/queue/message/${encodeURIComponent(id)}`).then((r) => r.data),
        api(`/api/queue/message/${encodeURIComponent(id)}`, { query: { format: 'raw' }, as: 'text' }).then((r) => r.data),
      ]);
    } catch (error) {
      if (error.status === 404) { await showHistory('This message is no longer in the queue (delivered, deleted or expired). Its recorded history:'); return; }
      throw error;
    }
    const summary = h('dl', { class: 'summary', id: 'message-summary' }, [
      ['State', stateBadge(m.queue)], ['From', m.from || '<>'], ['Subject', m.subject], ['Size', fmtBytes(m.size)],
      ['Attempts', String(m.attempts)], ['Created (UTC)', fmtTime(m.created_at)], ['Next attempt (UTC)', fmtTime(m.next_attempt_at)],
      ['Last error', m.last_error || '—'],
    ].map(([k, v]) => [h('dt', null, k), h('dd', { dataset: { field: k } }, v)]));
    const actions = h('div', { class: 'actions', id: 'message-actions' },
      (ACTIONS[m.queue] || []).map((a) => adminButton(LABELS[a], () => act(a), { dataset: { action: a }, class: a === 'delete' ? 'danger' : null })),
      h('button', { type: 'button', id: 'download-eml', onclick: download }, 'Download .eml'));
    const recipients = table('Recipients', ['Address', 'Status', 'Attempts', 'Last attempt (UTC)', 'Next attempt (UTC)', 'Last error']);
    for (const r of m.recipients) {
      recipients.tbody.append(h('tr', null, h('td', null, r.address), h('td', null, stateBadge(r.status)), h('td', { class: 'num' }, String(r.attempts)),
        h('td', null, fmtTime(r.last_attempt_at)), h('td', null, fmtTime(r.next_attempt_at)), h('td', { class: 'error-text' }, r.last_error || '')));
    }
    const headers = table('Headers, in message order', ['Name', 'Value']);
    for (const [name, value] of m.headers) headers.tbody.append(h('tr', null, h('th', { scope: 'row' }, name), h('td', { class: 'header-value' }, value)));
    const rawBlock = h('pre', { class: 'raw', id: 'raw-message', tabindex: '0', 'aria-label': 'Raw message source' }, raw);
    clear(body, summary, actions,
      section('Recipients', recipients.wrap),
      section('Timeline', timelineTable(m.events, 'Events of this message, newest first')),
      section('Headers', headers.wrap),
      section('Raw message', rawBlock));
  }

  const stream = new LiveStream('/api/queue/ws', {
    onFrames(frames) {
      if (!frames.some((f) => f.type === 'queue_event' && f.data.message_id === id)) return;
      clearTimeout(refreshTimer);
      refreshTimer = setTimeout(() => load().catch((e) => showError(e, 'Refreshing')), 300);
    },
    async poll() { await load(); },
    pollMs: 15000,
  });
  await load();
  stream.start();
}
