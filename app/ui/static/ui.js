// Shared pieces of every page: messages, dialogs, admin-only controls.

import { ApiError, isAdmin, session } from './api.js';
import { $, clear, h, uniqueId } from './dom.js';

const TOAST_MS = 8000;

/** A polite status message (role=status region), e.g. "21 message(s) retried". */
export function toast(text) {
  const item = h('p', { class: 'toast' }, text);
  $('#toasts').append(item);
  setTimeout(() => item.remove(), TOAST_MS);
}

/** An error (role=alert region): the API's error text and its X-Request-ID. */
export function showError(error, context) {
  $('#alerts').append(errorBox(error, context));
}

export function clearErrors() {
  clear($('#alerts'));
}

export function errorBox(error, context) {
  const parts = [];
  if (context) parts.push(`${context}: `);
  parts.push(error instanceof ApiError ? error.describe() : String(error?.message || error));
  const box = h('div', { class: 'error-box', dataset: { code: error?.code || '', status: error?.status ?? '' } },
    h('p', null, parts.join('')));
  if (error?.requestId) box.append(h('p', { class: 'request-id' }, 'Request ID: ', h('code', null, error.requestId)));
  const dismiss = h('button', { type: 'button', class: 'link-button', onclick: () => box.remove() }, 'Dismiss');
  box.append(dismiss);
  return box;
}

/**
 * A native modal <dialog>: Esc closes it and focus returns to what opened it.
 * build(dialog, close) fills it; resolves with the value given to close().
 */
export function openDialog(title, build, { wide = false } = {}) {
  const opener = document.activeElement;
  const titleId = uniqueId('dialog-title');
  const dialog = h('dialog', { class: wide ? 'dialog wide' : 'dialog', 'aria-labelledby': titleId });
  let result;
  const close = (value) => { result = value; dialog.close(); };
  dialog.append(h('h2', { id: titleId }, title));
  build(dialog, close);
  document.body.append(dialog);
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => {
      dialog.remove();
      if (opener && typeof opener.focus === 'function' && document.contains(opener)) opener.focus();
      resolve(result);
    });
    dialog.showModal();
  });
}

/** A yes/no question in a dialog; resolves true when confirmed. */
export function confirmDialog(title, lines, confirmLabel, { danger = false } = {}) {
  return openDialog(title, (dialog, close) => {
    for (const line of [].concat(lines)) dialog.append(line instanceof Node ? line : h('p', null, line));
    const cancel = h('button', { type: 'button', onclick: () => close(false) }, 'Cancel');
    dialog.append(h('div', { class: 'dialog-buttons' }, cancel,
      h('button', { type: 'button', class: danger ? 'danger' : 'primary', onclick: () => close(true) }, confirmLabel)));
    cancel.autofocus = true;
  }).then((value) => value === true);
}

export const NEEDS_ADMIN = 'Needs an admin key';

/**
 * A button for an admin action. Without an admin key it stays visible but aria-disabled,
 * and says why (DASHBOARD.md section 2).
 */
export function adminButton(label, onClick, attrs = {}, { sendRoleToo = false } = {}) {
  const button = h('button', { type: 'button', ...attrs }, label);
  if (isAdmin() || (sendRoleToo && session.me?.role === 'send')) {
    button.addEventListener('click', onClick);
  } else {
    button.setAttribute('aria-disabled', 'true');
    button.setAttribute('aria-describedby', 'needs-admin');
    button.title = NEEDS_ADMIN;
    button.classList.add('needs-admin');
    button.addEventListener('click', () => toast(`${label}: ${NEEDS_ADMIN.toLowerCase()}.`));
  }
  return button;
}

/** The hidden description every disabled admin control points to, once per page. */
export function needsAdminNote() {
  if (isAdmin()) return null;
  let who = session.me?.role ? `You are signed in with a ${session.me.role} key.` : 'You are not signed in.';
  if (session.me?.role === 'send') who += ' It may send test messages only.';
  return h('p', { id: 'needs-admin', class: 'note' }, `${who} Actions that change the queue or keys need an admin key.`);
}

export function section(title, ...children) {
  const headingId = uniqueId('section');
  return h('section', { 'aria-labelledby': headingId }, h('h2', { id: headingId }, title), ...children);
}

/** A labelled form field; an error text can later be tied to it by aria-describedby. */
export function field(label, input, hint) {
  input.id = input.id || uniqueId('field');
  const wrap = h('div', { class: 'field' }, h('label', { for: input.id }, label), input);
  if (hint) {
    const hintId = uniqueId('hint');
    wrap.append(h('p', { id: hintId, class: 'hint' }, hint));
    input.setAttribute('aria-describedby', hintId);
  }
  return wrap;
}

/** Show a field's error under it and tie it to the input (aria-describedby, aria-invalid). */
export function fieldError(input, text) {
  const wrap = input.closest('.field');
  wrap.querySelector('.field-error')?.remove();
  const described = (input.getAttribute('aria-describedby') || '').split(' ').filter((id) => id && !id.startsWith('err-'));
  if (!text) {
    input.removeAttribute('aria-invalid');
    input.setAttribute('aria-describedby', described.join(' '));
    return;
  }
  const errorId = `err-${input.id}`;
  wrap.append(h('p', { id: errorId, class: 'field-error' }, text));
  input.setAttribute('aria-invalid', 'true');
  input.setAttribute('aria-describedby', [...described, errorId].join(' '));
}

/** "deferred" with a text label; colour is never the only signal. */
export function stateBadge(state) {
  return h('span', { class: `badge state-${state || 'gone'}` }, state || 'left the queue');
}

export function messageLink(id) {
  return h('a', { href: `/ui/message/${encodeURIComponent(id)}`, class: 'mono' }, id);
}
