"""Order flow: aggTrades folded into per-candle flow and footprints. Pure logic, no I/O
(fold.py: trades into bars; profile.py: what a footprint's rows say; rows.py: the row size)."""
