// The delivery chart: hand-written SVG stacked bars (at most 30 buckets), oldest to newest,
// UTC, the current partial bucket hatched. Every bar carries data-value; a table says the same.

import { fmtNumber, h, svg, table, uniqueId } from './dom.js';

export const OUTCOMES = ['delivered', 'failed', 'deferred'];
const SCALE_WORDS = { hour: 'hour', day: 'day', week: 'week', month: 'month' };
const WIDTH = 720;
const HEIGHT = 240;
const PAD = { top: 12, right: 8, bottom: 28, left: 44 };

function niceMax(value) {
  if (value <= 4) return 4;
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * magnitude >= value) return step * magnitude;
  }
  return 10 * magnitude;
}

export function successRate(stats) {
  const all = stats.total_delivered + stats.total_failed + stats.total_deferred;
  return all === 0 ? 'no outcomes' : `${stats.success_rate.toFixed(1)} % delivered`;
}

function summary(stats, buckets, scale) {
  const busiest = buckets.reduce((best, b) => {
    const sum = b.delivered + b.failed + b.deferred;
    return sum > best.sum ? { label: b.label, sum } : best;
  }, { label: null, sum: 0 });
  let text = `Delivery outcomes per ${SCALE_WORDS[scale]}, ${buckets.length} buckets, oldest first (UTC): `
    + `${fmtNumber(stats.total_delivered)} delivered, ${fmtNumber(stats.total_failed)} failed, `
    + `${fmtNumber(stats.total_deferred)} deferred; ${successRate(stats)}.`;
  if (busiest.label) text += ` Busiest: ${busiest.label} with ${fmtNumber(busiest.sum)}.`;
  return `${text} The last bucket is still in progress.`;
}

/** The SVG chart for GET /api/stats/delivery's answer. */
export function deliveryChart(stats, scale) {
  const buckets = [...stats.data].reverse(); // the API sends newest first
  const titleId = uniqueId('chart-title');
  const descId = uniqueId('chart-desc');
  const hatchId = uniqueId('hatch');
  const max = niceMax(Math.max(0, ...buckets.map((b) => b.delivered + b.failed + b.deferred)));
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const slot = plotW / buckets.length;
  const barW = Math.max(2, slot * 0.7);
  const y = (v) => PAD.top + plotH - (v / max) * plotH;
  const root = svg('svg', {
    class: 'chart', viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: 'img',
    'aria-labelledby': `${titleId} ${descId}`, dataset: { scale, buckets: String(buckets.length) },
  },
  svg('title', { id: titleId }, `Delivery outcomes per ${SCALE_WORDS[scale]} (UTC)`),
  svg('desc', { id: descId }, summary(stats, buckets, scale)),
  svg('defs', null, svg('pattern', { id: hatchId, width: 6, height: 6, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
    svg('line', { x1: 0, y1: 0, x2: 0, y2: 6, class: 'hatch-line' }))));
  // Grid and axis: 0, half and max.
  for (const value of [0, max / 2, max]) {
    root.append(svg('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: 'grid' }),
      svg('text', { x: PAD.left - 6, y: y(value) + 4, class: 'axis', 'text-anchor': 'end' }, fmtNumber(value)));
  }
  const labelEvery = Math.ceil(buckets.length / 8);
  buckets.forEach((bucket, index) => {
    const partial = index === buckets.length - 1;
    const x = PAD.left + index * slot + (slot - barW) / 2;
    const group = svg('g', { class: partial ? 'bucket partial' : 'bucket', dataset: { label: bucket.label, start: bucket.start, partial: String(partial) } },
      svg('title', null, `${bucket.label} UTC${partial ? ' (in progress)' : ''}: ${bucket.delivered} delivered, ${bucket.failed} failed, ${bucket.deferred} deferred`));
    let base = 0;
    for (const outcome of OUTCOMES) {
      const value = bucket[outcome];
      group.append(svg('rect', {
        class: `bar ${outcome}`, x, width: barW, y: y(base + value), height: Math.max(0, y(base) - y(base + value)),
        dataset: { value: String(value), outcome },
      }));
      base += value;
    }
    if (partial) {
      group.append(svg('rect', { class: 'partial-mark', x: x - 1, width: barW + 2, y: PAD.top, height: plotH, fill: `url(#${hatchId})` }));
    }
    if (index % labelEvery === 0 || partial) {
      group.append(svg('text', { x: x + barW / 2, y: HEIGHT - 10, class: 'axis', 'text-anchor': 'middle' }, shortLabel(bucket.label, scale)));
    }
    root.append(group);
  });
  return root;
}

function shortLabel(label, scale) {
  if (scale === 'day' || scale === 'week') return label.slice(5); // MM-DD
  return label;
}

export function legend() {
  return h('ul', { class: 'legend' }, OUTCOMES.map((o) => h('li', null, h('span', { class: `swatch ${o}`, 'aria-hidden': 'true' }), o)),
    h('li', null, h('span', { class: 'swatch partial', 'aria-hidden': 'true' }), 'in progress (partial bucket)'));
}

/** The table alternative: the same buckets, oldest first. */
export function deliveryTable(stats, scale) {
  const { wrap, tbody } = table(`Delivery outcomes per ${SCALE_WORDS[scale]} (UTC), oldest first`,
    [`${SCALE_WORDS[scale][0].toUpperCase()}${SCALE_WORDS[scale].slice(1)} (UTC)`, 'Delivered', 'Failed', 'Deferred'], { id: 'delivery-table' });
  const buckets = [...stats.data].reverse();
  buckets.forEach((bucket, index) => {
    const partial = index === buckets.length - 1;
    tbody.append(h('tr', { dataset: { label: bucket.label } },
      h('th', { scope: 'row' }, partial ? `${bucket.label} (in progress)` : bucket.label),
      OUTCOMES.map((o) => h('td', { class: 'num' }, fmtNumber(bucket[o])))));
  });
  return wrap;
}
