// feed_v4 chart page: loads a symbol+timeframe from the read API, keeps it live over the
// WebSocket, loads older bars ahead of scrolling, and exposes window.feedChart for tests.

import { api, fetchRange, storeToken, wsUrl, AuthError } from './api.js';
import { INITIAL_BARS, early } from './boot.js';
import { ChartView } from './panes.js';

const OLDER_BARS = 1000;
const PRELOAD_MARGIN = 300; // load older bars while this many are still left of the view
const TAIL_BARS = 500; // refetched after a WebSocket reconnect to fill the gap
const SUBSCRIBE_TAIL_BARS = 20; // refetched once a subscription is confirmed
const RETRY_MS = 5000; // pause after a failed older-bars load before trying again

const $ = (id) => document.getElementById(id);
const url = new URLSearchParams(location.search);

const state = {
  symbol: url.get('symbol') || '',
  tf: url.get('tf') || '',
  view: url.get('view') === 'footprint' ? 'footprint' : 'candles',
  symbols: [],
  gen: 0, // bumped on every symbol/tf switch; answers for an older one are dropped
  loaded: false,
  pending: [], // WebSocket messages that arrived before the REST load finished
  tailDue: false, // a subscription was confirmed: the bars that landed before it are fetched once loaded
  book: null,
  candles: [],
  indicators: [],
  orderflow: [],
  footprints: [],
  olderBusy: false,
  olderDone: false,
  olderRetryAt: 0,
};
let view = null;

const hook = {
  ready: false,
  firstRenderMs: null,
  get symbol() { return state.symbol; },
  get tf() { return state.tf; },
  get bars() { return state.candles.length; },
  get oldest() { return state.candles.length ? state.candles[0].open_time : null; },
  get newest() { return state.candles.length ? state.candles[state.candles.length - 1].open_time : null; },
  get footprints() { return state.footprints.length; },
  get drawnFootprints() { return view ? view.drawnFootprints() : 0; },
  get indicatorPanes() { return view ? view.paneNames() : []; },
  get overlays() { return view ? view.overlays() : []; },
  liveBars: 0,
  lastLiveAt: null,
  lastLiveOpenTime: null,
  olderLoads: 0,
  get book() { return view ? view.bookLevels() : 0; },
  get wsOpen() { return live.open; },
  get chart() { return view ? view.chart : null; },
  setView,
  errors: [],
};
window.feedChart = hook;

// ---- status line -------------------------------------------------------------------

function showError(msg) {
  if (hook.errors[hook.errors.length - 1] !== msg) hook.errors.push(msg);
  const el = $('status');
  el.textContent = msg;
  el.className = 'status error';
}

function showInfo(msg) {
  const el = $('status');
  el.textContent = msg;
  el.className = msg ? 'status info' : 'status';
}

function fail(e) {
  if (e instanceof AuthError) askToken(`The server refused the token (401: ${e.message}).`);
  else showError(e.message);
}

// ---- token -------------------------------------------------------------------------

function askToken(msg) {
  const dlg = $('token-dialog');
  $('token-msg').textContent = msg;
  showError(msg);
  if (!dlg.open) dlg.showModal();
  $('token-input').focus();
}

$('token-form').addEventListener('submit', () => {
  storeToken($('token-input').value.trim());
  $('token-input').value = '';
  showInfo('');
  start();
});

// ---- merging rows by open_time -----------------------------------------------------

// Two open_time-sorted arrays into one; rows of `b` win on equal times.
function merge(a, b) {
  if (!a.length) return b;
  if (!b.length) return a;
  if (a[a.length - 1].open_time < b[0].open_time) return a.concat(b);
  const out = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (j >= b.length || (i < a.length && a[i].open_time < b[j].open_time)) out.push(a[i++]);
    else {
      if (i < a.length && a[i].open_time === b[j].open_time) i++;
      out.push(b[j++]);
    }
  }
  return out;
}

// One live row into its array; returns where it went (see ChartView.candle).
function upsert(arr, row) {
  const t = row.open_time;
  let i = arr.length - 1;
  if (i < 0 || arr[i].open_time < t) {
    arr.push(row);
    return 'last';
  }
  if (arr[i].open_time === t) {
    arr[i] = row;
    return 'last';
  }
  while (i >= 0 && arr[i].open_time > t) i--;
  if (i >= 0 && arr[i].open_time === t) {
    arr[i] = row;
    return 'old';
  }
  arr.splice(i + 1, 0, row);
  return 'insert';
}

// ---- loading -----------------------------------------------------------------------

// boot.js's load, once, if it is for what is to be shown.
let earlyTaken = false;
function takeEarly() {
  if (earlyTaken || !early || early.symbol !== state.symbol || early.tf !== state.tf) return null;
  earlyTaken = true;
  return early.rows;
}

function symbolInfo() {
  return state.symbols.find((s) => s.symbol === state.symbol);
}

async function loadSymbol() {
  const gen = ++state.gen;
  Object.assign(state, { loaded: false, pending: [], book: null, candles: [], indicators: [], orderflow: [], footprints: [], olderBusy: false, olderDone: false, olderRetryAt: 0 });
  hook.ready = false;
  delete document.body.dataset.ready;
  live.follow();
  const data = takeEarly() || fetchRange(state.symbol, state.tf, undefined, INITIAL_BARS);
  if (view) view.remove();
  view = null;
  if (state.symbols.length) loadBook(gen); // else start() asks once it knows the symbols
  let rows;
  try {
    rows = await data;
  } catch (e) {
    if (gen === state.gen) fail(e);
    return;
  }
  if (gen !== state.gen) return;
  // The chart is made only now: building and painting it while the answers stream in
  // would keep the main thread from reading them.
  view = new ChartView($('chart'), state.view);
  view.chart.timeScale().subscribeVisibleLogicalRangeChange(onRange);
  [state.candles, state.indicators, state.orderflow, state.footprints] = rows;
  view.setAll(state);
  if (state.book) view.setBook(state.book);
  state.loaded = true;
  for (const msg of state.pending) apply(msg);
  state.pending = [];
  if (state.tailDue) refreshTail(SUBSCRIBE_TAIL_BARS);
  if (!state.candles.length) showInfo(`No ${state.tf} candles for ${state.symbol} yet.`);
  else showInfo('');
  requestAnimationFrame(() => {
    if (gen !== state.gen) return;
    if (hook.firstRenderMs === null) hook.firstRenderMs = performance.now();
    hook.ready = true;
    document.body.dataset.ready = '1';
    onRange(view.chart.timeScale().getVisibleLogicalRange());
  });
}

// The ladder only for symbols whose book is there (`has_book`; asking for another would
// 404); a book that comes later arrives over the WebSocket.
async function loadBook(gen) {
  const info = symbolInfo();
  if (!info || !info.has_book) return;
  try {
    const book = await api('book', { symbol: state.symbol });
    if (gen !== state.gen) return;
    state.book = book;
    if (view) view.setBook(book);
  } catch (e) {
    if (gen === state.gen && e.status !== 404) fail(e);
  }
}

function onRange(range) {
  if (range && range.from < PRELOAD_MARGIN) loadOlder();
}

async function loadOlder() {
  if (!state.loaded || state.olderBusy || state.olderDone || !state.candles.length) return;
  if (performance.now() < state.olderRetryAt) return;
  const gen = state.gen;
  state.olderBusy = true;
  showInfo('Loading older bars…');
  try {
    const [candles, indicators, orderflow, footprints] = await fetchRange(state.symbol, state.tf, state.candles[0].open_time - 1, OLDER_BARS);
    if (gen !== state.gen) return;
    if (!candles.length) {
      state.olderDone = true;
      showInfo('');
      return;
    }
    state.candles = merge(candles, state.candles);
    state.indicators = merge(indicators, state.indicators);
    state.orderflow = merge(orderflow, state.orderflow);
    state.footprints = merge(footprints, state.footprints);
    view.setAll(state); // the time scale keeps its right edge, so the view stays put
    hook.olderLoads++;
    showInfo('');
  } catch (e) {
    if (gen !== state.gen) return;
    state.olderRetryAt = performance.now() + RETRY_MS;
    fail(e);
  } finally {
    if (gen === state.gen) state.olderBusy = false;
  }
  // The user may have kept scrolling while this load was in flight.
  if (gen === state.gen) onRange(view.chart.timeScale().getVisibleLogicalRange());
}

// After a reconnect, or once a subscription is confirmed: the newest bars again, to cover
// what landed while no subscription was in place (the REST answers may predate it).
async function refreshTail(bars = TAIL_BARS) {
  if (!state.loaded) return;
  state.tailDue = false;
  const gen = state.gen;
  try {
    const [candles, indicators, orderflow, footprints] = await fetchRange(state.symbol, state.tf, undefined, bars);
    if (gen !== state.gen) return;
    state.candles = merge(state.candles, candles);
    state.indicators = merge(state.indicators, indicators);
    state.orderflow = merge(state.orderflow, orderflow);
    state.footprints = merge(state.footprints, footprints);
    view.setAll(state);
  } catch (e) {
    if (gen === state.gen) fail(e);
  }
}

// ---- live updates ------------------------------------------------------------------

function channels() {
  const s = state.symbol;
  const t = state.tf;
  return [`candles:${s}:${t}`, `indicators:${s}:${t}`, `orderflow:${s}:${t}`, `footprint:${s}:${t}`, `book:${s}`, `features:${s}`];
}

const live = {
  ws: null,
  open: false,
  subs: [],
  retries: 0,
  timer: 0,
  everOpened: false,

  connect() {
    clearTimeout(this.timer);
    const ws = new WebSocket(wsUrl());
    this.ws = ws;
    ws.onopen = () => {
      this.open = true;
      this.retries = 0;
      setWsState();
      if ($('status').className === 'status info') showInfo('');
      if (this.subs.length) ws.send(JSON.stringify({ subscribe: this.subs }));
      if (this.everOpened) refreshTail();
      this.everOpened = true;
    };
    ws.onmessage = (ev) => onMessage(JSON.parse(ev.data));
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.open = false;
      setWsState();
      if (!$('status').textContent) showInfo('Live updates disconnected; reconnecting…');
      // Exponential backoff with jitter, capped, so a restarting server is not hammered.
      const delay = Math.min(15000, 500 * 2 ** this.retries++) * (0.75 + Math.random() / 2);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  },

  restart() {
    const ws = this.ws;
    this.ws = null;
    this.open = false;
    if (ws) ws.close();
    this.retries = 0;
    this.connect();
  },

  // Subscribe to the shown symbol+tf (and drop the previous one's channels).
  follow() {
    const next = channels();
    const gone = this.subs.filter((c) => !next.includes(c));
    const added = next.filter((c) => !this.subs.includes(c));
    this.subs = next;
    if (!this.open) return;
    if (gone.length) this.ws.send(JSON.stringify({ unsubscribe: gone }));
    if (added.length) this.ws.send(JSON.stringify({ subscribe: added }));
  },
};

function setWsState() {
  const el = $('ws-state');
  el.className = live.open ? 'ws on' : 'ws off';
  el.title = live.open ? 'live' : 'reconnecting…';
}

function onMessage(msg) {
  if (msg.error) return showError(`live: ${msg.error}`);
  if (msg.subscribed) {
    state.tailDue = true;
    if (state.loaded) refreshTail(SUBSCRIBE_TAIL_BARS);
    return;
  }
  if (!msg.channel) return; // {"unsubscribed": [...]}
  const [, sym, tf] = msg.channel.split(':');
  if (sym !== state.symbol || (tf !== undefined && tf !== state.tf)) return; // stale subscription
  if (state.loaded) apply(msg);
  else state.pending.push(msg);
}

function apply({ channel, data }) {
  switch (channel.split(':')[0]) {
    case 'candles': {
      const at = upsert(state.candles, data);
      view.candle(data, at, state);
      const fp = state.footprints.findLast((f) => f.open_time <= data.open_time);
      if (fp && fp.open_time === data.open_time) view.footprintRow(fp, fp === state.footprints[state.footprints.length - 1] ? 'last' : 'old', state);
      hook.liveBars++;
      hook.lastLiveOpenTime = data.open_time;
      requestAnimationFrame(() => (hook.lastLiveAt = performance.now()));
      break;
    }
    case 'indicators':
      view.indicators(data, upsert(state.indicators, data), state);
      break;
    case 'orderflow':
      view.orderflow(data, upsert(state.orderflow, data), state);
      break;
    case 'footprint':
      view.footprintRow(data, upsert(state.footprints, data), state);
      break;
    case 'book':
      state.book = data;
      view.setBook(data);
      break;
    case 'features':
      showFeatures(data);
      break;
  }
}

function showFeatures(f) {
  const num = (v, d) => (v === null || v === undefined ? '–' : v.toFixed(d));
  $('features').textContent = `µp ${num(f.microprice, (view ? view.precision : 2) + 1)} · OFI ${num(f.ofi, 2)} · VPIN ${num(f.vpin, 2)}`;
}

// ---- toolbar -----------------------------------------------------------------------

function writeUrl() {
  const q = new URLSearchParams({ symbol: state.symbol, tf: state.tf });
  if (state.view === 'footprint') q.set('view', 'footprint');
  history.replaceState(null, '', `${location.pathname}?${q}`);
}

function setView(mode) {
  if (mode !== 'candles' && mode !== 'footprint') throw new Error(`unknown view ${mode}`);
  state.view = mode;
  $('view-candles').setAttribute('aria-pressed', mode === 'candles');
  $('view-footprint').setAttribute('aria-pressed', mode === 'footprint');
  if (view) view.setView(mode);
  writeUrl();
}

function fillSelect(el, values, current) {
  el.replaceChildren(...values.map((v) => new Option(v, v, false, v === current)));
}

function switchTo(symbol, tf) {
  state.symbol = symbol;
  state.tf = tf;
  $('features').textContent = '';
  writeUrl();
  loadSymbol();
}

$('symbol').addEventListener('change', (e) => switchTo(e.target.value, state.tf));
$('tf').addEventListener('change', (e) => switchTo(state.symbol, e.target.value));
$('view-candles').addEventListener('click', () => setView('candles'));
$('view-footprint').addEventListener('click', () => setView('footprint'));

// ---- start -------------------------------------------------------------------------

async function start() {
  const meta = Promise.all([api('health'), api('symbols')]);
  // With symbol and tf in the URL the data load need not wait for the pickers' lists.
  const early = state.symbol && state.tf;
  if (early) loadSymbol();
  let health;
  let symbols;
  try {
    [health, symbols] = await meta;
  } catch (e) {
    return fail(e);
  }
  // The socket only once the token is known to work: a refused one would just retry.
  if (live.ws) live.restart();
  else live.connect();
  state.symbols = symbols.filter((s) => s.status === 'enabled');
  const names = state.symbols.map((s) => s.symbol);
  const tfs = health.timeframes || [];
  const symbol = names.includes(state.symbol) ? state.symbol : names.includes('BTCUSDT') ? 'BTCUSDT' : names[0];
  const tf = tfs.includes(state.tf) ? state.tf : tfs.includes('m1') ? 'm1' : tfs[0];
  fillSelect($('symbol'), names, symbol);
  fillSelect($('tf'), tfs, tf);
  if (health.status !== 'ok') showError(`Server is ${health.status}: redis ${health.redis ? 'up' : 'down'}, postgres ${health.postgres ? 'up' : 'down'}`);
  if (!symbol || !tf) return showError('The server lists no enabled symbols or timeframes.');
  if (early && symbol === state.symbol && tf === state.tf) {
    loadBook(state.gen); // needed the symbol list to know whether a book exists
    return;
  }
  if (early) showError(`${state.symbol} ${state.tf} is not available here; showing ${symbol} ${tf}.`);
  switchTo(symbol, tf);
}

setView(state.view);
setWsState();
start();
