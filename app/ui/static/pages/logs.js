// Logs: system log records (minimum level) or message events (type, message id, recipient;
// "Load older" via next_cursor), tailed live from /api/logs/ws with Pause ("N new") and a cap
// of 1,000 rows. The stream starts after the newest row read, so nothing falls in between.

import { api } from '../api.js';
import { clear, fmtTime, h, table } from '../dom.js';
import { LiveStream } from '../live.js';
import { field, messageLink, section, showError } from '../ui.js';

const LEVELS = ['debug', 'info', 'warn', 'error', 'fatal'];
const EVENT_TYPES = ['reception', 'delivery', 'tempfail', 'rejection', 'system'];
const ROW_CAP = 1000;
const PAGE = 100;

export async function render(root, params) {
  const view = params.get('view') === 'events' ? 'events' : 'system';
  const level = LEVELS.includes(params.get('level')) ? params.get('level') : '';
  const eventType = EVENT_TYPES.includes(params.get('event_type')) ? params.get('event_type') : '';
  const messageId = params.get('message_id') || '';
  const recipient = params.get('recipient') || '';

  const tabs = h('nav', { class: 'tabs', 'aria-label': 'Log views' },
    h('a', { href: '/ui/logs', class: 'tab', 'aria-current': view === 'system' ? 'page' : null }, 'System log'),
    h('a', { href: '/ui/logs?view=events', class: 'tab', 'aria-current': view === 'events' ? 'page' : null }, 'Message events'));

  let form;
  if (view === 'system') {
    const select = h('select', { name: 'level' }, h('option', { value: '' }, 'all'), LEVELS.map((l) => h('option', { value: l, selected: l === level }, l)));
    form = h('form', { class: 'filters', method: 'get', action: '/ui/logs', 'aria-label': 'Filter the system log' },
      field('Minimum level', select), h('div', { class: 'filter-buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Apply')));
  } else {
    const select = h('select', { name: 'event_type' }, h('option', { value: '' }, 'all'), EVENT_TYPES.map((t) => h('option', { value: t, selected: t === eventType }, t)));
    form = h('form', { class: 'filters', method: 'get', action: '/ui/logs', 'aria-label': 'Filter the message events' },
      h('input', { type: 'hidden', name: 'view', value: 'events' }),
      field('Event type', select), field('Message ID', h('input', { type: 'search', name: 'message_id', value: messageId })),
      field('Recipient (exact)', h('input', { type: 'search', name: 'recipient', value: recipient })),
      h('div', { class: 'filter-buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Apply')));
  }
  form.addEventListener('submit', () => { for (const i of form.querySelectorAll('input, select')) if (!i.value) i.disabled = true; });

  const columns = view === 'system' ? ['Time (UTC)', 'Level', 'Logger', 'Process', 'Message']
    : ['Time (UTC)', 'Type', 'Message', 'Sender', 'Recipient', 'Remote host', 'SMTP code', 'Details'];
  const { wrap, tbody, table: tableEl } = table(view === 'system' ? 'System log, newest first' : 'Message events, newest first', columns);
  tableEl.id = 'logs-table';
  const pause = h('button', { type: 'button', id: 'pause-live', 'aria-pressed': 'false' }, 'Pause live updates');
  const older = h('button', { type: 'button', id: 'load-older', hidden: true }, 'Load older');
  const shown = new Set();
  let paused = false;
  let held = [];
  let olderCursor = null;

  function rowOf(item) {
    if (view === 'system') {
      return h('tr', { dataset: { id: String(item.id), level: item.level } }, h('td', null, fmtTime(item.timestamp)),
        h('td', null, h('span', { class: `badge level-${item.level}` }, item.level)), h('td', null, item.logger),
        h('td', null, item.process), h('td', { class: 'log-message' }, item.message));
    }
    return h('tr', { dataset: { id: String(item.id), eventType: item.event_type } }, h('td', null, fmtTime(item.timestamp)),
      h('td', null, h('span', { class: `badge event-${item.event_type}` }, item.event_type)),
      h('td', null, item.message_id ? messageLink(item.message_id) : ''), h('td', null, item.sender || ''),
      h('td', null, item.recipient || ''), h('td', null, item.delivery_host || ''), h('td', { class: 'num' }, item.smtp_code ?? ''),
      h('td', { class: 'log-message' }, item.message || ''));
  }
  function matches(item) {
    if (view === 'system') return true; // the stream applies the level
    return (!messageId || item.message_id === messageId) && (!recipient || item.recipient === recipient);
  }
  /** Newest first at the top; each id once; at most ROW_CAP rows. */
  function addNew(items) {
    const fresh = items.filter((i) => !shown.has(i.id) && matches(i));
    for (const item of fresh.sort((a, b) => a.id - b.id)) {
      shown.add(item.id);
      tbody.prepend(rowOf(item));
    }
    while (tbody.children.length > ROW_CAP) {
      shown.delete(Number(tbody.lastElementChild.dataset.id));
      tbody.lastElementChild.remove();
    }
  }
  function addOlder(items) {
    for (const item of items) {
      if (shown.has(item.id)) continue;
      shown.add(item.id);
      tbody.append(rowOf(item));
    }
  }
  function setPaused(value) {
    paused = value;
    pause.setAttribute('aria-pressed', String(paused));
    if (!paused) { addNew(held); held = []; newCount.textContent = ''; }
    pause.textContent = paused ? 'Resume live updates' : 'Pause live updates';
  }
  pause.addEventListener('click', () => setPaused(!paused));

  async function fetchNewest() {
    if (view === 'system') {
      return (await api('/api/logs', { query: { level, limit: PAGE } })).data.logs;
    }
    const { data } = await api('/api/logs/messages', { query: { event_type: eventType, message_id: messageId, recipient, limit: PAGE } });
    return data;
  }
  older.addEventListener('click', async () => {
    try {
      const { data } = await api('/api/logs/messages', { query: { event_type: eventType, message_id: messageId, recipient, limit: PAGE, cursor: olderCursor } });
      addOlder(data.logs);
      olderCursor = data.next_cursor;
      older.hidden = !olderCursor;
    } catch (error) {
      showError(error, 'Loading older events');
    }
  });

  const newCount = h('span', { class: 'new-count', id: 'new-count' });
  clear(root, tabs, form,
    section(view === 'system' ? 'System log' : 'Message events', h('div', { class: 'actions' }, pause, newCount), wrap, older));

  let initial = [];
  try {
    const data = await fetchNewest();
    if (view === 'system') initial = data;
    else { initial = data.logs; olderCursor = data.next_cursor; older.hidden = !olderCursor; }
  } catch (error) {
    showError(error, 'Loading the logs');
  }
  addOlder(initial);
  const newest = initial.reduce((max, i) => Math.max(max, i.id), 0);
  const since = view === 'system' ? { since_log: newest } : { since_event: newest };
  // Without any row, the stream starts live (from its handshake on).
  const stream = new LiveStream('/api/logs/ws', {
    params: view === 'system' ? { type: 'log', level } : { type: 'message_event', event_type: eventType },
    resume: newest ? since : {},
    onFrames(frames) {
      const items = frames.filter((f) => f.type === 'log' || f.type === 'message_event').map((f) => f.data);
      if (paused) {
        for (const i of items) if (!shown.has(i.id) && matches(i) && !held.some((x) => x.id === i.id)) held.push(i);
        newCount.textContent = `${held.length} new`;
        pause.textContent = `Resume live updates (${held.length} new)`;
        return;
      }
      newCount.textContent = '';
      addNew(items);
    },
    async poll() {
      const items = await fetchNewest();
      addNew(view === 'system' ? items : items.logs);
    },
  });
  stream.start();
}
