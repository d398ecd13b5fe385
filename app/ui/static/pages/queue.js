// Queue: tabs with counts, filters in the query string, keyset pages ("1–100 of 157", Next via
// the Link header, Previous via a stack of cursors), per-row and selected-row actions, bulk
// actions on everything matching (dry run first), rows badged in place by live queue events.

import { api, nextCursor } from '../api.js';
import { FILTER_NAMES, bulkAction } from '../bulk.js';
import { clear, fmtBytes, fmtNumber, fmtTime, h, table } from '../dom.js';
import { LiveStream } from '../live.js';
import { adminButton, confirmDialog, field, messageLink, needsAdminNote, section, showError, stateBadge, toast } from '../ui.js';

const TABS = ['all', 'pending', 'deferred', 'held', 'failed'];
const PAGE_SIZES = [25, 50, 100, 250];
// Which actions apply to a message in each state (API.md §2.2: anything else is a 409).
const ROW_ACTIONS = {
  pending: ['hold', 'delete'],
  deferred: ['retry', 'hold', 'delete'],
  held: ['release', 'delete'],
  failed: ['retry', 'delete'],
};
// Bulk endpoints and the queue types they accept.
const BULK = {
  retry: ['deferred', 'failed', 'all'],
  hold: ['pending', 'deferred', 'all'],
  release: ['held'],
  flush: ['all', 'pending', 'deferred', 'held', 'failed'],
};
const LABELS = { retry: 'Retry', hold: 'Hold', release: 'Release', delete: 'Delete', flush: 'Flush' };

async function actOn(action, id) {
  if (action === 'delete') return api(`/api/queue/message/${encodeURIComponent(id)}`, { method: 'DELETE' });
  return api(`/api/queue/message/${encodeURIComponent(id)}/${action}`, { method: 'POST' });
}

export async function render(root, params) {
  const state = TABS.includes(params.get('state')) ? params.get('state') : 'all';
  const filters = Object.fromEntries(FILTER_NAMES.map((n) => [n, params.get(n) || '']));
  const limit = PAGE_SIZES.includes(Number(params.get('limit'))) ? Number(params.get('limit')) : 100;

  const tabLinks = TABS.map((tab) => {
    const query = new URLSearchParams({ ...Object.fromEntries(Object.entries(filters).filter(([, v]) => v)), ...(tab === 'all' ? {} : { state: tab }), ...(limit !== 100 ? { limit } : {}) });
    const q = query.toString();
    return h('a', { href: `/ui/queue${q ? `?${q}` : ''}`, class: 'tab', dataset: { state: tab }, 'aria-current': tab === state ? 'page' : null },
      `${tab[0].toUpperCase()}${tab.slice(1)} `, h('span', { class: 'tab-count', dataset: { state: tab === 'all' ? 'total' : tab } }, ''));
  });
  const tabs = h('nav', { class: 'tabs', 'aria-label': 'Queue states' }, tabLinks);

  const inputs = {
    sender: h('input', { type: 'search', name: 'sender', value: filters.sender }),
    recipient: h('input', { type: 'search', name: 'recipient', value: filters.recipient }),
    domain: h('input', { type: 'search', name: 'domain', value: filters.domain }),
    after: h('input', { type: 'text', name: 'after', value: filters.after, placeholder: '2026-01-28T00:00:00Z' }),
    before: h('input', { type: 'text', name: 'before', value: filters.before, placeholder: '2026-01-28T23:59:59Z' }),
  };
  const sizeSelect = h('select', { name: 'limit' }, PAGE_SIZES.map((n) => h('option', { value: n, selected: n === limit }, String(n))));
  const filterForm = h('form', { class: 'filters', method: 'get', action: '/ui/queue', role: 'search', 'aria-label': 'Filter the queue' },
    state === 'all' ? null : h('input', { type: 'hidden', name: 'state', value: state }),
    field('Sender contains', inputs.sender), field('Recipient contains', inputs.recipient),
    field('Recipient domain', inputs.domain), field('Created after (UTC)', inputs.after), field('Created before (UTC)', inputs.before),
    field('Page size', sizeSelect),
    h('div', { class: 'filter-buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Apply filters'),
      h('a', { href: state === 'all' ? '/ui/queue' : `/ui/queue?state=${state}`, class: 'button-link' }, 'Clear')));
  // Empty fields stay out of the URL.
  filterForm.addEventListener('submit', () => {
    for (const input of filterForm.querySelectorAll('input, select')) if (!input.value || (input.name === 'limit' && input.value === '100')) input.disabled = true;
  });

  const range = h('p', { class: 'range', id: 'queue-range', 'aria-live': 'polite' });
  const progress = h('p', { class: 'progress', id: 'selection-progress', role: 'status' });
  const { wrap, tbody, table: tableEl } = table(`Messages: ${state} queue`, [
    { label: h('span', { class: 'visually-hidden' }, 'Select') }, 'ID', 'From', 'To', 'Subject', 'Size', 'Attempts', 'Created (UTC)', 'Next attempt (UTC)', 'Last error', 'Actions']);
  tableEl.id = 'queue-table';
  const prev = h('button', { type: 'button', id: 'page-prev', disabled: true }, 'Previous');
  const next = h('button', { type: 'button', id: 'page-next', disabled: true }, 'Next');
  const refresh = h('button', { type: 'button', id: 'refresh' }, 'Refresh');

  const selectAll = h('input', { type: 'checkbox', id: 'select-all', 'aria-label': 'Select every message on this page' });
  tableEl.querySelector('thead th').replaceChildren(selectAll);
  const selected = () => [...tbody.querySelectorAll('input.select-row:checked')].map((c) => c.value);
  selectAll.addEventListener('change', () => { for (const c of tbody.querySelectorAll('input.select-row')) c.checked = selectAll.checked; });

  async function onSelected(action) {
    const ids = selected();
    if (!ids.length) { toast('Select messages first.'); return; }
    if (action === 'delete' && !(await confirmDialog('Delete selected messages', `Delete ${ids.length} message(s)? This cannot be undone.`, `Delete ${ids.length}`, { danger: true }))) return;
    let done = 0;
    const failures = [];
    for (const id of ids) {
      progress.textContent = `${LABELS[action]}: ${done + failures.length + 1} of ${ids.length}…`;
      try { await actOn(action, id); done += 1; } catch (error) { failures.push([id, error]); }
    }
    progress.textContent = `${LABELS[action]}: ${done} of ${ids.length} done${failures.length ? `, ${failures.length} refused` : ''}.`;
    for (const [id, error] of failures) showError(error, `${LABELS[action]} ${id}`);
    // No reload: the rows stay where they are and the live stream badges what happened to
    // them (retried, then delivered...); Refresh shows the listing as it is now.
  }
  const selectionActions = h('div', { class: 'actions', id: 'selection-actions' }, h('span', { class: 'actions-label' }, 'Selected:'),
    ['retry', 'hold', 'release', 'delete'].map((a) => adminButton(`${LABELS[a]} selected`, () => onSelected(a), { dataset: { action: a }, class: a === 'delete' ? 'danger' : null })));
  const matchingActions = h('div', { class: 'actions', id: 'bulk-actions' }, h('span', { class: 'actions-label' }, 'All matching:'),
    Object.entries(BULK).filter(([, types]) => types.includes(state)).map(([a]) => adminButton(`${LABELS[a]} all matching`,
      () => bulkAction(a, state, filters), { dataset: { bulk: a }, class: a === 'flush' ? 'danger' : null })));

  // On a phone the filters start folded (unless some are set): the messages come first.
  const active = FILTER_NAMES.filter((n) => filters[n]).length;
  const narrow = window.matchMedia('(max-width: 40rem)').matches;
  const filterPanel = h('details', { class: 'filter-panel', open: !narrow || active > 0 },
    h('summary', null, active ? `Filters (${active} active)` : 'Filters'), filterForm);

  clear(root, needsAdminNote(), tabs, filterPanel,
    section('Messages', matchingActions, selectionActions, progress, h('div', { class: 'pager' }, range, refresh), wrap,
      h('div', { class: 'pager' }, prev, next)));

  const cursors = [null]; // the cursor of each page shown so far: Previous pops it
  let following = null;
  const rowsById = new Map();

  function row(m) {
    const actionCell = h('td', { class: 'row-actions' }, (ROW_ACTIONS[m.queue] || []).map((a) => adminButton(LABELS[a], () => onRow(a, m.id), { dataset: { action: a }, class: a === 'delete' ? 'danger small' : 'small', 'aria-label': `${LABELS[a]} ${m.id}` })));
    const tr = h('tr', { dataset: { id: m.id, queue: m.queue } },
      h('td', null, h('input', { type: 'checkbox', class: 'select-row', value: m.id, 'aria-label': `Select ${m.id}` })),
      h('td', null, messageLink(m.id), ' ', h('span', { class: 'row-state' }, stateBadge(m.queue)), h('span', { class: 'row-badge' })),
      h('td', null, m.from || '<>'), h('td', null, m.to.join(', ')), h('td', { class: 'subject' }, m.subject),
      h('td', { class: 'num' }, fmtBytes(m.size)), h('td', { class: 'num' }, String(m.attempts)),
      h('td', null, fmtTime(m.created_at)), h('td', null, fmtTime(m.next_attempt_at)),
      h('td', { class: 'error-text' }, m.last_error || ''), actionCell);
    rowsById.set(m.id, tr);
    return tr;
  }

  async function onRow(action, id) {
    if (action === 'delete' && !(await confirmDialog('Delete message', `Delete ${id}? This cannot be undone.`, 'Delete', { danger: true }))) return;
    try {
      const { data } = await actOn(action, id);
      toast(data.message);
    } catch (error) {
      showError(error, `${LABELS[action]} ${id}`);
    }
  }

  async function load(cursor) {
    const query = { ...filters, limit, cursor };
    try {
      const { data, headers } = await api(`/api/queue/${state}`, { query });
      const total = Number(headers.get('X-Total-Count'));
      following = nextCursor(headers);
      rowsById.clear();
      selectAll.checked = false;
      clear(tbody, data.map(row));
      if (!data.length) tbody.append(h('tr', null, h('td', { colspan: 11, class: 'muted' }, 'No message matches.')));
      const first = (cursors.length - 1) * limit + 1;
      range.dataset.total = String(total);
      range.textContent = data.length ? `${fmtNumber(first)}–${fmtNumber(first + data.length - 1)} of ${fmtNumber(total)}` : `0 of ${fmtNumber(total)}`;
      prev.disabled = cursors.length <= 1;
      next.disabled = !following;
    } catch (error) {
      showError(error, 'Loading the queue');
    }
  }
  refresh.addEventListener('click', () => load(cursors[cursors.length - 1]));
  next.addEventListener('click', async () => { if (!following) return; cursors.push(following); await load(following); next.focus(); });
  prev.addEventListener('click', async () => { if (cursors.length <= 1) return; cursors.pop(); await load(cursors[cursors.length - 1]); (prev.disabled ? next : prev).focus(); });

  function showStats(stats) {
    for (const span of tabs.querySelectorAll('.tab-count')) span.textContent = `(${fmtNumber(stats[span.dataset.state])})`;
  }
  /** A change to a row on this page: badge it in place (no reordering). */
  function badge(change) {
    const tr = rowsById.get(change.message_id);
    if (!tr) return;
    tr.classList.add('changed');
    tr.dataset.queue = change.queue || 'gone';
    tr.querySelector('.row-state').replaceChildren(stateBadge(change.queue));
    tr.querySelector('.row-badge').replaceChildren(h('span', { class: 'badge changed-badge' }, change.action));
    const cell = tr.querySelector('.row-actions');
    cell.replaceChildren(...(ROW_ACTIONS[change.queue] || []).map((a) => adminButton(LABELS[a], () => onRow(a, change.message_id), { dataset: { action: a }, class: a === 'delete' ? 'danger small' : 'small', 'aria-label': `${LABELS[a]} ${change.message_id}` })));
  }
  const stream = new LiveStream('/api/queue/ws', {
    onFrames(frames) {
      const stats = frames.filter((f) => f.type === 'queue_stats').pop();
      if (stats) showStats(stats.data);
      for (const f of frames) if (f.type === 'queue_event') badge(f.data);
    },
    async poll() { showStats((await api('/api/queue/stats')).data); },
  });
  await load(null);
  stream.start();
}
