"""The Binance USDⓈ-M client, shared by every stream the daemon takes.

protocol   stream names, frame and REST-row parsing, plausibility (pure)
symbols    symbol names and the exchange's listing (pure)
clock      the exchange's clock as the feed knows it (pure)
rest       REST client with the shared weight limiter
streams    one combined-stream WebSocket connection per route and stream set
"""
