"""One request per monitor turn through the whole daemon in process, for callgrind.

``python bench/turn_driver.py N`` builds the agent bench's node (bench_agent.make_node:
libvirt's test driver, a simulated acpi-cpufreq tree, the restore journal), starts a
real ``daemon.Agent`` in this process, plays QEMU on one channel socket, and then N
times: sends one CPU_POWER request (UP/DOWN alternating), runs one monitor turn
(``Monitor.run_once``: epoll, recv, the request path, the sysfs write, send) and reads
the reply. It is the latency case's work on the daemon's side, start-up excluded by
running two N under ``valgrind --tool=callgrind`` (bench_hotpath does).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a baseline first

from bench.bench_agent import make_node
from vmpower.config import load_config
from vmpower.daemon import Agent
from vmpower.devtools import ChannelHost, make_request
from vmpower.protocol import PACKET_SIZE, Command, ReplyCode, Unit, peek_header


def main(count: int) -> None:
    # INFO, as the daemon logs; nowhere, as nothing here reads it
    logging.basicConfig(level=logging.INFO, handlers=[logging.NullHandler()])
    with tempfile.TemporaryDirectory() as tmp:
        node = make_node(Path(tmp))
        vcpu = node.channels[0][1]
        hosts = [ChannelHost(p) for p, _, _ in node.channels]
        agent = Agent(load_config(node.config), node.config)
        agent.start()
        try:
            for host in hosts:
                host.accept()
            peer = hosts[0]
            for _ in range(20):  # connections, libvirt's first answers
                agent.monitor.run_once(0.05)
            up = make_request(Command.CPU_POWER, Unit.SCALE_UP, vcpu)
            down = make_request(Command.CPU_POWER, Unit.SCALE_DOWN, vcpu)
            conn = peer.conn
            assert conn is not None
            conn.settimeout(None)
            run_once = agent.monitor.run_once
            acks = 0
            for i in range(count):
                conn.sendall(up if i & 1 else down)
                reply = b""
                while len(reply) < PACKET_SIZE:
                    run_once(0.0 if reply else 1.0)
                    conn.setblocking(False)
                    try:
                        reply += conn.recv(PACKET_SIZE - len(reply))
                    except BlockingIOError:
                        pass
                    conn.setblocking(True)
                acks += peek_header(reply)[2] == ReplyCode.ACK
            if acks != count:
                raise SystemExit(f"turn_driver: {count - acks} of {count} replies were not ACK")
        finally:
            agent.shutdown()
            for host in hosts:
                host.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
