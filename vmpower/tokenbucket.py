"""class TokenBucket: a rate limit, ``rate_per_s`` tokens a second with ``burst`` saved.

Channels take one a guest request (vmpower.channels); the hypervisor takes one a VM whose
vCPU times it reads apart (``Hypervisor.read_vcpu_times``).
"""

from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved; one token a request."""

    __slots__ = ("burst", "clock", "rate_per_s", "stamp", "tokens")

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take_many(self, now: float, count: int) -> int:
        """Take up to ``count`` tokens at once; returns how many were granted."""
        tokens = self.tokens
        if tokens < self.burst:  # compared inline, not min(): this runs every read
            tokens += (now - self.stamp) * self.rate_per_s
            if tokens > self.burst:
                tokens = self.burst
        self.stamp = now
        granted = count if tokens >= count else int(tokens)
        self.tokens = tokens - granted
        return granted

    def take(self, now: float) -> bool:
        tokens = self.tokens
        if tokens < self.burst:
            tokens = min(self.burst, tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def take_or_wait(self, now: float, count: int) -> float:
        """Take ``count`` tokens (at most ``burst``) if they are there: 0.0; else take
        none and return the seconds until they will be."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if tokens >= count:
            self.tokens = tokens - count
            return 0.0
        self.tokens = tokens
        return (count - tokens) / self.rate_per_s
