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


def test_a_p99_over_100_samples_is_their_99th_not_their_maximum() -> None:
    """The scale case's add_vm "p99" over 100 samples indexed int(0.99 * n): the 100th,
    its maximum, so one outlier was the p99 (issue #16). Nearest rank: the 99th."""
    sys.path.insert(0, str(ROOT))
    try:
        from bench.bench_scale import _ms_summary
    finally:
        sys.path.remove(str(ROOT))
    summary = _ms_summary([float(v) for v in range(100, 0, -1)])
    assert (summary["p50_ms"], summary["p99_ms"], summary["max_ms"]) == (50.0, 99.0, 100.0)


def test_the_framing_bench_counts_the_packets_the_stream_gives() -> None:
    """bench protocol's framing figure feeds a stream in pieces and checks the count: it
    failed `make bench` once the stream gave a read's packets as one bytes."""
    from bench.bench_protocol import _stream_rate_per_s
    from vmpower import protocol

    packet = protocol.encode_packet(protocol.Packet(resource_id=0, unit=1, command=1))
    blob = packet * 50
    for chunk_bytes in (100, 464, 4096, len(blob)):
        assert _stream_rate_per_s(blob, chunk_bytes, 50) > 0
