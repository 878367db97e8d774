"""The Python client (`feed_v4_client.py`) against the read API on real servers: the
three-line use, paging past the API's page size, exact decimals, and refusals."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pandas as pd
import pytest
from web_data import BARS, FLOW_BARS, M1, SYMBOL, T0, TOKEN, seed, serve

import feed_v4_client
from feed_v4_client import FeedApiError, FeedClient


async def test_candles_with_indicators_order_flow_and_features_as_dataframes(pool, redis, monkeypatch):
    seeded = await seed(pool, redis)
    monkeypatch.setattr(feed_v4_client, "PAGE", 7)  # pages of 7 rows: the paging is exercised
    async with serve(pool, redis) as (base, _):
        feed = FeedClient(base, token=TOKEN)
        df = await asyncio.to_thread(feed.candles, SYMBOL, "m1", limit=50, indicators=True)
        assert len(df) == 50 and df.index.is_monotonic_increasing and str(df.index.tz) == "UTC"
        assert df.index[-1] == pd.Timestamp(T0 + (BARS - 1) * M1, unit="ms", tz="UTC")
        want = [c for c in seeded["candles"] if c.symbol == SYMBOL][-50:]
        assert df["close"].tolist() == [float(c.close) for c in want] and df["close"].dtype == "float64"
        assert df["trades"].tolist() == [c.trades for c in want]
        assert df["EMA_TEST"].iloc[-2] == 65000.0 + (BARS - 2) / 8 and df["EMA_TEST"].iloc[-1] == 65010.5
        assert df["RSI_TEST"].isna().iloc[-1] and not df["RSI_TEST"].isna().iloc[-2]

        exact = await asyncio.to_thread(feed.candles, SYMBOL, "m1", limit=3, exact=True)
        assert exact["high"].tolist() == [c.high for c in want[-3:]] and isinstance(exact["high"].iloc[0], Decimal)

        flow = await asyncio.to_thread(feed.orderflow, SYMBOL, "m1", limit=100)
        assert len(flow) == FLOW_BARS and (flow["buy_volume"] + flow["sell_volume"] > 0).all()
        assert flow["delta"].round(8).tolist() == (flow["buy_volume"] - flow["sell_volume"]).round(8).tolist()

        features = await asyncio.to_thread(feed.features, SYMBOL, limit=100)
        assert len(features) == 11 and features["microprice"].iloc[-1] == 65010.5 and features["vpin"].isna().all()

        rows = await asyncio.to_thread(feed.footprint, SYMBOL, "m1")
        assert rows.attrs["final"] is False and len(rows) > 5 and {"bid_volume", "ask_volume"} <= set(rows.columns)
        book = await asyncio.to_thread(feed.book, SYMBOL)
        assert book["bids"]["price"].tolist() == [64999.9, 64999.5] and book["update_id"] == 123456

        with pytest.raises(FeedApiError, match="not an enabled ticker") as refused:
            await asyncio.to_thread(feed.candles, "NOPEUSDT")
        assert refused.value.status == 400
        with pytest.raises(FeedApiError, match="token") as refused:
            await asyncio.to_thread(FeedClient(base, token="wrong-token-0123456789").symbols)
        assert refused.value.status == 401
