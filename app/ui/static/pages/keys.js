// API keys (admin only): list, create (the key is shown once, with Copy, then cleared), revoke
// (with a warning when it is the key this tab is signed in with).

import { api, isAdmin, session } from '../api.js';
import { clear, fmtTime, h, table } from '../dom.js';
import { adminButton, confirmDialog, field, fieldError, needsAdminNote, section, showError, toast } from '../ui.js';

function status(key) {
  if (key.revoked) return 'revoked';
  if (key.expires_at && new Date(key.expires_at) <= new Date()) return 'expired';
  return 'active';
}

export async function render(root) {
  const list = h('div', { id: 'keys-list' });
  const created = h('div', { id: 'created-key', 'aria-live': 'polite' });
  const name = h('input', { type: 'text', name: 'name', required: true, autocomplete: 'off', maxlength: 100 });
  const role = h('select', { name: 'role' }, ['read', 'send', 'admin'].map((r) => h('option', { value: r }, r)));
  const expires = h('input', { type: 'number', name: 'expires_days', min: 1, max: 36500, inputmode: 'numeric' });
  const submit = adminButton('Create key', () => {}, { id: 'create-key' });
  submit.type = 'submit';
  const form = h('form', { class: 'filters', id: 'create-key-form', 'aria-label': 'Create an API key' },
    field('Name', name, 'Letters, digits and . _ @ - (it is recorded as the actor of every action)'),
    field('Role', role), field('Expires after (days, optional)', expires), h('div', { class: 'filter-buttons' }, submit));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!isAdmin()) return;
    fieldError(name, null);
    fieldError(expires, null);
    try {
      const body = { name: name.value.trim(), role: role.value, expires_days: expires.value ? Number(expires.value) : null };
      const { data } = await api('/api/auth/keys', { method: 'POST', body });
      showCreated(data);
      form.reset();
      await load();
    } catch (error) {
      if (error.details?.name) fieldError(name, [].concat(error.details.name).join(' '));
      else if (error.details?.expires_days) fieldError(expires, [].concat(error.details.expires_days).join(' '));
      else showError(error, 'Creating the key');
    }
  });

  function showCreated(key) {
    const value = h('code', { class: 'new-key', id: 'new-key-value' }, key.key);
    const copy = h('button', { type: 'button', id: 'copy-key' }, 'Copy');
    copy.addEventListener('click', async () => {
      try { await navigator.clipboard.writeText(key.key); toast('Key copied to the clipboard.'); } catch { toast('Copy failed: select the key and copy it by hand.'); }
    });
    const done = h('button', { type: 'button', id: 'key-done', class: 'primary' }, 'Done, I have stored it');
    done.addEventListener('click', () => { clear(created); name.focus(); });
    clear(created, h('div', { class: 'created-key' },
      h('p', null, `Key ${key.name} (${key.role}) created. It is shown this once: store it now.`),
      h('p', null, value), h('div', { class: 'actions' }, copy, done)));
    copy.focus();
  }

  async function revoke(key) {
    const own = key.name === session.me?.name;
    const lines = [`Revoke ${key.name}? Every client using it is refused from now on.`];
    if (own) lines.push(h('p', { class: 'warning', id: 'own-key-warning' }, 'This is the key you are signed in with: you will be signed out.'));
    if (!(await confirmDialog('Revoke API key', lines, `Revoke ${key.name}`, { danger: true }))) return;
    try {
      const { data } = await api(`/api/auth/keys/${key.id}`, { method: 'DELETE' });
      toast(data.message);
    } catch (error) {
      showError(error, `Revoking ${key.name}`);
    }
    await load();
  }

  async function load() {
    if (!isAdmin()) {
      clear(list, h('p', { class: 'note' }, 'Listing keys needs an admin key.'));
      return;
    }
    try {
      const { data } = await api('/api/auth/keys');
      const { wrap, tbody } = table('API keys', ['Name', 'Role', 'Prefix', 'Created (UTC)', 'Expires (UTC)', 'Last used (UTC)', 'Status', 'Actions']);
      for (const key of data) {
        const state = status(key);
        tbody.append(h('tr', { dataset: { name: key.name, status: state } },
          h('td', null, key.name, key.name === session.me?.name ? ' (this tab)' : ''), h('td', null, key.role), h('td', { class: 'mono' }, `${key.prefix}…`),
          h('td', null, fmtTime(key.created_at)), h('td', null, key.expires_at ? fmtTime(key.expires_at) : 'never'),
          h('td', null, fmtTime(key.last_used_at)), h('td', null, h('span', { class: `badge key-${state}` }, state)),
          h('td', null, state === 'active' ? adminButton('Revoke', () => revoke(key), { class: 'danger small', 'aria-label': `Revoke ${key.name}`, dataset: { revoke: key.name } }) : '')));
      }
      clear(list, wrap);
    } catch (error) {
      if (error.status !== 401) showError(error, 'Loading the keys');
    }
  }

  clear(root, needsAdminNote(), section('Create a key', form, created), section('Keys', list));
  await load();
}
