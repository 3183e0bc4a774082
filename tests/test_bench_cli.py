"""`python -m bench` (make bench's entry): --help lists the benchmarks; a wrong name is a
clear error before anything runs, not a traceback after the ones before it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help_lists_every_benchmark_and_runs_none() -> None:
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m bench [NAME ...]")
    listed = done.stdout.split("benchmarks: ", 1)[1].split()
    assert listed == sorted(p.stem[len("bench_") :] for p in (ROOT / "bench").glob("bench_*.py"))
    assert "== bench" not in done.stdout


def test_an_unknown_name_is_refused_before_anything_runs() -> None:
    done = bench("protocol", "nope")
    assert done.returncode == 2
    known = sorted(p.stem[len("bench_") :] for p in (ROOT / "bench").glob("bench_*.py"))
    assert done.stderr == f"bench: no such benchmark: nope (known: {' '.join(known)})\n"
    assert "Traceback" not in done.stderr
    assert "== bench" not in done.stdout  # protocol, named first, did not run either
