"""Bytecodes per daemon turn, by module: where one request's turn spends its work.

``python -m bench.bytecodes`` runs bench/turn_driver.py (one CPU_POWER request per
monitor turn through a whole in-process ``daemon.Agent``) for two request counts under
``sys.settrace`` with opcode events, and prints JSON: the bytecodes one turn executes
(the difference of the two runs over the difference of the counts: start-up excluded),
in all and by module (``vmpower.power``, ``vmpower.monitor``, ..., ``logging``; the
driver's own peer side apart). It is the profile behind bench hotpath's instruction
count of the same turn: callgrind counts the interpreter's machine instructions, this
says which of vmpowerd's layers asked for them. The Python floor (bench/pyagent.py)
makes about 90 bytecodes a request.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from bench import turn_driver

WARM_UP, SMALL, LARGE = 100, 200, 600


def _module_of(filename: str) -> str:
    """``.../vmpower/cpufreq/core.py`` → ``vmpower.cpufreq.core``; others by file stem."""
    path = Path(filename)
    if path.name == "turn_driver.py":  # first: a checkout may itself be named vmpower
        return "driver (the peer side)"
    parts = path.with_suffix("").parts
    if "vmpower" in parts:
        return ".".join(parts[len(parts) - 1 - parts[::-1].index("vmpower") :])
    if path.parent.name == "logging":
        return "logging"
    return path.stem


def _count(turns: int) -> Counter[str]:
    counts: Counter[str] = Counter()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        module = _module_of(frame.f_code.co_filename)

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[module] += 1
            return local

        return local

    sys.settrace(tracer)
    try:
        turn_driver.main(turns)
    finally:
        sys.settrace(None)
    return counts


def per_turn() -> dict[str, object]:
    _count(WARM_UP)  # first uses (caches, specialization) in neither counted run
    small, large = _count(SMALL), _count(LARGE)
    by_module = {
        module: round((large[module] - small.get(module, 0)) / (LARGE - SMALL), 1)
        for module in large
    }
    driver = by_module.get("driver (the peer side)", 0.0)
    total = round(sum(by_module.values()) - driver, 1)  # every module, the small ones too
    shown = {m: n for m, n in sorted(by_module.items(), key=lambda kv: -kv[1]) if n >= 0.5}
    return {"bytecodes_per_turn": total, "by_module": shown}


if __name__ == "__main__":
    print(json.dumps(per_turn()))
