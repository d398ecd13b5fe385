// Delivery control (API.md §16): destination policies with their live state, the suppression
// list (search, add, remove, CSV export and import) and rules (create with an expiry, delete,
// live hit counts). The state and the rules are re-read every 10 s; counters are not announced.

import { api, isAdmin, nextCursor } from '../api.js';
import { clear, fmtNumber, fmtTime, h, table } from '../dom.js';
import { adminButton, confirmDialog, field, fieldError, needsAdminNote, section, showError, toast } from '../ui.js';

const POLL_MS = 10000;
const PAGE_SIZE = 50;
const ACTIONS = {
  hold: 'Hold: matching mail is held (queued now and new) until released',
  defer: 'Defer: matching mail waits until the rule expires',
  bounce: 'Bounce: matching queued recipients fail now (a DSN to the sender), new mail is refused',
};

/** The limit key a policy's state is kept under (API.md §16.2); the default has one per destination. */
function limitKey(policy) {
  if (policy.kind === 'mx') return `mx:${policy.pattern}`;
  if (policy.kind === 'domain') return policy.pattern.startsWith('*.') ? `domain:${policy.pattern}` : `dest:${policy.pattern}`;
  return null;
}

const limitText = (n) => (n === null || n === undefined ? 'no limit' : fmtNumber(n));

function stateText(s) {
  if (!s) return 'idle';
  const parts = [`${s.connections} connection(s)`, `${s.sent_this_minute} this minute`, `${s.sent_this_hour} this hour`];
  if (s.paused_until) parts.push(`paused until ${fmtTime(s.paused_until)}`);
  if (s.backoff_level) parts.push(`backoff level ${s.backoff_level}`);
  return parts.join(', ');
}

function filterText(rule) {
  return [['sender', rule.sender], ['recipient', rule.recipient], ['domain', rule.domain]]
    .filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(', ');
}

/** "2026-01-28T12:00:00Z" `days` from now (whole seconds), for an optional expiry field. */
function daysFromNow(days) {
  const when = new Date(Date.now() + Number(days) * 86400000);
  when.setUTCMilliseconds(0);
  return when.toISOString().replace('.000Z', 'Z');
}

function policiesPart() {
  const list = h('div', { id: 'policies-list' });
  const states = h('div', { id: 'destination-states' });
  const updated = h('p', { class: 'muted', id: 'state-updated' });
  let lastSignature = null;

  async function load() {
    let policies;
    let destinations;
    try {
      [policies, destinations] = await Promise.all([
        api('/api/policies').then((r) => r.data),
        api('/api/policies/state').then((r) => r.data.destinations)]);
    } catch (error) {
      if (error.status !== 401) showError(error, 'Loading the policies');
      return;
    }
    const signature = JSON.stringify([policies, destinations]);
    updated.textContent = `State read at ${fmtTime(new Date().toISOString().replace(/\.\d+Z$/, 'Z'))} UTC; refreshed every ${POLL_MS / 1000} s.`;
    if (signature === lastSignature) return; // unchanged: keep focus and scroll position
    lastSignature = signature;
    const byKey = new Map(destinations.map((d) => [d.destination, d]));
    const p = table('Destination policies', ['Kind', 'Pattern', 'Connections', 'Messages per connection', 'Per minute', 'Per hour', 'TLS', 'Now']);
    for (const policy of policies) {
      const key = limitKey(policy);
      p.tbody.append(h('tr', { dataset: { policy: policy.pattern, kind: policy.kind } },
        h('td', null, policy.kind), h('td', { class: 'mono' }, policy.kind === 'default' ? 'every other destination' : policy.pattern),
        h('td', { class: 'num' }, limitText(policy.max_connections)), h('td', { class: 'num' }, limitText(policy.messages_per_connection)),
        h('td', { class: 'num' }, limitText(policy.messages_per_minute)), h('td', { class: 'num' }, limitText(policy.messages_per_hour)),
        h('td', null, policy.require_tls ? 'required' : 'opportunistic'),
        h('td', { class: 'policy-now' }, key ? stateText(byKey.get(key)) : `${destinations.filter((d) => d.destination.startsWith('dest:')).length} destination(s) active`)));
    }
    clear(list, policies.length ? p.wrap : h('p', { id: 'no-policies' },
      'No policy: every destination gets ELEMTA_MAX_CONNECTIONS_PER_DOMAIN connections and no rate limit. Add one with flask policy add or POST /api/policies.'));

    const s = table('Destinations limited or throttled now', ['Destination', 'Backoff level', 'Paused until (UTC)', 'Connections', 'This minute', 'This hour', 'Throttles', 'Last throttling reply']);
    for (const d of destinations) {
      s.tbody.append(h('tr', { dataset: { destination: d.destination, level: d.backoff_level } },
        h('td', { class: 'mono' }, d.destination),
        h('td', { class: 'num' }, d.backoff_level ? `${d.backoff_level} (throttled)` : '0'),
        h('td', null, d.paused_until ? fmtTime(d.paused_until) : 'not paused'),
        h('td', { class: 'num' }, String(d.connections)), h('td', { class: 'num' }, String(d.sent_this_minute)),
        h('td', { class: 'num' }, String(d.sent_this_hour)), h('td', { class: 'num' }, String(d.throttles)),
        h('td', { class: 'error-text' }, d.last_reply || '')));
    }
    clear(states, destinations.length ? s.wrap : h('p', { id: 'no-destinations' }, 'No destination is limited or throttled right now.'));
  }

  return {
    load,
    node: section('Destination policies', list,
      h('h3', null, 'Live state'), states, updated),
  };
}

function suppressionsPart() {
  const address = h('input', { type: 'search', name: 'address', autocomplete: 'off' });
  const source = h('select', { name: 'source' }, h('option', { value: '' }, 'any'),
    ['bounce', 'operator', 'import'].map((v) => h('option', { value: v }, v)));
  const expired = h('input', { type: 'checkbox', name: 'include_expired', id: 'include-expired' });
  const search = h('form', { class: 'filters', role: 'search', 'aria-label': 'Search the suppression list', id: 'suppression-search' },
    field('Address contains', address), field('Source', source),
    h('div', { class: 'field checkbox-field' }, h('label', { for: 'include-expired' }, expired, ' Include expired')),
    h('div', { class: 'filter-buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Search'),
      h('button', { type: 'button', id: 'export-csv', onclick: exportCsv }, 'Export CSV')));
  const range = h('p', { class: 'range', id: 'suppressions-range' });
  const list = h('div', { id: 'suppressions-list' });
  const more = h('button', { type: 'button', id: 'suppressions-more', hidden: true }, 'Load more');
  let cursor = null;
  let shown = 0;

  const newAddress = h('input', { type: 'email', name: 'address', required: true, autocomplete: 'off', maxlength: 320 });
  const reason = h('input', { type: 'text', name: 'reason', maxlength: 1000 });
  const days = h('input', { type: 'number', name: 'expires_days', min: 1, max: 36500, inputmode: 'numeric' });
  const add = adminButton('Suppress address', () => {}, { id: 'add-suppression' });
  add.type = 'submit';
  const addForm = h('form', { class: 'filters', id: 'add-suppression-form', 'aria-label': 'Suppress an address' },
    field('Address', newAddress), field('Reason (optional)', reason), field('Expires after (days, optional)', days),
    h('div', { class: 'filter-buttons' }, add));
  addForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!isAdmin()) return;
    fieldError(newAddress, null);
    fieldError(days, null);
    try {
      const body = { address: newAddress.value.trim(), reason: reason.value.trim(), expires_at: days.value ? daysFromNow(days.value) : null };
      const { data } = await api('/api/suppressions', { method: 'POST', body });
      toast(`${data.address} suppressed.`);
      addForm.reset();
      await load(true);
    } catch (error) {
      if (error.details?.address) fieldError(newAddress, [].concat(error.details.address).join(' '));
      else if (error.details?.expires_at) fieldError(days, [].concat(error.details.expires_at).join(' '));
      else if (error.status === 409) fieldError(newAddress, error.message);
      else showError(error, 'Suppressing the address');
    }
  });

  const file = h('input', { type: 'file', name: 'csv', accept: '.csv,text/csv' });
  const importButton = adminButton('Import CSV', () => {}, { id: 'import-csv' });
  importButton.type = 'submit';
  const importForm = h('form', { class: 'filters', id: 'import-form', 'aria-label': 'Import addresses from CSV' },
    field('CSV file', file, 'A header line naming address (optional reason, expires_at); an export is accepted. One bad row refuses the whole file.'),
    h('div', { class: 'filter-buttons' }, importButton));
  importForm.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!isAdmin()) return;
    fieldError(file, null);
    if (!file.files.length) { fieldError(file, 'Choose a CSV file.'); return; }
    try {
      const { data } = await api('/api/suppressions/import', { method: 'POST', text: await file.files[0].text(), contentType: 'text/csv' });
      toast(`${data.imported} address(es) imported, ${data.skipped} suppressed already.`);
      importForm.reset();
      await load(true);
    } catch (error) {
      if (error.status === 400) fieldError(file, error.describe());
      else showError(error, 'Importing');
    }
  });

  function query() {
    return { address: address.value.trim(), source: source.value, include_expired: expired.checked ? 'true' : undefined };
  }

  async function exportCsv() {
    try {
      const { data } = await api('/api/suppressions/export', { query: query(), as: 'blob' });
      const url = URL.createObjectURL(data);
      const link = h('a', { href: url, download: 'suppressions.csv', class: 'visually-hidden' }, 'download');
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      showError(error, 'Export');
    }
  }

  async function remove(entry) {
    if (!(await confirmDialog('Remove from the suppression list', `Mail to ${entry.address} will be accepted and delivered again.`, `Remove ${entry.address}`, { danger: true }))) return;
    try {
      const { data } = await api(`/api/suppressions/${encodeURIComponent(entry.address)}`, { method: 'DELETE' });
      toast(data.message);
    } catch (error) {
      showError(error, `Removing ${entry.address}`);
    }
    await load(true);
  }

  const t = table('Suppressed addresses, newest first', ['Address', 'Reason', 'Source', 'Created (UTC)', 'Expires (UTC)', 'By', 'Actions']);
  t.table.id = 'suppressions-table';

  async function load(fresh) {
    if (fresh) { cursor = null; shown = 0; t.tbody.replaceChildren(); }
    try {
      const { data, headers } = await api('/api/suppressions', { query: { ...query(), limit: PAGE_SIZE, cursor } });
      for (const e of data) {
        t.tbody.append(h('tr', { dataset: { address: e.address } },
          h('td', { class: 'mono' }, e.address), h('td', { class: 'error-text' }, e.reason), h('td', null, e.source),
          h('td', null, fmtTime(e.created_at)), h('td', null, e.expires_at ? fmtTime(e.expires_at) : 'never'), h('td', null, e.created_by),
          h('td', { class: 'row-actions' }, adminButton('Remove', () => remove(e), { class: 'danger small', 'aria-label': `Remove ${e.address}`, dataset: { remove: e.address } }))));
      }
      shown += data.length;
      const total = Number(headers.get('X-Total-Count') || 0);
      cursor = nextCursor(headers);
      more.hidden = !cursor;
      range.textContent = total ? `1–${fmtNumber(shown)} of ${fmtNumber(total)}` : 'No address matches.';
      clear(list, total ? t.wrap : null);
    } catch (error) {
      if (error.status !== 401) showError(error, 'Loading the suppression list');
    }
  }
  search.addEventListener('submit', (event) => { event.preventDefault(); load(true); });
  more.addEventListener('click', () => load(false));

  return {
    load: () => load(true),
    node: section('Suppression list', search, range, list, more,
      h('h3', null, 'Suppress an address'), addForm, h('h3', null, 'Import'), importForm),
  };
}

function rulesPart() {
  const list = h('div', { id: 'rules-list' });
  const action = h('select', { name: 'action', id: 'rule-action' }, Object.entries(ACTIONS).map(([v, label]) => h('option', { value: v }, label)));
  const sender = h('input', { type: 'text', name: 'sender', autocomplete: 'off', maxlength: 320 });
  const recipient = h('input', { type: 'text', name: 'recipient', autocomplete: 'off', maxlength: 320 });
  const domain = h('input', { type: 'text', name: 'domain', autocomplete: 'off', maxlength: 253 });
  const minutes = h('input', { type: 'number', name: 'minutes', min: 1, max: 525600, required: true, inputmode: 'numeric', value: '30' });
  const comment = h('input', { type: 'text', name: 'comment', maxlength: 500 });
  const create = adminButton('Create rule', () => {}, { id: 'create-rule' });
  create.type = 'submit';
  const filterNote = h('p', { class: 'hint', id: 'rule-filter-hint' }, 'Give at least one of sender, recipient (case-insensitive, contains) and domain (exact recipient domain).');
  const form = h('form', { class: 'filters', id: 'create-rule-form', 'aria-label': 'Create a rule' },
    field('Action', action), field('Sender contains', sender), field('Recipient contains', recipient),
    field('Recipient domain', domain), field('Expires after (minutes)', minutes), field('Comment (optional)', comment),
    h('div', { class: 'filter-buttons' }, create));
  const inputs = { sender, recipient, domain, minutes, comment, action };

  async function queuedCount(filters) {
    // What the rule will act on now (pending and deferred mail), counted by the queue listing.
    const counts = await Promise.all(['pending', 'deferred'].map((type) =>
      api(`/api/queue/${type}`, { query: { ...filters, limit: 1 } }).then((r) => Number(r.headers.get('X-Total-Count') || 0))));
    return counts[0] + counts[1];
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!isAdmin()) return;
    for (const input of Object.values(inputs)) fieldError(input, null);
    const filters = Object.fromEntries(['sender', 'recipient', 'domain'].map((n) => [n, inputs[n].value.trim()]).filter(([, v]) => v));
    if (!Object.keys(filters).length) {
      fieldError(sender, 'Give at least one of sender, recipient, domain.');
      sender.focus();
      return;
    }
    const body = { action: action.value, ...filters, minutes: Number(minutes.value), comment: comment.value.trim() };
    try {
      if (body.action === 'bounce') {
        const count = await queuedCount(filters);
        const yes = await confirmDialog('Create a bounce rule', [
          `${fmtNumber(count)} queued message(s) match (${filterText(filters)}): their matching recipients fail now and their senders get a bounce.`,
          `New mail that matches is refused for ${body.minutes} minute(s).`], 'Create bounce rule', { danger: true });
        if (!yes) return;
      }
      const { data } = await api('/api/rules', { method: 'POST', body });
      toast(`Rule ${data.id} created: ${data.queued_matches} queued message(s) changed.`);
      form.reset();
      await load();
    } catch (error) {
      const named = ['sender', 'recipient', 'domain', 'minutes', 'comment', 'action'].find((n) => error.details?.[n]);
      if (named) fieldError(inputs[named], [].concat(error.details[named]).join(' '));
      else if (error.details?.filter) fieldError(sender, [].concat(error.details.filter).join(' '));
      else showError(error, 'Creating the rule');
    }
  });

  async function remove(rule) {
    if (!(await confirmDialog('Delete rule', `Rule ${rule.id} (${rule.action} ${filterText(rule)}) ends now. Mail it held stays held until released.`, `Delete rule ${rule.id}`, { danger: true }))) return;
    try {
      const { data } = await api(`/api/rules/${rule.id}`, { method: 'DELETE' });
      toast(data.message);
    } catch (error) {
      showError(error, `Deleting rule ${rule.id}`);
    }
    await load();
  }

  let lastSignature = null;
  async function load() {
    try {
      const { data } = await api('/api/rules');
      const signature = JSON.stringify(data);
      if (signature === lastSignature) return; // unchanged: keep focus and scroll position
      lastSignature = signature;
      const t = table('Rules', ['ID', 'Action', 'Filter', 'Comment', 'Expires (UTC)', 'Status', 'Queued when made', 'New mail caught', 'By', 'Actions']);
      t.table.id = 'rules-table';
      for (const rule of [...data].reverse()) {
        t.tbody.append(h('tr', { dataset: { rule: rule.id, action: rule.action } },
          h('td', { class: 'num' }, String(rule.id)), h('td', null, rule.action), h('td', null, filterText(rule)),
          h('td', { class: 'error-text' }, rule.comment), h('td', null, fmtTime(rule.expires_at)),
          h('td', null, h('span', { class: `badge ${rule.active ? 'state-pending' : 'state-gone'}` }, rule.active ? 'active' : 'expired')),
          h('td', { class: 'num queued-matches' }, String(rule.queued_matches)), h('td', { class: 'num hits' }, String(rule.hits)),
          h('td', null, rule.created_by),
          h('td', { class: 'row-actions' }, adminButton('Delete', () => remove(rule), { class: 'danger small', 'aria-label': `Delete rule ${rule.id}`, dataset: { deleteRule: rule.id } }))));
      }
      const focused = document.activeElement?.dataset?.deleteRule;
      clear(list, data.length ? t.wrap : h('p', { id: 'no-rules' }, 'No rule.'));
      if (focused) list.querySelector(`[data-delete-rule="${CSS.escape(focused)}"]`)?.focus();
    } catch (error) {
      if (error.status !== 401) showError(error, 'Loading the rules');
    }
  }

  return { load, node: section('Rules', list, h('h3', null, 'Create a rule'), filterNote, form) };
}

export async function render(root) {
  const policies = policiesPart();
  const suppressions = suppressionsPart();
  const rules = rulesPart();
  clear(root, needsAdminNote(), policies.node, rules.node, suppressions.node);
  await Promise.all([policies.load(), suppressions.load(), rules.load()]);
  setInterval(() => { policies.load(); rules.load(); }, POLL_MS);
}
