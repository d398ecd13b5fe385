// Start-up of every page: theme, who is signed in (GET /api/auth/me before any WebSocket),
// the session header, the live-status footer, then the page's own module.

import { api, forgetKey, session, storeKey } from './api.js';
import { $, clear, h } from './dom.js';
import { onLiveStatus } from './live.js';
import { errorBox, field, fieldError, openDialog, showError } from './ui.js';
import * as overview from './pages/overview.js';
import * as queue from './pages/queue.js';
import * as control from './pages/control.js';
import * as message from './pages/message.js';
import * as logs from './pages/logs.js';
import * as keys from './pages/keys.js';
import * as health from './pages/health.js';

const PAGES = { overview, queue, control, message, logs, keys, health };
const THEME_STORAGE = 'elemta.theme';

function applyTheme(choice) {
  if (choice === 'light' || choice === 'dark') document.documentElement.dataset.theme = choice;
  else delete document.documentElement.dataset.theme;
}

function themeSwitch() {
  const select = h('select', { id: 'theme-choice' },
    ['auto', 'light', 'dark'].map((v) => h('option', { value: v }, v === 'auto' ? 'System' : v[0].toUpperCase() + v.slice(1))));
  select.value = localStorage.getItem(THEME_STORAGE) || 'auto';
  select.addEventListener('change', () => {
    localStorage.setItem(THEME_STORAGE, select.value);
    applyTheme(select.value);
  });
  return h('span', { class: 'theme-switch' }, h('label', { for: 'theme-choice' }, 'Theme'), select);
}

function renderSession() {
  const me = session.me;
  const box = $('#session');
  const parts = [];
  if (me?.name) {
    parts.push(h('span', { class: 'who', id: 'session-who' }, 'Signed in as ', h('strong', { class: 'key-name' }, me.name),
      ' ', h('span', { class: `badge role-${me.role}` }, me.role)));
    parts.push(h('button', { type: 'button', id: 'sign-out', onclick: signOut }, 'Sign out'));
  } else {
    parts.push(h('span', { class: 'who', id: 'session-who' }, me?.auth_mode === 'off' ? 'Authentication is off' : 'Not signed in'));
    if (me?.auth_mode !== 'off') parts.push(h('button', { type: 'button', id: 'sign-in', onclick: () => signIn() }, 'Sign in'));
  }
  parts.push(themeSwitch());
  clear(box, ...parts);
}

function signOut() {
  forgetKey();
  window.location.reload();
}

/** The sign-in dialog: the key is checked with GET /api/auth/me before it is kept. */
function signIn(reason) {
  const open = document.querySelector('dialog.sign-in');
  if (open) return Promise.resolve(false);
  return openDialog('Sign in with an API key', (dialog, close) => {
    dialog.classList.add('sign-in');
    if (reason) dialog.append(h('p', { class: 'note' }, reason));
    const input = h('input', { type: 'password', name: 'api_key', autocomplete: 'off', spellcheck: 'false', required: true, id: 'api-key-input' });
    const errors = h('div', { class: 'dialog-errors' });
    const form = h('form', { method: 'dialog', class: 'sign-in-form' },
      field('API key', input, 'Kept in this browser tab only (sessionStorage), sent as Authorization: Bearer. Create one with: flask apikey create --name NAME --role read|admin'),
      errors,
      h('div', { class: 'dialog-buttons' },
        session.me?.auth_mode === 'all' ? null : h('button', { type: 'button', onclick: () => close(false) }, 'Cancel'),
        h('button', { type: 'submit', class: 'primary' }, 'Sign in')));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      errors.replaceChildren();
      fieldError(input, null);
      const candidate = input.value.trim();
      if (!candidate) {
        fieldError(input, 'Paste an API key (it starts with elemta_).');
        input.focus();
        return;
      }
      try {
        await api('/api/auth/me', { key: candidate });
        storeKey(candidate);
        close(true);
        window.location.reload();
      } catch (error) {
        fieldError(input, `Refused: ${error.describe ? error.describe() : error.message}`);
        errors.append(errorBox(error));
        input.focus();
      }
    });
    if (session.me?.auth_mode === 'all') {
      dialog.addEventListener('cancel', (event) => event.preventDefault()); // nothing to show without a key
    }
    dialog.append(form);
    input.autofocus = true;
  });
}

function liveStatusText(status) {
  switch (status.state) {
    case 'live': return 'Live';
    case 'connecting': return 'Connecting to live updates…';
    case 'offline': return 'Offline: live updates resume when the network is back';
    case 'polling': return `Live updates unavailable: polling every ${status.pollSeconds} s`;
    default: return '';
  }
}

/** GET /api/auth/me; a refused stored key is forgotten (and said), then asked again. */
async function whoAmI() {
  let refused = null;
  for (;;) {
    try {
      return { me: (await api('/api/auth/me')).data, refused };
    } catch (error) {
      if (error.status !== 401) throw error;
      if (!session.key) return { me: { name: null, role: null, expires_at: null, auth_mode: 'all' }, refused };
      refused = error;
      forgetKey();
    }
  }
}

async function main() {
  applyTheme(localStorage.getItem(THEME_STORAGE));
  const pageName = document.documentElement.dataset.page;
  const root = $('#page');
  let lastLive = null;
  onLiveStatus((status) => {
    const el = $('#live-status');
    el.textContent = liveStatusText(status);
    el.dataset.state = status.state;
    if (status.state === 'polling' && lastLive !== 'polling') {
      // Said once, politely: the footer text itself is not a live region.
      $('#toasts').append(h('p', { class: 'toast' }, liveStatusText(status)));
    }
    lastLive = status.state;
  });
  // Verify over HTTP before any WebSocket: a browser hides why an upgrade was refused.
  let refused;
  try {
    ({ me: session.me, refused } = await whoAmI());
  } catch (error) {
    renderSession();
    clear(root, errorBox(error, 'The API cannot be reached'));
    return;
  }
  const refusedText = refused ? `Your API key was refused (${refused.message}); you have been signed out.` : undefined;
  session.onUnauthorized = (error) => {
    forgetKey();
    session.me = { ...session.me, name: null, role: null };
    renderSession();
    signIn(`Your API key was refused (${error.message}); you have been signed out.`);
  };
  renderSession();
  if (session.me.auth_mode === 'all' && !session.me.role) {
    clear(root, h('p', null, 'This server requires an API key for every page. Sign in to continue.'));
    await signIn(refusedText);
    return;
  }
  if (refusedText) signIn(refusedText);
  try {
    await PAGES[pageName].render(root, new URLSearchParams(window.location.search));
  } catch (error) {
    if (error.status !== 401) showError(error, 'This page could not be loaded');
  }
}

main();
