// REST access to /api/v1 and the token that authorises it.

const TOKEN_KEY = 'feed_v4_token';

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Token from #token=... (then removed from the address bar so it is not bookmarked or
// shared by accident), else the one kept for this tab. Empty when none: a dev server
// without WEB_TOKEN accepts requests without it, so we only ask after a 401.
function takeToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

// The token in use; read once at start, replaced when the user enters another.
export const session = { token: takeToken() };

export function storeToken(token) {
  session.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function wsUrl() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${location.host}/api/v1/ws?token=${encodeURIComponent(session.token)}`;
}

export async function api(path, params) {
  const qs = params ? '?' + new URLSearchParams(params) : '';
  const headers = session.token ? { Authorization: `Bearer ${session.token}` } : {};
  let res;
  try {
    res = await fetch(`/api/v1/${path}${qs}`, { headers });
  } catch (e) {
    throw new ApiError(0, `${path}: network error (${e.message})`);
  }
  if (res.ok) return res.json();
  let msg = res.statusText;
  try {
    msg = (await res.json()).error || msg;
  } catch {
    // not JSON: keep the status text
  }
  if (res.status === 401) throw new AuthError(msg);
  if (res.status === 429) throw new ApiError(429, `${path}: rate limited, try again shortly`);
  throw new ApiError(res.status, `${path}: ${res.status} ${msg}`);
}

// Candles, indicators, orderflow and footprints of one range, fetched in parallel.
export function fetchRange(symbol, tf, end, limit) {
  const q = { symbol, tf, limit };
  if (end !== undefined) q.end = end;
  return Promise.all([api('candles', q), api('indicators', q), api('orderflow', q), api('footprints', q)]);
}
