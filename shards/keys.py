"""How a symbol appears in its Redis keys: `ohlcv:BTCUSDT:m1:c` on a single Redis,
`ohlcv:{BTCUSDT}:m1:c` on a Redis Cluster. The braces are Redis Cluster's hash tag: a
symbol's keys then hash to one slot, so they live on one node, a pipeline of one
symbol's writes goes to one node and a command naming several of them (TS.MADD of the
five fields) is legal.

Single Redis keeps the names of SPEC section 5 by default, so that every reader built
for them keeps working; `REDIS_HASH_TAGS=on` gives it the cluster's names (for moving a
deployment to a cluster with the same names). The scheme is decided once at boot from
the server (`connections.connect_redis`) and holds for the whole process; keys already
stored under the other scheme are renamed once (`shards.cluster.migrate_key_names`).
"""

from __future__ import annotations

import re

# The prefixes of every per-symbol key: `<prefix>:<SYMBOL>` then, for most, `:<rest>`.
SYMBOL_KEY_PREFIXES: tuple[str, ...] = ("ohlcv", "price", "indicator", "orderflow", "footprint", "book", "features")

_tagged = False


def use_hash_tags(on: bool) -> None:
    """Set at boot: whether this process names per-symbol keys with a hash tag."""
    global _tagged
    _tagged = on


def hash_tags() -> bool:
    return _tagged


def symbol_part(symbol: str) -> str:
    """The symbol as it appears in its keys."""
    return f"{{{symbol}}}" if _tagged else symbol


_PREFIXES = "|".join(SYMBOL_KEY_PREFIXES)
_SYMBOL_KEY = re.compile(rf"^({_PREFIXES}):(\{{[^{{}}:]+\}}|[^{{}}:]+)(:.*)?$")


def renamed_key(key: str, tagged: bool) -> str | None:
    """`key` under the other scheme's name when it is a per-symbol key stored under the
    scheme that is not `tagged`'s; None when it is already right or not such a key."""
    match = _SYMBOL_KEY.match(key)
    if match is None:
        return None
    prefix, part, rest = match.group(1), match.group(2), match.group(3) or ""
    is_tagged = part.startswith("{")
    if is_tagged == tagged:
        return None
    symbol = part[1:-1] if is_tagged else part
    return f"{prefix}:{{{symbol}}}{rest}" if tagged else f"{prefix}:{symbol}{rest}"
