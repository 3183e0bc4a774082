"""`vmpower`: the operator's command line (interactive shell and one-shot commands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "simulate-sysfs":
        from vmpower.cpufreq.simulate import main as simulate_main

        return simulate_main(args[1:])
    print("vmpower: usage: vmpower simulate-sysfs DIR --driver NAME --cpus N", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
