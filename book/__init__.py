"""The order book: local books synchronised on the diff depth stream, the depth filter,
one-second bars and microstructure features (issue 16)."""
