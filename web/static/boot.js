// Starts the first data load the moment this module runs. index.html loads it async,
// ahead of the chart library and app.js, so the answers are on their way while those parse.

import { fetchRange } from './api.js';

export const INITIAL_BARS = 1000;

const q = new URLSearchParams(location.search);
const symbol = q.get('symbol');
const tf = q.get('tf');

export const early = symbol && tf ? { symbol, tf, rows: fetchRange(symbol, tf, undefined, INITIAL_BARS) } : null;
// Handled by app.js when it takes the answer; this only keeps an early failure from being
// reported as an unhandled rejection before then.
if (early) early.rows.catch(() => {});
