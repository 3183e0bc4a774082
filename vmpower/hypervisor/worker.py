"""class LibvirtWorker: the one thread that makes libvirt calls, off the monitor thread.

Why: a libvirt call is an RPC to libvirtd and waits as long as libvirtd does; with
libvirtd SIGSTOPped one call held the monitor loop 61 s and every guest with it (issue
#11, point 4). The owner (the monitor thread) submits a *job*: a call to run here and a
``done`` callback. The call runs on this thread and returns plain data (or raises); then
``done(job)`` runs on the owner thread, handed over through ``post`` (the monitor's
``call_soon_threadsafe``), and applies the result. So only the owner changes agent state,
and the worker only calls libvirt (docs/architecture.md, "One thread, one loop").

Jobs run one at a time, in submission order. The queue is bounded, and a job with a
``key`` is not queued twice (the request path asks for a VM's map on every read while
the map is stale: one queued re-read per VM is enough). ``stalled_s()`` says how long
the current call has been waiting: the owner's measure of whether libvirt responds.

Without ``post`` (tests, benchmarks, tools without a loop) every job runs inline, on the
caller's thread, and its ``done`` runs before ``submit`` returns.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_QUEUED = 256  # jobs waiting behind a hung call; past it, submit() refuses

Post = Callable[[Callable[[], None]], None]


class Job:
    """One libvirt call and what to do with its outcome on the owner thread."""

    __slots__ = ("_applied", "_call", "_done", "_error", "_finished", "_ran", "_value", "key")

    def __init__(
        self,
        call: Callable[[], Any],
        done: Callable[[Job], None],
        key: str | None,
        *,
        waitable: bool,
    ) -> None:
        self.key = key
        self._call = call
        self._done = done
        self._value: Any = None
        self._error: BaseException | None = None
        self._ran = False
        # Only a job run on the worker is waited for; inline ones skip the Event's cost.
        self._finished = threading.Event() if waitable else None
        self._applied = False

    def run(self) -> None:
        """Worker side: make the call, keep its value or exception."""
        try:
            self._value = self._call()
        except Exception as exc:  # handed to the owner, who knows what it means
            self._error = exc
        self._ran = True

    def signal(self) -> None:
        """Worker side, after ``run``: wake whoever waits for this job."""
        if self._finished is not None:
            self._finished.set()

    def wait(self, timeout_s: float | None) -> bool:
        """Owner side: wait at most ``timeout_s`` for the call; True when it finished."""
        if self._finished is None:
            return self._ran
        return self._finished.wait(timeout_s)

    def apply(self) -> None:
        """Owner side: run ``done`` once (posted by the worker, or by a caller that waited)."""
        if self._applied or not self._ran:
            return
        self._applied = True
        try:
            self._done(self)
        except Exception:
            log.exception("applying a libvirt result")

    def outcome(self) -> Any:
        """The call's value; raises what the call raised."""
        if self._error is not None:
            raise self._error
        return self._value


class LibvirtWorker:
    """Runs submitted libvirt calls on one daemon thread; hands each outcome back."""

    def __init__(
        self,
        post: Post | None,
        clock: Callable[[], float] = time.monotonic,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._post = post
        self._clock = clock
        self._max_queued = max_queued
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._keys: set[str] = set()
        self._busy_since: float | None = None
        # Jobs that ran, in the order they ran, whose outcomes are not applied yet
        # (apply_through): at most the queue's bound plus the one running.
        self._ran_jobs: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(
        self,
        call: Callable[[], Any],
        done: Callable[[Job], None],
        key: str | None = None,
        urgent: bool = False,
    ) -> Job | None:
        """Queue ``call``; None when not queued (same ``key`` waiting, queue full, closed).

        ``urgent``: ahead of the queued jobs (an operator's call, which the monitor thread
        waits for, must not wait behind up to MAX_QUEUED background map re-reads: issue
        #16, add_vm p99 under guest traffic).
        """
        if self._post is None:
            job = Job(call, done, key, waitable=False)
            job.run()
            job.apply()
            return job
        # The request path asks again on every read while a map is stale: refusing a
        # duplicate must cost a set look-up, not a Job.
        if key is not None and key in self._keys:
            return None
        with self._cond:
            if self._closing:
                return None
            if key is not None and key in self._keys:
                return None
            if len(self._queue) >= self._max_queued:
                return None
            job = Job(call, done, key, waitable=True)
            if urgent:
                self._queue.appendleft(job)
            else:
                self._queue.append(job)
            if key is not None:
                self._keys.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="libvirt-calls", daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def stalled_s(self) -> float:
        """How long the call in progress has been waiting for libvirt (0: none running)."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def queued(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return len(self._queue)

    def idle(self) -> bool:
        return self._busy_since is None and not self._queue

    def close(self, timeout_s: float) -> bool:
        """Run what is queued, then stop; False if a call is still hung after ``timeout_s``.

        A hung call keeps its (daemon) thread; its outcome is dropped.
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                if job.key is not None:
                    self._keys.discard(job.key)
                self._busy_since = self._clock()
            job.run()
            self._busy_since = None
            post = self._post
            with self._cond:
                ran = post is not None and not self._closing
                if ran:
                    self._ran_jobs.append(job)
            job.signal()  # after the append: a waiter applies through this job
            if ran:
                post(functools.partial(self.apply_through, job))

    def apply_through(self, job: Job) -> None:
        """Owner side: apply the outcomes of the jobs that ran before ``job``, then its
        own, in the order they ran.

        Posted outcomes reach the owner in that order. An operator's call that waited
        for its job applies it at once, ahead of outcomes posted before it: applied
        after it, a map re-read made before a set_pcpu put the old pins back, and the
        guest's next request acted on the host CPU its vCPU had left (issue #16, the
        e2e libvirt stall test). Each outcome is applied once (``Job.apply``).
        """
        while True:
            with self._cond:
                earlier = self._ran_jobs.popleft() if self._ran_jobs else None
            if earlier is None or earlier is job:
                break
            earlier.apply()
        job.apply()
