"""Instructions per request on the request path, counted by callgrind (load-proof).

Wall-clock figures on a shared 2-core machine move by a factor of 2 from run to run; an
instruction count does not. ``bench/hotpath_driver.py`` pushes N CPU_POWER requests
through ``PowerManager`` in process on real parts; running it for two N under
``valgrind --tool=callgrind`` and dividing the difference gives instructions per
request, start-up excluded. Three shapes: 16 requests per read (throughput), one per
read (a flush per request, the latency case), and ``bench/turn_driver.py``: one request
per monitor turn through a whole in-process ``daemon.Agent`` (epoll, recv, timers,
the write, send; the driver's own peer side is counted too, the same on both sides).
The daemon turn's bytecodes by module (bench/bytecodes.py) come with it: which of
vmpowerd's layers the instructions go to. With ``VMPOWER_BASELINE=/path/to/checkout``, the
same driver also runs against that checkout, and the ratio is reported: this is the
"no regression beyond 5 %" check of a refactoring.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "hotpath_driver.py"
TURN_DRIVER = HERE / "turn_driver.py"
SMALL, LARGE = 4_000, 20_000


def _driver(count: int, per_read: int) -> list[str]:
    """The driver's command line; ``per_read`` 0 is the whole-daemon turn driver."""
    if per_read:
        return [str(DRIVER), str(count), str(per_read)]
    return [str(TURN_DRIVER), str(count)]


def _instructions(pythonpath: Path, count: int, per_read: int) -> int:
    """Instructions of one driver run (``_driver``)."""
    driver = _driver(count, per_read)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                *driver,
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": str(pythonpath), "PYTHONHASHSEED": "0"},
            check=True,
        )
    match = re.search(r"Collected : (\d+)", run.stderr)
    if match is None:
        raise RuntimeError(f"callgrind printed no total: {run.stderr[-500:]}")
    return int(match.group(1))


def _warm(pythonpath: Path, per_read: int) -> None:
    """One short run outside callgrind: a stale or missing .pyc is compiled and written
    now, not in the first measured run (the parser's cost in one count, not the other)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    subprocess.run(
        [sys.executable, *_driver(16, per_read)], capture_output=True, env=env, check=True
    )


def per_request(pythonpath: Path, per_read: int) -> float:
    _warm(pythonpath, per_read)
    small = _instructions(pythonpath, SMALL, per_read)
    large = _instructions(pythonpath, LARGE, per_read)
    return (large - small) / (LARGE - SMALL)


def run() -> dict[str, object]:
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed"}
    baseline = os.environ.get("VMPOWER_BASELINE")
    figures: dict[str, object] = {}
    if baseline:
        figures["baseline"] = baseline
    # 16 requests per read is the throughput shape; 1 per read (a flush per request)
    # is the latency shape, where the per-turn cost is the request's cost; the daemon
    # turn is the latency shape through the whole agent (epoll, recv, send, timers).
    shapes = (("", 16), ("one_per_turn_", 1), ("daemon_turn_", 0))
    for shape, per_read in shapes:
        here = per_request(HERE.parent, per_read)
        figures[f"{shape}instructions_per_request"] = round(here)
        if baseline:
            base = per_request(Path(baseline), per_read)
            figures[f"{shape}baseline_instructions_per_request"] = round(base)
            figures[f"{shape}ratio_to_baseline"] = round(here / base, 4)
    figures["daemon_turn_bytecodes"] = bytecodes_per_turn()
    return figures


def bytecodes_per_turn() -> dict[str, object]:
    """The daemon turn's profile: its bytecodes, by module (bench/bytecodes.py)."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.bytecodes"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        check=True,
    )
    return json.loads(run.stdout.splitlines()[-1])
