"""The shell completion files shipped with the package match vmpower's parser."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "bash": REPO / "share/bash-completion/completions/vmpower",
    "zsh": REPO / "share/zsh/site-functions/_vmpower",
}


@pytest.mark.parametrize("shell", sorted(FILES))
def test_shipped_completion_is_what_the_parser_generates(shell: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vmpower.shell", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert FILES[shell].read_text() == run.stdout, "stale: run `make completions`"


def test_the_package_installs_them_where_the_shells_look() -> None:
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    installed = {
        str(Path(target) / Path(source).name)
        for target, sources in data_files.items()
        for source in sources
    }
    assert installed == {
        "share/bash-completion/completions/vmpower",
        "share/zsh/site-functions/_vmpower",
    }
