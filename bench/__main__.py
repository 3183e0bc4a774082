"""Run every benchmark module and write its figures as JSON under bench/results/.

Each ``bench/bench_<name>.py`` defines ``run() -> dict``; the dict is written to
``bench/results/<name>.json`` with the machine's facts, and printed. Pass names to
run a subset: ``python -m bench protocol cpufreq``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main(argv: list[str]) -> int:
    known = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"usage: python -m bench [NAME ...]\n\n{(__doc__ or '').strip()}\n")
        print("benchmarks: " + " ".join(known))
        return 0
    unknown = [name for name in argv if name not in known]
    if unknown:
        print(
            f"bench: no such benchmark: {' '.join(unknown)} (known: {' '.join(known)})",
            file=sys.stderr,
        )
        return 2
    names = argv or known
    RESULTS.mkdir(exist_ok=True)
    failed = []
    for name in names:
        print(f"== bench {name}", flush=True)
        started = time.time()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            figures = module.run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        result = {
            "bench": name,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 3),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "figures": figures,
        }
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(figures, indent=2), flush=True)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
