// Footprint chart as a lightweight-charts custom series: one column per bar, one cell per
// price row, drawn straight on the canvas for the visible bars only.

const TEXT_MIN_SPACING = 56; // css px per bar before "bid × ask" text can fit
const TEXT_MIN_ROW = 9; // css px per row before text is readable
const ROWS_MIN_SPACING = 5; // below this a bar only shows its value area and POC

const BID = '#ef5350';
const ASK = '#26a69a';
const BID_IMB = '#ff1744';
const ASK_IMB = '#00e676';
const VA_FILL = 'rgba(100, 149, 237, 0.14)';
const POC = '#ffd54f';
const TEXT = '#d1d4dc';
const UP_EDGE = 'rgba(38, 166, 154, 0.55)';
const DOWN_EDGE = 'rgba(239, 83, 80, 0.55)';
const FLAT_EDGE = 'rgba(160, 160, 160, 0.45)';

// Compact volume text: the cell is narrow, precision beyond 3 significant digits is noise.
function fmtVol(v) {
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(0) + 'k';
  if (a >= 1e3) return (v / 1e3).toFixed(1) + 'k';
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

// Row index of a price (a row's low edge); rows may have gaps, so search rather than divide.
function rowOf(prices, p) {
  let lo = 0;
  let hi = prices.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    const d = prices[mid] - p;
    if (Math.abs(d) < 1e-9 * Math.max(1, Math.abs(p))) return mid;
    if (d < 0) lo = mid + 1;
    else hi = mid - 1;
  }
  return -1;
}

function pairs(list) {
  const out = [];
  for (const [a, b] of list || []) out.push(+a, +b);
  return out;
}

// A footprint as the series holds it: its price extent now (autoscale needs it for every
// bar), the rows' numbers only once the bar is first drawn (most bars never are). Cached on
// the API object, so prepends and live updates reuse it.
export function parseFootprint(fp) {
  if (fp._p) return fp._p;
  const rows = fp.rows || [];
  const n = rows.length;
  const rs = +fp.row_size;
  fp._p = { fp, n, rs, final: fp.final !== false, lo: n ? +rows[0].price : NaN, hi: n ? +rows[n - 1].price + rs : NaN, rows: null };
  return fp._p;
}

// Numbers out of the API's decimal strings for drawing.
function detail(p) {
  if (p.rows) return p.rows;
  const { fp, n } = p;
  const price = new Float64Array(n);
  const bid = new Float64Array(n);
  const ask = new Float64Array(n);
  let maxVol = 0;
  for (let i = 0; i < n; i++) {
    const r = fp.rows[i];
    price[i] = +r.price;
    const b = +r.bid_volume;
    const a = +r.ask_volume;
    bid[i] = b;
    ask[i] = a;
    if (b > maxVol) maxVol = b;
    if (a > maxVol) maxVol = a;
  }
  const flags = new Uint8Array(n); // 1: buy imbalance (ask side), 2: sell imbalance (bid side)
  const imb = fp.imbalances || {};
  for (const x of imb.buy || []) {
    const k = rowOf(price, +x);
    if (k >= 0) flags[k] |= 1;
  }
  for (const x of imb.sell || []) {
    const k = rowOf(price, +x);
    if (k >= 0) flags[k] |= 2;
  }
  const num = (v) => (v == null || v === '' ? NaN : +v);
  p.rows = {
    n,
    rs: p.rs,
    final: p.final,
    price,
    bid,
    ask,
    flags,
    maxVol,
    poc: rowOf(price, num(fp.poc)),
    vah: num(fp.vah),
    val: num(fp.val),
    stBuy: pairs(fp.stacked && fp.stacked.buy),
    stSell: pairs(fp.stacked && fp.stacked.sell),
    lo: p.lo,
    hi: p.hi,
    texts: null,
  };
  return p.rows;
}

function texts(p) {
  if (!p.texts) {
    const bidTxt = new Array(p.n);
    const askTxt = new Array(p.n);
    let longest = '';
    for (let i = 0; i < p.n; i++) {
      bidTxt[i] = fmtVol(p.bid[i]);
      askTxt[i] = fmtVol(p.ask[i]);
      if (bidTxt[i].length > longest.length) longest = bidTxt[i];
      if (askTxt[i].length > longest.length) longest = askTxt[i];
    }
    p.texts = { bidTxt, askTxt, longest };
  }
  return p.texts;
}

class FootprintRenderer {
  constructor() {
    this._data = null;
    this._widths = new Map(); // "font|text" -> px: measureText is the slow part of text drawing
    this.drawn = 0; // columns drawn in the last paint (a test hook)
  }

  update(data) {
    this._data = data;
  }

  draw(target, priceToCoordinate) {
    const d = this._data;
    this.drawn = 0;
    if (!d || !d.visibleRange || d.bars.length === 0) return;
    target.useBitmapCoordinateSpace((scope) => this._drawBars(scope, priceToCoordinate, d));
  }

  _width(ctx, font, text) {
    const key = font + '|' + text;
    let w = this._widths.get(key);
    if (w === undefined) {
      if (this._widths.size > 5000) this._widths.clear();
      w = ctx.measureText(text).width;
      this._widths.set(key, w);
    }
    return w;
  }

  _drawBars(scope, toY, d) {
    const ctx = scope.context;
    const hpr = scope.horizontalPixelRatio;
    const vpr = scope.verticalPixelRatio;
    const height = scope.bitmapSize.height;
    const spacing = d.barSpacing * (d.conflationFactor || 1);
    const colW = Math.max(1, Math.floor(spacing * 0.88 * hpr));
    const y = (p) => {
      const c = toY(p);
      return c === null ? NaN : c * vpr;
    };
    ctx.save();
    ctx.textBaseline = 'middle';
    const { from, to } = d.visibleRange;
    for (let i = Math.max(0, from); i < Math.min(to, d.bars.length); i++) {
      const bar = d.bars[i];
      const item = bar.originalData;
      if (!item || !item.fp || item.fp.n === 0) continue;
      const yTop = y(item.fp.hi);
      const yBot = y(item.fp.lo);
      if (!(yBot >= 0 && yTop <= height)) continue; // off screen vertically (or unscaled)
      const p = detail(item.fp);
      this.drawn++;
      const left = Math.round(bar.x * hpr) - (colW >> 1);
      this._valueArea(ctx, p, y, left, colW);
      if (spacing < ROWS_MIN_SPACING) {
        this._pocOnly(ctx, p, y, left, colW, vpr);
        continue;
      }
      const rowCss = Math.abs(y(p.price[0]) - y(p.price[0] + p.rs)) / vpr;
      const drewText = spacing >= TEXT_MIN_SPACING && rowCss >= TEXT_MIN_ROW && this._textCells(ctx, p, y, left, colW, hpr, vpr, rowCss);
      if (!drewText) this._histCells(ctx, p, y, left, colW, vpr);
      this._poc(ctx, p, y, left, colW, hpr);
      this._stacked(ctx, p, y, left, colW, hpr);
      this._edge(ctx, item, p, yTop, yBot, left, colW, hpr);
    }
    ctx.restore();
  }

  _valueArea(ctx, p, y, left, colW) {
    if (isNaN(p.vah) || isNaN(p.val)) return;
    const t = Math.round(y(p.vah + p.rs));
    const b = Math.round(y(p.val));
    ctx.fillStyle = VA_FILL;
    ctx.fillRect(left, t, colW, b - t);
  }

  _pocOnly(ctx, p, y, left, colW, vpr) {
    if (p.poc < 0) return;
    const mid = y(p.price[p.poc] + p.rs / 2);
    ctx.fillStyle = POC;
    ctx.fillRect(left, Math.round(mid - vpr), colW, Math.max(1, Math.round(2 * vpr)));
  }

  // Two-sided histogram: sellers (bid) grow left from the centre, buyers (ask) right.
  _histCells(ctx, p, y, left, colW, vpr) {
    const half = colW / 2;
    const mid = left + half;
    const gap = colW > 6 ? Math.max(1, Math.round(vpr)) : 0;
    const scale = p.maxVol > 0 ? half / p.maxVol : 0;
    for (let k = 0; k < p.n; k++) {
      const t = Math.round(y(p.price[k] + p.rs));
      const h = Math.max(1, Math.round(y(p.price[k])) - t - gap);
      const f = p.flags[k];
      const bl = Math.round(p.bid[k] * scale);
      const al = Math.round(p.ask[k] * scale);
      ctx.globalAlpha = f & 2 ? 1 : 0.6;
      ctx.fillStyle = f & 2 ? BID_IMB : BID;
      ctx.fillRect(mid - bl, t, bl, h);
      ctx.globalAlpha = f & 1 ? 1 : 0.6;
      ctx.fillStyle = f & 1 ? ASK_IMB : ASK;
      ctx.fillRect(mid, t, al, h);
    }
    ctx.globalAlpha = 1;
  }

  // "bid × ask" cells, shaded by volume; false when the numbers would not fit.
  _textCells(ctx, p, y, left, colW, hpr, vpr, rowCss) {
    const { bidTxt, askTxt, longest } = texts(p);
    const fontPx = Math.round(Math.min(12, rowCss * 0.8) * vpr);
    const font = `${fontPx}px -apple-system, BlinkMacSystemFont, 'Trebuchet MS', Roboto, Ubuntu, sans-serif`;
    ctx.font = font;
    const half = colW / 2;
    const pad = Math.round(5 * hpr);
    if (this._width(ctx, font, longest) > half - pad - 2 * hpr) return false;
    const mid = Math.round(left + half);
    const scale = p.maxVol > 0 ? 0.45 / p.maxVol : 0;
    for (let k = 0; k < p.n; k++) {
      const t = Math.round(y(p.price[k] + p.rs));
      const h = Math.round(y(p.price[k])) - t - 1;
      const f = p.flags[k];
      ctx.globalAlpha = f & 2 ? 0.85 : 0.08 + p.bid[k] * scale;
      ctx.fillStyle = f & 2 ? BID_IMB : BID;
      ctx.fillRect(left, t, mid - left, h);
      ctx.globalAlpha = f & 1 ? 0.85 : 0.08 + p.ask[k] * scale;
      ctx.fillStyle = f & 1 ? ASK_IMB : ASK;
      ctx.fillRect(mid, t, left + colW - mid, h);
      ctx.globalAlpha = 1;
      const ty = t + h / 2;
      ctx.fillStyle = TEXT;
      ctx.textAlign = 'right';
      ctx.fillText(bidTxt[k], mid - pad, ty);
      ctx.textAlign = 'left';
      ctx.fillText(askTxt[k], mid + pad, ty);
      ctx.textAlign = 'center';
      ctx.fillStyle = '#787b86';
      ctx.fillText('×', mid, ty);
    }
    return true;
  }

  _poc(ctx, p, y, left, colW, hpr) {
    if (p.poc < 0) return;
    const lw = Math.max(1, Math.floor(hpr));
    const t = Math.round(y(p.price[p.poc] + p.rs));
    const b = Math.round(y(p.price[p.poc]));
    ctx.strokeStyle = POC;
    ctx.lineWidth = lw;
    ctx.strokeRect(left + lw / 2, t + lw / 2, colW - lw, b - t - lw);
  }

  // Stacked imbalance runs: a strip inside the column, buyers' on the right, sellers' left.
  _stacked(ctx, p, y, left, colW, hpr) {
    const w = Math.max(Math.round(2 * hpr), Math.round(colW * 0.06));
    const strip = (runs, x, color) => {
      ctx.fillStyle = color;
      for (let j = 0; j < runs.length; j += 2) {
        const t = Math.round(y(runs[j + 1] + p.rs));
        const b = Math.round(y(runs[j]));
        ctx.fillRect(x, t, w, b - t);
      }
    };
    strip(p.stBuy, left + colW + Math.round(hpr), ASK_IMB);
    strip(p.stSell, left - w - Math.round(hpr), BID_IMB);
  }

  // Thin outline in the bar's direction (the candle itself is hidden in this view);
  // dashed while the bar is still forming.
  _edge(ctx, item, p, yTop, yBot, left, colW, hpr) {
    const lw = Math.max(1, Math.floor(hpr));
    ctx.strokeStyle = item.up === undefined ? FLAT_EDGE : item.up ? UP_EDGE : DOWN_EDGE;
    ctx.lineWidth = lw;
    if (!p.final) ctx.setLineDash([3 * lw, 3 * lw]);
    ctx.strokeRect(left - 0.5 * lw, Math.round(yTop) - 0.5 * lw, colW + lw, Math.round(yBot - yTop) + lw);
    if (!p.final) ctx.setLineDash([]);
  }
}

export class FootprintView {
  constructor() {
    this._renderer = new FootprintRenderer();
  }

  renderer() {
    return this._renderer;
  }

  update(data) {
    this._renderer.update(data);
  }

  priceValueBuilder(item) {
    const p = item.fp;
    return [p.lo, p.hi, (p.lo + p.hi) / 2];
  }

  isWhitespace(item) {
    return !item.fp || item.fp.n === 0;
  }

  defaultOptions() {
    return { ...LightweightCharts.customSeriesDefaultOptions, lastValueVisible: false, priceLineVisible: false };
  }
}
