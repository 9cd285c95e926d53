"""Network limits for one streamed HTTP body: timeouts and a minimum average throughput.

Fetchers (:class:`bstore.builders.download.DownloadPolicy`) and binary caches
(:class:`bstore.store.cache.backend.CachePolicy`) read untrusted servers the same way,
so both policies are this value plus their own knobs (size caps and retries; negative
caching and parallelism). A server that sends headers and then sleeps hits the read
timeout; one that drips a byte at a time is caught by :meth:`HttpLimits.stalled`.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Timeouts (seconds) and the minimum average rate (bytes per second) of a body."""

    connect_timeout: float
    read_timeout: float
    #: A body arriving slower than this on average over ``rate_window`` is a stall.
    min_rate: int
    rate_window: float

    def __post_init__(self) -> None:
        # Subclasses (the policies) are named in the message: it is their knob that is off.
        if min(self.connect_timeout, self.read_timeout, self.rate_window) <= 0:
            raise ValueError(f"{type(self).__name__} timeouts and rate_window must be positive")
        if self.min_rate < 0:
            raise ValueError(f"{type(self).__name__} min_rate must not be negative")

    def timeout(self) -> httpx.Timeout:
        """The httpx timeout these limits ask for."""
        return httpx.Timeout(self.read_timeout, connect=self.connect_timeout)

    def stalled(self, received: int, elapsed: float) -> bool:
        """Whether ``received`` bytes after ``elapsed`` seconds is below the minimum rate.

        Judged only once ``rate_window`` has passed, so a slow start is not a stall.
        """
        return elapsed >= self.rate_window and received < self.min_rate * elapsed
