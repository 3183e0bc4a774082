"""Instructions per request on the request path, counted by callgrind (load-proof).

Wall-clock figures on a shared 2-core machine move by a factor of 2 from run to run; an
instruction count does not. ``bench/hotpath_driver.py`` pushes N CPU_POWER requests
through ``PowerManager`` in process on real parts; running it for two N under
``valgrind --tool=callgrind`` and dividing the difference gives instructions per
request, start-up excluded. With ``VMPOWER_BASELINE=/path/to/other/checkout`` the
same driver also runs against that checkout, and the ratio is reported: this is the
"no regression beyond 5 %" check of a refactoring.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "hotpath_driver.py"
SMALL, LARGE = 4_000, 20_000


def _instructions(pythonpath: Path, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        run = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(DRIVER),
                str(count),
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


def per_request(pythonpath: Path) -> float:
    small = _instructions(pythonpath, SMALL)
    large = _instructions(pythonpath, LARGE)
    return (large - small) / (LARGE - SMALL)


def run() -> dict[str, object]:
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed"}
    here = per_request(HERE.parent)
    figures: dict[str, object] = {"instructions_per_request": round(here)}
    baseline = os.environ.get("VMPOWER_BASELINE")
    if baseline:
        base = per_request(Path(baseline))
        figures["baseline"] = baseline
        figures["baseline_instructions_per_request"] = round(base)
        figures["ratio_to_baseline"] = round(here / base, 4)
    return figures
