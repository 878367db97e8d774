// The chart: price pane (candles or footprint, volume, overlays, depth ladder) and the
// indicator panes below it, built from the page's sorted data arrays.

import { FootprintView, parseFootprint } from './footprint.js';
import { Ladder } from './ladder.js';

const LC = LightweightCharts;
const UP = '#26a69a';
const DOWN = '#ef5350';
const CLEAR = 'rgba(0, 0, 0, 0)';
const EMA_COLORS = ['#f7c948', '#e040fb', '#29b6f6', '#ff9800', '#b2ff59', '#ffffff'];
const PANE_ORDER = ['RSI', 'MACD', 'Delta', 'CVD'];
const CANDLE_COLORS = { upColor: UP, downColor: DOWN, borderUpColor: UP, borderDownColor: DOWN, wickUpColor: UP, wickDownColor: DOWN };
const CANDLE_HIDDEN = { upColor: CLEAR, downColor: CLEAR, borderUpColor: CLEAR, borderDownColor: CLEAR, wickUpColor: CLEAR, wickDownColor: CLEAR };
const VOLUME_FORMAT = { type: 'volume' };
const NO_LABELS = { lastValueVisible: false, priceLineVisible: false };

const sec = (ms) => ms / 1000;
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const pad2 = (n) => (n < 10 ? '0' : '') + n;

// Time-axis labels in UTC (the data's clock), built by hand: the default goes through
// Intl for every tick and was a tenth of the first paint.
function tickMarkFormatter(time, type) {
  const d = new Date(time * 1000);
  switch (type) {
    case LC.TickMarkType.Year:
      return String(d.getUTCFullYear());
    case LC.TickMarkType.Month:
      return MONTHS[d.getUTCMonth()];
    case LC.TickMarkType.DayOfMonth:
      return String(d.getUTCDate());
    case LC.TickMarkType.TimeWithSeconds:
      return `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}:${pad2(d.getUTCSeconds())}`;
    default:
      return `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}`;
  }
}

// Name drawn in a pane's top-left corner, so the stacked panes can be told apart.
class PaneLabel {
  constructor(text) {
    this._renderer = {
      draw: (target) =>
        target.useMediaCoordinateSpace(({ context: ctx }) => {
          ctx.font = '11px -apple-system, BlinkMacSystemFont, Roboto, sans-serif';
          ctx.fillStyle = '#787b86';
          ctx.textBaseline = 'top';
          ctx.fillText(text, 6, 4);
        }),
    };
    this._views = [{ renderer: () => this._renderer }];
  }

  paneViews() {
    return this._views;
  }
}

// Which series an indicator name becomes; null for names this page does not draw.
function indicatorSpec(name, i) {
  if (name.startsWith('EMA_')) return { pane: null, type: 'line', opts: { color: EMA_COLORS[i % EMA_COLORS.length], lineWidth: 1 } };
  if (/^BB[LU]_/.test(name)) return { pane: null, type: 'line', opts: { color: 'rgba(33, 150, 243, 0.75)', lineWidth: 1 } };
  if (name.startsWith('BBM_')) return { pane: null, type: 'line', opts: { color: 'rgba(33, 150, 243, 0.5)', lineWidth: 1, lineStyle: LC.LineStyle.Dashed } };
  if (name.startsWith('SUPERT_')) return { pane: null, type: 'line', dir: 'SUPERTd_' + name.slice(7), opts: { lineWidth: 2 } };
  if (name.startsWith('RSI_')) return { pane: 'RSI', type: 'line', opts: { color: '#b388ff', lineWidth: 1 } };
  if (name.startsWith('MACDh_')) return { pane: 'MACD', type: 'hist', opts: {} };
  if (name.startsWith('MACDs_')) return { pane: 'MACD', type: 'line', opts: { color: '#ff9800', lineWidth: 1 } };
  if (name.startsWith('MACD_')) return { pane: 'MACD', type: 'line', opts: { color: '#2962ff', lineWidth: 1 } };
  return null;
}

// Indicator names in drawing order: EMAs by period, then Bollinger, SuperTrend, RSI, MACD.
function sortNames(names) {
  const rank = (n) => ['EMA_', 'BB', 'SUPERT_', 'RSI_', 'MACDh_', 'MACD_', 'MACDs_'].findIndex((p) => n.startsWith(p));
  const period = (n) => parseFloat(n.split('_')[1]) || 0;
  return names.sort((a, b) => rank(a) - rank(b) || period(a) - period(b) || (a < b ? -1 : 1));
}

function decimals(text) {
  const i = text.indexOf('.');
  return i < 0 ? 0 : text.length - i - 1;
}

export class ChartView {
  constructor(el, view) {
    this.chart = LC.createChart(el, {
      autoSize: true,
      layout: {
        background: { type: LC.ColorType.Solid, color: '#131722' },
        textColor: '#d1d4dc',
        fontSize: 11,
        panes: { separatorColor: '#2a2e39', separatorHoverColor: 'rgba(120, 123, 134, 0.3)', enableResize: true },
      },
      grid: { vertLines: { color: '#1e222d' }, horzLines: { color: '#1e222d' } },
      rightPriceScale: { borderColor: '#2a2e39' },
      timeScale: { borderColor: '#2a2e39', timeVisible: true, secondsVisible: false, rightOffset: 3, tickMarkFormatter },
      crosshair: { mode: LC.CrosshairMode.Normal },
    });
    this._el = el;
    this.candles = this.chart.addSeries(LC.CandlestickSeries, CANDLE_COLORS, 0);
    this.volume = this.chart.addSeries(LC.HistogramSeries, { priceScaleId: 'vol', priceFormat: VOLUME_FORMAT, ...NO_LABELS }, 0);
    this.volume.priceScale().applyOptions({ scaleMargins: { top: 0.82, bottom: 0 } });
    this.fpView = new FootprintView();
    this.footprint = this.chart.addCustomSeries(this.fpView, { visible: false }, 0);
    this.ladder = new Ladder();
    this.candles.attachPrimitive(this.ladder);
    this.ind = new Map(); // indicator name -> { series, spec }
    this.panes = new Map(); // pane name -> IPaneApi
    this.delta = null;
    this.cvd = null;
    this.hasBook = false;
    this.precision = 2;
    // The usual lower panes are made now, while the first data is still on its way: adding
    // panes later re-lays out every canvas on the critical path. Unused ones are dropped.
    for (const name of PANE_ORDER) this._addPane(name);
    this.setView(view);
  }

  remove() {
    this.chart.remove();
  }

  overlays() {
    return [...this.ind.keys()].filter((n) => this.ind.get(n).spec.pane === null);
  }

  paneNames() {
    return PANE_ORDER.filter((n) => this.panes.has(n) && this.panes.get(n).getSeries().length > 0);
  }

  drawnFootprints() {
    return this.mode === 'footprint' ? this.fpView.renderer().drawn : 0;
  }

  bookLevels() {
    return this.hasBook ? this.ladder.levels : 0;
  }

  // Footprint rows need the price scale fitted to the bars, not to bands around them.
  _overlayAutoscale() {
    return this.mode === 'footprint' ? () => null : (own) => own();
  }

  setView(mode) {
    this.mode = mode;
    const fp = mode === 'footprint';
    // A new provider is what makes the scale ask the overlays again.
    for (const { series, spec } of this.ind.values()) if (spec.pane === null) series.applyOptions({ autoscaleInfoProvider: this._overlayAutoscale() });
    this.candles.applyOptions(fp ? CANDLE_HIDDEN : CANDLE_COLORS);
    this.footprint.applyOptions({ visible: fp });
    // Footprint cells need room: widen bars when switching to it, narrow them back after.
    const ts = this.chart.timeScale();
    const spacing = ts.options().barSpacing;
    if (fp && spacing < 20) ts.applyOptions({ barSpacing: 28 });
    if (!fp && spacing > 20) ts.applyOptions({ barSpacing: 8 });
  }

  setBook(book) {
    this.hasBook = true;
    this.ladder.setBook(book);
  }

  // Price precision from the data's own decimals, so labels neither round nor pad.
  _setPrecision(candles) {
    let p = 0;
    for (let i = Math.max(0, candles.length - 50); i < candles.length; i++) p = Math.max(p, decimals(candles[i].close), decimals(candles[i].high));
    if (p === this.precision) return;
    this.precision = p;
    const priceFormat = { type: 'price', precision: p, minMove: 10 ** -p };
    this.candles.applyOptions({ priceFormat });
    this.footprint.applyOptions({ priceFormat });
    for (const { series, spec } of this.ind.values()) if (spec.pane === null) series.applyOptions({ priceFormat });
  }

  // A series in a named lower pane, creating the pane in PANE_ORDER position if needed.
  _paneSeries(name, type, opts) {
    return (this.panes.get(name) || this._addPane(name)).addSeries(type, opts);
  }

  _addPane(name) {
    const pane = this.chart.addPane(true);
    pane.attachPrimitive(new PaneLabel(name));
    this.panes.set(name, pane);
    PANE_ORDER.filter((n) => this.panes.has(n)).forEach((n, i) => this.panes.get(n).moveTo(i + 1));
    this._sizePanes();
    return pane;
  }

  // Panes made up front but left without data (e.g. no indicators for this symbol).
  _dropEmptyPanes() {
    const empty = PANE_ORDER.filter((n) => this.panes.has(n) && this.panes.get(n).getSeries().length === 0);
    if (!empty.length) return;
    for (const name of empty.reverse()) {
      this.chart.removePane(this.panes.get(name).paneIndex());
      this.panes.delete(name);
    }
    this._sizePanes();
  }

  // Lower panes get a fixed-ish share so the price pane keeps most of a phone screen.
  _sizePanes() {
    const n = this.panes.size;
    const h = this._el.clientHeight || 600;
    const sub = Math.min(120, Math.max(60, h * 0.13));
    const main = Math.max(h * 0.4, h - n * sub);
    this.chart.panes()[0].setStretchFactor(main / sub);
    for (const pane of this.panes.values()) pane.setStretchFactor(1);
  }

  _indicatorSeries(name) {
    let entry = this.ind.get(name);
    if (entry) return entry;
    const spec = indicatorSpec(name, [...this.ind.keys()].filter((n) => n.startsWith('EMA_')).length);
    if (!spec) return null;
    const opts = { ...NO_LABELS, title: '', ...spec.opts };
    let series;
    if (spec.pane === null) {
      opts.priceFormat = { type: 'price', precision: this.precision, minMove: 10 ** -this.precision };
      opts.autoscaleInfoProvider = this._overlayAutoscale();
      series = this.chart.addSeries(LC.LineSeries, opts, 0);
    } else {
      const type = spec.type === 'hist' ? LC.HistogramSeries : LC.LineSeries;
      series = this._paneSeries(spec.pane, type, { ...opts, lastValueVisible: true, priceFormat: { type: 'price', precision: 2, minMove: 0.01 } });
      if (spec.pane === 'RSI') {
        for (const price of [30, 70]) series.createPriceLine({ price, color: '#555a66', lineWidth: 1, lineStyle: LC.LineStyle.Dashed, axisLabelVisible: false });
        series.applyOptions({ autoscaleInfoProvider: () => ({ priceRange: { minValue: 0, maxValue: 100 } }) });
        series.priceScale().applyOptions({ scaleMargins: { top: 0.06, bottom: 0.06 } });
      }
    }
    entry = { series, spec };
    this.ind.set(name, entry);
    return entry;
  }

  _indicatorPoint(entry, name, row) {
    const v = row.values[name];
    const time = sec(row.open_time);
    if (v === null || v === undefined) return { time };
    const spec = entry.spec;
    if (spec.dir) return { time, value: v, color: row.values[spec.dir] < 0 ? DOWN : UP };
    if (spec.type === 'hist') return { time, value: v, color: v >= 0 ? 'rgba(38, 166, 154, 0.6)' : 'rgba(239, 83, 80, 0.6)' };
    return { time, value: v };
  }

  _orderflowSeries() {
    if (!this.delta) {
      this.delta = this._paneSeries('Delta', LC.HistogramSeries, { priceFormat: VOLUME_FORMAT, lastValueVisible: true, priceLineVisible: false });
      this.cvd = this._paneSeries('CVD', LC.LineSeries, { color: '#4dd0e1', lineWidth: 1, priceFormat: VOLUME_FORMAT, lastValueVisible: true, priceLineVisible: false });
    }
  }

  static candlePoint(c) {
    return { time: sec(c.open_time), open: +c.open, high: +c.high, low: +c.low, close: +c.close };
  }

  static volumePoint(c) {
    return { time: sec(c.open_time), value: +c.volume, color: +c.close >= +c.open ? 'rgba(38, 166, 154, 0.35)' : 'rgba(239, 83, 80, 0.35)' };
  }

  static deltaPoint(r) {
    const v = +r.delta;
    return { time: sec(r.open_time), value: v, color: v >= 0 ? UP : DOWN };
  }

  static cvdPoint(r) {
    return { time: sec(r.open_time), value: +r.cvd };
  }

  // Footprint items carry the candle's direction for the column outline.
  _footprintData(footprints, candles) {
    const out = new Array(footprints.length);
    let j = 0;
    for (let i = 0; i < footprints.length; i++) {
      const fp = footprints[i];
      while (j < candles.length && candles[j].open_time < fp.open_time) j++;
      const c = j < candles.length && candles[j].open_time === fp.open_time ? candles[j] : null;
      out[i] = { time: sec(fp.open_time), fp: parseFootprint(fp), up: c ? +c.close >= +c.open : undefined };
    }
    return out;
  }

  // Everything from the data arrays: first load, older bars prepended, gap refill.
  setAll({ candles, indicators, orderflow, footprints }) {
    this._setPrecision(candles);
    const n = candles.length;
    const bars = new Array(n);
    const vols = new Array(n);
    for (let i = 0; i < n; i++) {
      bars[i] = ChartView.candlePoint(candles[i]);
      vols[i] = ChartView.volumePoint(candles[i]);
    }
    this.candles.setData(bars);
    this.volume.setData(vols);
    this._setIndicators(indicators);
    if (orderflow.length) this._orderflowSeries();
    if (this.delta) {
      const deltas = new Array(orderflow.length);
      const cvds = new Array(orderflow.length);
      for (let i = 0; i < orderflow.length; i++) {
        deltas[i] = ChartView.deltaPoint(orderflow[i]);
        cvds[i] = ChartView.cvdPoint(orderflow[i]);
      }
      this.delta.setData(deltas);
      this.cvd.setData(cvds);
    }
    this.footprint.setData(this._footprintData(footprints, candles));
    this._dropEmptyPanes();
  }

  _setIndicators(rows) {
    const seen = new Set();
    for (let i = 0; i < rows.length; i++) for (const k in rows[i].values) seen.add(k);
    const entries = [];
    for (const name of sortNames([...seen])) {
      const entry = this._indicatorSeries(name);
      if (entry) entries.push([name, entry, new Array(rows.length)]);
    }
    for (let i = 0; i < rows.length; i++) for (const [name, entry, data] of entries) data[i] = this._indicatorPoint(entry, name, rows[i]);
    for (const [, entry, data] of entries) entry.series.setData(data);
  }

  // Live rows. `at` says where the row landed in its array: 'last' (appended or replacing
  // the newest), 'old' (replacing an older one) or 'insert' (new row in the middle).
  candle(c, at, state) {
    if (at === 'insert') return this.setAll(state);
    const old = at === 'old';
    this.candles.update(ChartView.candlePoint(c), old);
    this.volume.update(ChartView.volumePoint(c), old);
  }

  indicators(row, at, state) {
    const fresh = Object.keys(row.values).some((k) => !this.ind.has(k) && indicatorSpec(k, 0));
    if (at === 'insert' || fresh) return this._setIndicators(state.indicators);
    for (const name in row.values) {
      const entry = this.ind.get(name);
      if (entry) entry.series.update(this._indicatorPoint(entry, name, row), at === 'old');
    }
  }

  orderflow(row, at, state) {
    if (at === 'insert' || !this.delta) return this.setAll(state);
    this.delta.update(ChartView.deltaPoint(row), at === 'old');
    this.cvd.update(ChartView.cvdPoint(row), at === 'old');
  }

  footprintRow(fp, at, state) {
    if (at === 'insert') return this.footprint.setData(this._footprintData(state.footprints, state.candles));
    const c = state.candles.length ? state.candles[state.candles.length - 1] : null;
    const up = c && c.open_time === fp.open_time ? +c.close >= +c.open : undefined;
    this.footprint.update({ time: sec(fp.open_time), fp: parseFootprint(fp), up }, at === 'old');
  }
}
