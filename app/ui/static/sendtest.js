// "Send test": POST /api/send-test from a small dialog; resolves to the new message id.

import { api } from './api.js';
import { h } from './dom.js';
import { errorBox, field, openDialog, toast } from './ui.js';

const LAST_ADDRESSES = 'elemta.sendtest';

export function sendTestDialog() {
  const remembered = JSON.parse(sessionStorage.getItem(LAST_ADDRESSES) || '{}');
  return openDialog('Send a test message', (dialog, close) => {
    const from = h('input', { type: 'email', name: 'from', required: true, autocomplete: 'off', value: remembered.from || '' });
    const to = h('input', { type: 'email', name: 'to', required: true, autocomplete: 'off', value: remembered.to || '' });
    const subject = h('input', { type: 'text', name: 'subject', value: 'Test Email' });
    const errors = h('div', { class: 'dialog-errors', role: 'alert' });
    const form = h('form', { class: 'send-test-form', method: 'dialog' },
      field('From', from), field('To', to), field('Subject', subject), errors,
      h('div', { class: 'dialog-buttons' },
        h('button', { type: 'button', onclick: () => close(null) }, 'Cancel'),
        h('button', { type: 'submit', class: 'primary' }, 'Send')));
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      errors.replaceChildren();
      try {
        const { data } = await api('/api/send-test', { method: 'POST', body: { from: from.value, to: to.value, subject: subject.value } });
        sessionStorage.setItem(LAST_ADDRESSES, JSON.stringify({ from: from.value, to: to.value }));
        toast(`Test message ${data.message_id} queued`);
        close(data.message_id);
      } catch (error) {
        errors.append(errorBox(error, 'Sending failed'));
      }
    });
    dialog.append(form);
    from.autofocus = true;
  });
}
