// Depth ladder: the depth filter's book as horizontal bars at the right edge of the price
// pane, bids green and asks red, length by quantity. A series primitive, so it shares the
// price series' scale.

const BUCKET_CSS = 3; // levels closer than this many css px are summed into one bar
const MAX_LEN_CSS = 140;
const BID = 'rgba(38, 166, 154, 0.5)';
const ASK = 'rgba(239, 83, 80, 0.5)';

function side(levels) {
  const n = levels.length;
  const price = new Float64Array(n);
  const qty = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    price[i] = +levels[i][0];
    qty[i] = +levels[i][1];
  }
  return { price, qty };
}

export class Ladder {
  constructor() {
    this._series = null;
    this._request = null;
    this._book = null;
    this._view = { zOrder: () => 'bottom', renderer: () => this._renderer };
    this._renderer = { draw: (target) => this._draw(target) };
  }

  attached({ series, requestUpdate }) {
    this._series = series;
    this._request = requestUpdate;
  }

  detached() {
    this._series = null;
    this._request = null;
  }

  paneViews() {
    return this._book ? [this._view] : [];
  }

  get levels() {
    return this._book ? this._book.bids.price.length + this._book.asks.price.length : 0;
  }

  setBook(book) {
    this._book = { bids: side(book.bids || []), asks: side(book.asks || []) };
    if (this._request) this._request();
  }

  _draw(target) {
    const s = this._series;
    if (!s || !this._book) return;
    target.useBitmapCoordinateSpace(({ context: ctx, bitmapSize, mediaSize, horizontalPixelRatio: hpr, verticalPixelRatio: vpr }) => {
      const pTop = s.coordinateToPrice(0);
      const pBot = s.coordinateToPrice(mediaSize.height);
      if (pTop === null || pBot === null || !(pTop > pBot)) return;
      const bucket = ((pTop - pBot) / mediaSize.height) * BUCKET_CSS;
      const bids = this._sum(this._book.bids, bucket, pBot, pTop);
      const asks = this._sum(this._book.asks, bucket, pBot, pTop);
      let max = 0;
      for (const q of bids.values()) max = Math.max(max, q);
      for (const q of asks.values()) max = Math.max(max, q);
      if (max <= 0) return;
      const maxLen = Math.min(bitmapSize.width * 0.2, MAX_LEN_CSS * hpr);
      const right = bitmapSize.width;
      const paint = (sums, color) => {
        ctx.fillStyle = color;
        for (const [k, q] of sums) {
          const t = Math.round(s.priceToCoordinate((k + 1) * bucket) * vpr);
          const b = Math.round(s.priceToCoordinate(k * bucket) * vpr);
          const len = Math.max(1, Math.round((q / max) * maxLen));
          ctx.fillRect(right - len, t, len, Math.max(1, b - t - 1));
        }
      };
      paint(bids, BID);
      paint(asks, ASK);
    });
  }

  // Quantity per price bucket, visible prices only.
  _sum({ price, qty }, bucket, lo, hi) {
    const out = new Map();
    for (let i = 0; i < price.length; i++) {
      const p = price[i];
      if (p < lo || p > hi) continue;
      const k = Math.floor(p / bucket);
      out.set(k, (out.get(k) || 0) + qty[i]);
    }
    return out;
  }
}
