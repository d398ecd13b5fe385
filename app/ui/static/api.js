// The dashboard's only door to data: the documented JSON API, with the signed-in key.
// The key lives in sessionStorage (this tab only, never sent automatically: no CSRF).

const KEY_STORAGE = 'elemta.key';

export const session = {
  key: sessionStorage.getItem(KEY_STORAGE),
  me: null, // GET /api/auth/me: {name, role, expires_at, auth_mode}
  onUnauthorized: null,
};

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
  session.key = key;
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  session.key = null;
}

export const isAdmin = () => session.me?.role === 'admin' || session.me?.auth_mode === 'off';

export class ApiError extends Error {
  constructor(status, code, message, requestId, retryAfter, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
    this.details = details;
  }

  /** What the user reads: the API's own error text, the wait for a 429, the request id. */
  describe() {
    let text = this.message;
    if (this.status === 429) {
      const wait = this.retryAfter ? ` Try again in ${this.retryAfter} s.` : '';
      text = `Rate limited: ${this.message}.${wait}`;
    }
    if (this.details && typeof this.details === 'object') {
      const fields = Object.entries(this.details).map(([k, v]) => `${k}: ${[].concat(v).join(' ')}`);
      if (fields.length) text += ` (${fields.join('; ')})`;
    }
    return text;
  }
}

export function apiUrl(path, query) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(name, value);
  }
  return url;
}

/**
 * One API call (a JSON `body`, or a `text` body of `contentType`). Resolves to {data, headers, status, requestId}; rejects with ApiError carrying
 * the contract's {error, code, details}. A 401 for the signed-in key signs the tab out.
 */
export async function api(path, { method = 'GET', query, body, text, contentType = 'text/plain', key = session.key, as = 'json', okStatuses = [] } = {}) {
  const headers = { Accept: as === 'json' ? 'application/json' : '*/*' };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  else if (text !== undefined) headers['Content-Type'] = contentType; // e.g. a CSV import
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method, headers, body: body === undefined ? text : JSON.stringify(body),
      cache: 'no-store', credentials: 'omit',
    });
  } catch {
    throw new ApiError(0, 'NETWORK_ERROR', 'The server cannot be reached', null, null, null);
  }
  const requestId = response.headers.get('X-Request-ID');
  if (!response.ok && !okStatuses.includes(response.status)) {
    let payload = null;
    try { payload = await response.json(); } catch { /* not JSON: a proxy's page */ }
    const error = new ApiError(response.status, payload?.code || `HTTP_${response.status}`,
      payload?.error || response.statusText || 'Request failed', requestId,
      response.headers.get('Retry-After'), payload?.details ?? null);
    if (response.status === 401 && key && key === session.key && session.onUnauthorized) {
      session.onUnauthorized(error);
    }
    throw error;
  }
  let data;
  if (as === 'text') data = await response.text();
  else if (as === 'blob') data = await response.blob();
  else data = await response.json();
  return { data, headers: response.headers, status: response.status, requestId };
}

/** The cursor of a `Link: <...>; rel="next"` header (absolute or relative URL), or null. */
export function nextCursor(headers) {
  const link = headers.get('Link') || '';
  for (const part of link.split(',')) {
    const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
    if (match) return new URL(match[1], window.location.origin).searchParams.get('cursor');
  }
  return null;
}

/** ws(s)://this host/path?params; the key as ?api_key= (browsers cannot set a header there). */
export function websocketUrl(path, params) {
  const url = apiUrl(path, params);
  url.protocol = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  if (session.key) url.searchParams.set('api_key', session.key);
  return url.toString();
}
