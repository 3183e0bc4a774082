"""Build vmpower-guest.pyz: the guest tool as one standard-library-only zipapp.

``make guest-pyz`` runs this (output: build/vmpower-guest.pyz). The archive holds only
what the guest tool imports: ``vmpower/__init__``, ``vmpower/errors``,
``vmpower/protocol`` and ``vmpower/guest`` (no libvirt, nothing compiled), so it runs
in a minimal guest with any python3 ≥ 3.9: ``python3 vmpower-guest.pyz --help``.
pyudev is used when the guest has it, as the installed tool does.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vmpower"
# What the guest tool imports (docs/architecture.md: guest → protocol, errors only).
MODULES = ("__init__.py", "errors.py")
PACKAGES = ("protocol", "guest")
MAIN = "vmpower.guest.cli:main"


def build(output: Path, package: Path = PACKAGE) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vmpower-guest-pyz-") as staging:
        target = Path(staging) / "vmpower"
        target.mkdir()
        for name in MODULES:
            shutil.copy2(package / name, target / name)
        for name in PACKAGES:
            shutil.copytree(
                package / name, target / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        zipapp.create_archive(
            staging, output, interpreter="/usr/bin/env python3", main=MAIN, compressed=True
        )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, nargs="?", default=Path("build/vmpower-guest.pyz"))
    args = parser.parse_args(argv)
    print(f"wrote {build(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
