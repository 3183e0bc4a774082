"""Log lines for journald (``<N>`` priority, no time) or for a terminal or file."""

from __future__ import annotations

import os
import re
from pathlib import Path

from agent_support import RunningAgent


def _journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_under_journald_lines_carry_priorities_and_no_time(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    agent.log_path.touch()
    try:
        agent.start(env={"JOURNAL_STREAM": _journal_stream(agent.log_path)})
        agent.control("set_cpu_freq", cpu=7, op="max")
        assert agent.stop() == 0
    finally:
        agent.close()
    lines = [line for line in agent.log().splitlines() if line]
    assert lines
    # Every line starts with a syslog priority journald understands; none with a time.
    assert all(re.match(r"<[2-7]>vmpower", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>vmpower.daemon: vmpowerd") for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d", line[:30]) for line in lines)


def test_elsewhere_lines_keep_time_and_level(tmp_path: Path) -> None:
    agent = RunningAgent(tmp_path)
    agent.log_path.touch()
    try:
        # A JOURNAL_STREAM inherited from elsewhere names another stream: ignored.
        agent.start(env={"JOURNAL_STREAM": "1:2"})
        assert agent.stop() == 0
    finally:
        agent.close()
    lines = [line for line in agent.log().splitlines() if line]
    assert lines
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ vmpower", x) for x in lines)
