"""What the cyclic collector walks: state built to last is kept out of its passes.

CPython's collector (3.11) pauses the thread that allocates, inside a loop turn, for a
time that grows with the objects it walks. The daemon's start builds ten-odd objects a
channel that live as long as their VM: ``daemon.main`` freezes them (``gc.freeze``)
once the start is done, and no pass walks them again.

A VM that arrives later (started, defined, ``add_vm``) builds the same objects, and
without this module they stayed in the young generation: its pass is due when
allocations outnumber deallocations by the threshold (700), and every object freed
counts as a deallocation, the frozen ones too. A VM leaving frees its objects, one
arriving builds as many: the count stays low while the young generation grows, one
VM's worth each time. The scale bench's churn (300 VMs re-added under guest traffic)
ended in one young pass over 18 000 objects that held the loop 7-18 ms (issue #16).

So a turn in which a VM's channels were opened ends (after its replies are sent) with
``settle``: a young pass first, so that cycles already garbage are freed rather than
kept for good, then the freeze, which moves every generation's objects out of the
collector's reach in constant time. What is frozen and later becomes cyclic garbage is
never freed; a VM's objects form no such cycles (tests/test_heap.py churns VMs and
counts what a full collection finds), as for those frozen at the start.
"""

from __future__ import annotations

import gc


class HeapKeeper:
    """Freezes what a turn built to last, at the end of that turn."""

    def __init__(self) -> None:
        self._kept = False  # this turn built long-lived state

    def note_kept(self) -> None:
        """Long-lived state was built this turn (a VM's channels opened)."""
        self._kept = True

    def end_of_turn(self) -> None:
        if self._kept:
            self._kept = False
            self.settle()

    def settle(self) -> None:
        """Free the young garbage, then freeze what is left."""
        gc.collect(0)
        gc.freeze()
