"""History from Binance's public archives (data.binance.vision): `feed-v4 import`."""
