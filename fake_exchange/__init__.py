"""A protocol-faithful fake Binance USDⓈ-M futures exchange for tests, `make demo` and benchmarks.

Run it: `python -m fake_exchange --source archive --speed 60`. See server.FakeExchange.
"""

from .clock import SimClock
from .faults import Faults, Stats
from .recordings import RecordedTrades, RecordingSource
from .rest_api import klines_weight
from .scheduler import update_offsets
from .server import FakeExchange
from .sources import ArchiveSource, CandleSource, SyntheticSource

__all__ = [
    "ArchiveSource",
    "CandleSource",
    "FakeExchange",
    "Faults",
    "RecordedTrades",
    "RecordingSource",
    "SimClock",
    "Stats",
    "SyntheticSource",
    "klines_weight",
    "update_offsets",
]
