// Bulk actions on everything matching a filter: the server counts first (dry_run=true), the
// dialog shows that count, the exact filter and its CLI and curl equivalents, and only a
// confirmation (typing the count above 100 messages) sends the real call.

import { api, apiUrl } from './api.js';
import { fmtNumber, h, uniqueId } from './dom.js';
import { errorBox, field, fieldError, openDialog, toast } from './ui.js';

export const FILTER_NAMES = ['sender', 'recipient', 'domain', 'after', 'before'];
const TYPE_TO_CONFIRM_ABOVE = 100;
const VERBS = {
  retry: { label: 'Retry', past: 'retried' },
  hold: { label: 'Hold', past: 'held' },
  release: { label: 'Release', past: 'released' },
  flush: { label: 'Flush', past: 'flushed', danger: true },
};

function shellQuote(value) {
  return /^[A-Za-z0-9@._:+=\/-]+$/.test(value) ? value : `'${String(value).replace(/'/g, "'\\''")}'`;
}

/** `flask queue retry --queue deferred --domain example.com` (flush takes the type as argument). */
export function cliEquivalent(action, type, filters) {
  const words = ['flask', 'queue', action];
  words.push(...(action === 'flush' ? [type] : ['--queue', type]));
  for (const name of FILTER_NAMES) if (filters[name]) words.push(`--${name}`, shellQuote(filters[name]));
  return words.join(' ');
}

export function curlEquivalent(action, type, filters) {
  const url = apiUrl(`/api/queue/${type}/${action}`, Object.fromEntries(FILTER_NAMES.map((n) => [n, filters[n]])));
  return `curl -X POST -H "Authorization: Bearer $ELEMTA_API_KEY" ${shellQuote(url.toString())}`;
}

function filterList(type, filters) {
  const rows = [['Queue', type]];
  for (const name of FILTER_NAMES) if (filters[name]) rows.push([name, filters[name]]);
  if (rows.length === 1) rows.push(['Filters', 'none: every message of this queue']);
  return h('dl', { class: 'filter-list' }, rows.map(([k, v]) => [h('dt', null, k), h('dd', null, v)]));
}

/**
 * Count with the server, then ask. Resolves to the real call's count, or null when cancelled.
 * An error of the dry run itself (403, 429...) is shown and nothing happens.
 */
export async function bulkAction(action, type, filters) {
  const verb = VERBS[action];
  const query = Object.fromEntries(FILTER_NAMES.map((n) => [n, filters[n]]));
  let count;
  try {
    count = (await api(`/api/queue/${type}/${action}`, { method: 'POST', query: { ...query, dry_run: 'true' } })).data.count;
  } catch (error) {
    await openDialog(`${verb.label} all matching messages`, (dialog, close) => {
      dialog.append(errorBox(error, 'Counting failed'),
        h('div', { class: 'dialog-buttons' }, h('button', { type: 'button', autofocus: true, onclick: () => close(null) }, 'Close')));
    });
    return null;
  }
  return openDialog(`${verb.label} all matching messages`, (dialog, close) => {
    dialog.classList.add('bulk-dialog');
    const countText = h('p', { class: 'bulk-count', dataset: { count: String(count) } },
      count === 0 ? `No message matches: nothing would be ${verb.past}.`
        : `${fmtNumber(count)} message${count === 1 ? '' : 's'} would be ${verb.past}.`);
    const cliId = uniqueId('cli');
    dialog.append(countText,
      h('p', null, 'Counted by the server (dry run) for this filter:'), filterList(type, filters),
      h('p', { id: cliId }, 'The same from the command line:'),
      h('pre', { class: 'cli', 'aria-labelledby': cliId }, h('code', { class: 'cli-flask' }, cliEquivalent(action, type, filters))),
      h('pre', { class: 'cli', 'aria-label': 'The same with curl' }, h('code', { class: 'cli-curl' }, curlEquivalent(action, type, filters))));
    const errors = h('div', { class: 'dialog-errors', role: 'alert' });
    const cancel = h('button', { type: 'button', onclick: () => close(null) }, 'Cancel');
    const confirm = h('button', { type: 'button', class: verb.danger ? 'danger confirm' : 'primary confirm' },
      `${verb.label} ${fmtNumber(count)} message${count === 1 ? '' : 's'}`);
    let typed = null;
    if (count > TYPE_TO_CONFIRM_ABOVE) {
      typed = h('input', { type: 'text', inputmode: 'numeric', autocomplete: 'off', class: 'type-count' });
      dialog.append(field(`Type ${count} to confirm`, typed, `More than ${TYPE_TO_CONFIRM_ABOVE} messages: type the number to confirm.`));
      confirm.disabled = true;
      typed.addEventListener('input', () => { confirm.disabled = typed.value.trim() !== String(count); });
    }
    if (count === 0) confirm.disabled = true;
    confirm.addEventListener('click', async () => {
      if (typed && typed.value.trim() !== String(count)) {
        fieldError(typed, `Type ${count} to confirm.`);
        return;
      }
      confirm.disabled = true;
      errors.replaceChildren();
      try {
        const { data } = await api(`/api/queue/${type}/${action}`, { method: 'POST', query });
        toast(`${data.message} (${type} queue)`);
        close(data.count);
      } catch (error) {
        errors.append(errorBox(error, `${verb.label} failed`));
        confirm.disabled = false;
      }
    });
    dialog.append(errors, h('div', { class: 'dialog-buttons' }, cancel, confirm));
    (typed || cancel).autofocus = true;
  }, { wide: true });
}
