// Building the DOM without HTML strings: every value from the API becomes a text node.
// (The page's CSP has require-trusted-types-for 'script': assigning HTML strings would throw.)

const SVG_NS = 'http://www.w3.org/2000/svg';

function apply(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'text') el.textContent = String(value);
    else if (name === 'class') el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else if (name === 'style') throw new Error('style attributes are not allowed by the CSP; use a class');
    else el.setAttribute(name, value === true ? '' : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h('a', {href, class}, 'text', otherNode): an element; strings become text nodes. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  return append(el, children);
}

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  return append(el, children);
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const $ = (selector, root = document) => root.querySelector(selector);

let uid = 0;
export const uniqueId = (prefix) => `${prefix}-${++uid}`;

/** "2026-01-28 12:00:00" (UTC; the column headers say so). */
export function fmtTime(iso) {
  if (!iso) return '—';
  return String(iso).replace('T', ' ').replace(/Z$/, '');
}

export function fmtNumber(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US');
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

/** A table with a caption and column headers (scope=col) in a keyboard-scrollable region. */
export function table(caption, columns, { id, captionHidden = false } = {}) {
  const captionId = uniqueId('caption');
  const tbody = h('tbody');
  const tableEl = h('table', { id },
    h('caption', { id: captionId, class: captionHidden ? 'visually-hidden' : null }, caption),
    h('thead', null, h('tr', null, columns.map((c) => h('th', { scope: 'col', class: c.class }, c.label ?? c)))),
    tbody);
  const wrap = h('div', { class: 'table-wrap', role: 'region', tabindex: '0', 'aria-labelledby': captionId }, tableEl);
  return { wrap, table: tableEl, tbody };
}
