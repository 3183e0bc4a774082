"""What each CPU cannot do, with the reason, as the operator sees it (issue #13 point 4)."""

from __future__ import annotations

from pathlib import Path

from agent_support import RunningAgent


def test_show_cpus_and_status_say_what_is_not_supported_and_why(tmp_path: Path) -> None:
    # acpi-cpufreq without turbo: no EPP, no turbo; CPU 7 reserved: not controllable.
    agent = RunningAgent(tmp_path, turbo=False, settings={"cpufreq": {"reserved_cpus": "7"}})
    try:
        agent.start()
        rows = {row["cpu"]: row for row in agent.control("show_cpus")}
        free = rows[2]["unsupported"]
        assert "acpi-cpufreq has no energy_performance_preference" in free["epp"]
        assert free["turbo"].startswith("no turbo range")
        assert "control" not in free
        assert "reserved" in rows[7]["unsupported"]["control"]
        # status says the same for the host as a whole.
        unsupported = agent.control("status")["unsupported"]
        assert unsupported["epp"]["cpus"] == "0-6"  # 7 is reserved: not controllable at all
        assert "energy_performance_preference" in unsupported["epp"]["reason"]
        assert unsupported["control"]["cpus"] == "7"
        assert agent.stop() == 0
    finally:
        agent.close()
