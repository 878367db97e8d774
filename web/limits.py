"""Per-client limits of the read API: a token bucket of requests and a count of open
WebSockets per client. Pure (the caller passes the clock), so it is tested without a
server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestBuckets:
    """`rate` requests a second per client, bursts of up to `burst`. Clients idle long
    enough to have a full bucket are forgotten, so the table stays bounded by the
    clients active within the last `burst / rate` seconds (and by `max_clients`)."""

    rate: float
    burst: float
    max_clients: int = 100_000
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # client -> (tokens, at)

    def take(self, client: str, now: float) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_clients:
            self.forget_idle(now)
        return 0.0

    def forget_idle(self, now: float) -> None:
        full = self.burst / self.rate
        for client, (_, at) in list(self._buckets.items()):
            if now - at >= full:
                del self._buckets[client]
        while len(self._buckets) > self.max_clients:  # still too many: drop the oldest
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class ConnectionCounts:
    """Open WebSockets, per client and in all."""

    per_client: int
    total: int
    _open: dict[str, int] = field(default_factory=dict)

    def refusal(self, client: str) -> str | None:
        """Why one more connection from `client` is refused, or None (then it is counted)."""
        if sum(self._open.values()) >= self.total:
            return f"the server holds its limit of {self.total} WebSockets; try again later"
        if self._open.get(client, 0) >= self.per_client:
            return f"at most {self.per_client} WebSockets per client (WEB_WS_PER_CLIENT)"
        self._open[client] = self._open.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        left = self._open.get(client, 0) - 1
        if left > 0:
            self._open[client] = left
        else:
            self._open.pop(client, None)

    @property
    def open(self) -> int:
        return sum(self._open.values())
