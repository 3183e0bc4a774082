"""A real Prometheus server scrapes the real daemon; promtool checks a scrape and the rules.

Prometheus and promtool come from the Debian package ``prometheus``, installed by
scripts/ensure-prometheus.sh when missing (as root). Where it cannot be installed the
tests skip and say so. The server listens on loopback only, with its configuration and
data directory under tmp_path, and is stopped after the test. The shipped Grafana
dashboard is checked here too: valid JSON whose queries name existing metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import stop_daemon
from test_metrics import MetricsAgent, free_port, scrape

from vmpower.devtools import wait_for

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "vmpower-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "vmpower-dashboard.json"


@pytest.fixture(scope="session")
def prometheus_bin() -> tuple[str, str]:
    """(prometheus, promtool), installed when missing; a skip that says why otherwise."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "ensure-prometheus.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            pytest.skip(
                "the Debian package prometheus could not be installed"
                f" (scripts/ensure-prometheus.sh): {done.stderr.strip()[-500:]}"
            )
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool
    return prometheus, promtool


def promtool(binary: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[MetricsAgent]:
    running = MetricsAgent(tmp_path)
    try:
        yield running.start()
    finally:
        running.close()


class PrometheusServer:
    def __init__(self, binary: str, tmp_path: Path, target_port: int) -> None:
        self.port = free_port()
        base = tmp_path / "prometheus"
        base.mkdir()
        config = base / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: vmpower\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        self.log_path = base / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={base / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except OSError:
            return []
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        stop_daemon(self.proc)  # SIGTERM, then kill after 30 s


def test_prometheus_scrapes_the_daemon_and_promql_returns_vm_energy(
    prometheus_bin: tuple[str, str], agent: MetricsAgent, tmp_path: Path
) -> None:
    server = PrometheusServer(prometheus_bin[0], tmp_path, agent.port)
    try:
        # Energy flows on the simulated package while Prometheus scrapes every second.
        def energy_of_vm1() -> list[dict[str, Any]]:
            current = int(agent.energy_file.read_text())
            agent.energy_file.write_text(f"{(current + 5_000_000) % (agent.max_uj + 1)}\n")
            return server.query('vmpower_vm_energy_joules_total{vm="vm1",job="vmpower"}')

        assert wait_for(energy_of_vm1, 90, 0.5), server.log_path.read_text()[-3000:]
        (result,) = energy_of_vm1()
        assert result["metric"]["vm"] == "vm1"
        assert float(result["value"][1]) >= 0
        # the recording rule gives watts per VM once two scrapes are in
        assert wait_for(lambda: server.query("vmpower:vm_power_watts:rate1m"), 60, 0.5)
        up = server.query('up{job="vmpower"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        server.stop()


def test_promtool_checks_a_scrape_and_the_rules(
    prometheus_bin: tuple[str, str], agent: MetricsAgent
) -> None:
    status, text = scrape(agent.port)
    assert status == 200
    checked = promtool(prometheus_bin[1], "check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = promtool(prometheus_bin[1], "check", "rules", str(RULES))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout


def test_rules_and_dashboard_name_only_metrics_the_daemon_exports(agent: MetricsAgent) -> None:
    status, text = scrape(agent.port)
    assert status == 200
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    recorded = set(re.findall(r"record: (\S+)", RULES.read_text()))
    known = exported | recorded | {"up"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += re.findall(
        r"expr: [|]?\s*(.+?)(?=\n\s+(?:for|labels|- record|- alert):)", RULES.read_text(), re.S
    )
    assert exprs
    for expr in exprs:
        names = set(
            re.findall(r"\b(vmpower[:_][A-Za-z0-9_:]+|up)\b(?=\s*[{\[(]|\s*$|\s*[=<>)])", expr)
        )
        assert names, expr
        assert names <= known, f"{expr}: unknown {names - known}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("power", "energy", "frequency", "requests", "refusals", "libvirt"):
        assert topic in titles
