"""SIGHUP reload, in full (issue #12, point 3): the real vmpowerd subprocess.

Every key of the configuration is either applied live or named in a "needs a restart"
line; reserved_cpus applies both ways (a newly reserved CPU is restored and refused, an
un-reserved one is served); a bad file keeps the running configuration and says why.
"""

from __future__ import annotations

import dataclasses
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent, to_toml

from vmpower import protocol
from vmpower.config import Config
from vmpower.config_reload import RELOAD_LIVE, RELOAD_RESTART
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.protocol import Command, ReplyCode, Unit

ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)


def power(host: ChannelHost, unit: Unit, resource_id: int) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, resource_id))
    return protocol.peek_header(reply)[2]


def every_key() -> set[str]:
    return {
        f"{section.name}.{key.name}"
        for section in dataclasses.fields(Config)
        for key in dataclasses.fields(section.default_factory())  # type: ignore[misc]
    }


def test_every_config_key_is_either_applied_live_or_needs_a_restart() -> None:
    # A key added to vmpower.config without a reload rule fails here.
    assert set(RELOAD_LIVE) | RELOAD_RESTART == every_key()
    assert not set(RELOAD_LIVE) & RELOAD_RESTART


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path, settings={"cpufreq": {"reserved_cpus": "2"}})
    try:
        yield running.start()
    finally:
        running.close()


def rewrite(agent: RunningAgent, **changes: dict[str, object]) -> None:
    sections = tomllib.loads(agent.config_path.read_text())
    for section, values in changes.items():
        sections.setdefault(section, {}).update(values)
    agent.config_path.write_text(to_toml(sections))


def test_reload_applies_reserved_cpus_both_ways_and_names_what_needs_a_restart(
    agent: RunningAgent,
) -> None:
    vm1, vm2 = agent.hosts["vm1.0"], agent.hosts["vm2.0"]
    original_governor = agent.read(3, "scaling_governor")
    assert power(vm1, Unit.SCALE_MIN, 0) == NACK  # host CPU 2 is reserved
    assert power(vm2, Unit.SCALE_MAX, 0) == ACK  # host CPU 3
    assert agent.read(3, "scaling_governor") == "userspace"

    rewrite(
        agent,
        cpufreq={"reserved_cpus": "3"},
        channels={"dir": str(agent.tmp_path / "elsewhere"), "rate_per_s": 5000.0},
        telemetry={"max_sessions": 3},
        libvirt={"map_refresh_s": 0.5},
    )
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: agent.control("status")["reserved_cpus"] == "3", 10)

    # CPU 3 newly reserved: restored, and refused from now on.
    assert agent.read(3, "scaling_governor") == original_governor
    assert power(vm2, Unit.SCALE_MAX, 0) == NACK
    # CPU 2 no longer reserved: served (the cpufreq layer too).
    assert power(vm1, Unit.SCALE_MIN, 0) == ACK
    assert agent.setspeed(2) == agent.table(2)[-1]
    log = agent.log()
    assert "channels.dir" in log and "needs a restart" in log
    applied = [line for line in log.splitlines() if "SIGHUP" in line and "applied" in line]
    assert applied and all(
        key in applied[-1]
        for key in (
            "cpufreq.reserved_cpus",
            "channels.rate_per_s",
            "telemetry.max_sessions",
            "libvirt.map_refresh_s",
        )
    ), applied
    assert agent.stop() == 0


def test_reload_of_a_bad_file_keeps_the_running_configuration(agent: RunningAgent) -> None:
    # A good change beside a bad key: nothing of the file is applied.
    rewrite(agent, cpufreq={"reserved_cpus": "3", "nope": 1})
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "configuration not reloaded" in agent.log(), 10)
    assert "nope" in agent.log()
    assert agent.control("status")["reserved_cpus"] == "2"
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == NACK
    assert agent.stop() == 0
