// Overview: queue tiles (live), the delivery chart with its table, recent errors, the last 20
// queue events; admin: "Retry all deferred" and "Send test".

import { api } from '../api.js';
import { bulkAction } from '../bulk.js';
import { deliveryChart, deliveryTable, legend, successRate } from '../chart.js';
import { clear, fmtNumber, fmtTime, h, table } from '../dom.js';
import { LiveStream } from '../live.js';
import { sendTestDialog } from '../sendtest.js';
import { adminButton, messageLink, needsAdminNote, section, showError, stateBadge } from '../ui.js';

const STATES = ['pending', 'deferred', 'held', 'failed', 'total'];
const SCALES = [['hour', 'Hour'], ['day', 'Day'], ['week', 'Week'], ['month', 'Month']];
const CHART_REFRESH_MS = 30000;
const RECENT_EVENTS = 20;

export async function render(root) {
  const tiles = h('ul', { class: 'tiles', id: 'queue-tiles' }, STATES.map((state) => h('li', null,
    h('a', { class: `tile tile-${state}`, href: state === 'total' ? '/ui/queue' : `/ui/queue?state=${state}`, dataset: { state } },
      h('span', { class: 'tile-count', dataset: { count: '' } }, '…'), h('span', { class: 'tile-label' }, state)))));
  const chartBox = h('div', { class: 'chart-box', id: 'delivery-chart' });
  const tableBox = h('div', { class: 'chart-table', id: 'delivery-table-box', hidden: true });
  const totals = h('p', { class: 'totals', id: 'delivery-totals' });
  const tableToggle = h('button', { type: 'button', 'aria-expanded': 'false', 'aria-controls': 'delivery-table-box', id: 'table-toggle' }, 'Show as table');
  tableToggle.addEventListener('click', () => {
    const show = tableBox.hidden;
    tableBox.hidden = !show;
    tableToggle.setAttribute('aria-expanded', String(show));
    tableToggle.textContent = show ? 'Hide table' : 'Show as table';
  });
  const scalePicker = h('fieldset', { class: 'scale-picker' }, h('legend', null, 'Time scale'),
    SCALES.map(([value, label], index) => h('label', null,
      h('input', { type: 'radio', name: 'timeScale', value, checked: index === 0 }), ` ${label}`)));
  const errorsList = h('div', { id: 'recent-errors' });
  const events = h('ol', { class: 'events', id: 'recent-events', reversed: true });
  const eventsEmpty = h('p', { class: 'muted', id: 'recent-events-empty' }, 'No queue changes since this page was opened.');

  const actions = h('div', { class: 'actions' },
    adminButton('Retry all deferred', async () => { await bulkAction('retry', 'deferred', {}); }, { id: 'retry-all-deferred' }),
    adminButton('Send test', async () => { await sendTestDialog(); }, { id: 'send-test' }, { sendRoleToo: true }));

  clear(root, needsAdminNote(),
    section('Queue', tiles, actions),
    section('Delivery', scalePicker, totals, legend(), chartBox, tableToggle, tableBox),
    section('Recent errors', errorsList),
    section('Recent queue changes', eventsEmpty, events));

  let scale = 'hour';
  let lastChart = 0;
  let chartTimer = null;
  async function loadChart() {
    lastChart = Date.now();
    try {
      const { data } = await api('/api/stats/delivery', { query: { timeScale: scale } });
      clear(chartBox, deliveryChart(data, scale));
      clear(tableBox, deliveryTable(data, scale));
      clear(totals,
        h('span', { dataset: { total: 'delivered' } }, `Delivered ${fmtNumber(data.total_delivered)}`), ' · ',
        h('span', { dataset: { total: 'failed' } }, `Failed ${fmtNumber(data.total_failed)}`), ' · ',
        h('span', { dataset: { total: 'deferred' } }, `Deferred ${fmtNumber(data.total_deferred)}`), ' · ',
        h('span', { dataset: { total: 'rate' } }, successRate(data)));
      renderErrors(data.recent_errors);
    } catch (error) {
      showError(error, 'Delivery statistics');
    }
  }
  function renderErrors(items) {
    if (!items.length) { clear(errorsList, h('p', { class: 'muted' }, 'No failed or deferred outcome.')); return; }
    const { wrap, tbody } = table('The 10 most recent failed or deferred outcomes', ['Time (UTC)', 'Message', 'Recipient', 'Outcome', 'Error']);
    for (const e of items) {
      tbody.append(h('tr', null, h('td', null, fmtTime(e.timestamp)), h('td', null, messageLink(e.message_id)),
        h('td', null, e.recipient), h('td', null, stateBadge(e.status)), h('td', { class: 'error-text' }, e.error || '')));
    }
    clear(errorsList, wrap);
  }
  /** Outcomes change the chart: refresh it, at most every 30 s. */
  function chartSoon() {
    if (chartTimer) return;
    const wait = Math.max(0, CHART_REFRESH_MS - (Date.now() - lastChart));
    chartTimer = setTimeout(() => { chartTimer = null; loadChart(); }, wait);
  }
  scalePicker.addEventListener('change', (event) => { scale = event.target.value; loadChart(); });

  function showStats(stats) {
    for (const state of STATES) {
      const count = tiles.querySelector(`[data-state="${state}"] .tile-count`);
      count.textContent = fmtNumber(stats[state]);
      count.dataset.count = String(stats[state]);
    }
  }
  function showEvents(items) {
    for (const item of items) {
      eventsEmpty.hidden = true;
      events.prepend(h('li', { dataset: { messageId: item.message_id, action: item.action } },
        h('span', { class: 'event-time' }, new Date().toISOString().slice(11, 19)), ' ',
        messageLink(item.message_id), ' ', h('strong', { class: 'action' }, item.action), ' → ', stateBadge(item.queue)));
      while (events.children.length > RECENT_EVENTS) events.lastElementChild.remove();
    }
  }
  const stream = new LiveStream('/api/queue/ws', {
    onFrames(frames) {
      const stats = frames.filter((f) => f.type === 'queue_stats').pop();
      if (stats) showStats(stats.data);
      const changes = frames.filter((f) => f.type === 'queue_event').map((f) => f.data);
      showEvents(changes);
      if (changes.some((c) => ['delivered', 'failed', 'deferred'].includes(c.action))) chartSoon();
    },
    async poll() {
      showStats((await api('/api/queue/stats')).data);
    },
  });
  showStats((await api('/api/queue/stats')).data);
  await loadChart();
  stream.start();
}
