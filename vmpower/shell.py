"""`vmpower`: the operator's command line (interactive shell and one-shot commands).

Owns the operator's side of the control socket: the commands (DPDK vm_power_cli's
names, plus list_vms, show_cpus, show_policies, status, help), checking their
arguments before anything is sent, rendering replies as tables that fit 80 columns
(or JSON with ``--json``), Tab completion (commands, VM names and channel numbers
fetched from the daemon), history across sessions, and the exit status of one-shot
use: 0 done, 1 refused (by the daemon, or no daemon), 2 usage error.

One grammar: every one-shot command is an argparse subcommand, so the global options
(``--socket``, ``--config``, ``--json``) work before or after it. The telemetry
subcommands (``signals``, ``read``, ``write``, ``session``) come from
``vmpower.telemetry.cli``, ``restore`` from ``vmpower.offline``; ``completion bash|zsh``
prints a completion script generated from this parser (shtab); ``simulate-sysfs`` (a
testing command, out of the main help) is handed to ``vmpower.cpufreq.simulate``.

Every refusal is one line; with ``--json`` it is one JSON object on stdout
(``{"error": ..., "exit_status": ...}``). The daemon is reached only through
:func:`vmpower.control.request`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from vmpower import __version__, control
from vmpower.config import default_config_path, load_config
from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import ConfigError, ControlError, CpuListError, VmpowerError
from vmpower.protocol import UNIT_BY_OP
from vmpower.telemetry.cli import TELEMETRY_COMMANDS

PROMPT = "vmpower> "
DEFAULT_SOCKET = Path("/run/vmpower/control.sock")
SOCKET_ENV = "VMPOWER_SOCKET"
HISTORY_ENV = "VMPOWER_HISTORY"
HISTORY_NAME = ".vmpower_history"
HISTORY_LENGTH = 1000
TABLE_WIDTH = 80
CPUS_TABLE_WIDTH = 100  # show_cpus: one row per CPU with its wishers
TESTING_HELP = (
    "testing commands (for developers, not operators):\n"
    "  simulate-sysfs DIR --driver NAME --cpus N   build a simulated cpufreq tree"
    " (--help)"
)
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

# A client sends one command to the daemon: client("show_vm", vm="vm1") -> result.
Client = Callable[..., Any]


class UsageError(VmpowerError):
    """A command typed wrong (exit status 2); the message ends with its usage."""


@dataclass(frozen=True)
class Spec:
    """One shell command: how to type it, what it does, what its arguments complete to."""

    usage: str
    summary: str
    args: tuple[str, ...] = ()  # completion kind of each argument
    details: str = ""
    params: tuple[str, ...] = ()  # positional names for the parser; "name?" is optional


COMMANDS: dict[str, Spec] = {
    "status": Spec("status", "daemon status: libvirt, channels, counters"),
    "list_vms": Spec("list_vms", "VMs: state, vCPUs, host CPUs, channels"),
    "show_vm": Spec(
        "show_vm <vm>", "one VM: vCPU map, channels, query, policy", ("vm",), params=("vm",)
    ),
    "show_cpus": Spec(
        "show_cpus [<cpu>|all]",
        "host CPUs: governor, kHz, turbo, VMs, restore",
        ("cpu_all",),
        params=("cpu?",),
        details="CUR is the CPU's current frequency, WANT the highest any"
        " requester asked for,\nRESTORE TO what the agent puts back on exit"
        " (- when it changed nothing).",
    ),
    "show_cpu_freq": Spec(
        "show_cpu_freq <cpu>|all",
        "frequencies of host CPUs (kHz)",
        ("cpu_all",),
        params=("cpu",),
    ),
    "show_policies": Spec("show_policies", "installed policies"),
    "add_vm": Spec("add_vm <vm>", "serve a VM: open its power channels", ("vm",), params=("vm",)),
    "rm_vm": Spec(
        "rm_vm <vm>",
        "stop serving a VM: close channels, free CPUs",
        ("vm",),
        params=("vm",),
    ),
    "add_channels": Spec(
        "add_channels <vm> <list>|all",
        "open channels of a VM (e.g. 0-1)",
        ("vm", "channels"),
        params=("vm", "channels"),
    ),
    "set_channel_status": Spec(
        "set_channel_status <vm> <list>|all enabled|disabled",
        "enable or disable channels",
        ("vm", "channels", "status"),
        params=("vm", "channels", "status"),
        details="A disabled channel is still read; its requests are answered with NACK.",
    ),
    "set_pcpu": Spec(
        "set_pcpu <vm> <vcpu> <cpus>",
        "pin a vCPU to host CPUs (e.g. 2-3)",
        ("vm", "vcpu", "host_cpus"),
        params=("vm", "vcpu", "cpus"),
    ),
    "set_query": Spec(
        "set_query <vm> enable|disable",
        "allow or refuse the VM's queries",
        ("vm", "enable"),
        params=("vm", "action"),
    ),
    "set_cpu_freq": Spec(
        f"set_cpu_freq <cpu>|all {'|'.join(UNIT_BY_OP)}|release",
        "operator's request for a host CPU",
        ("cpu", "op"),
        params=("cpu", "op"),
    ),
    "help": Spec(
        "help [<command>]",
        "list the commands, or explain one",
        ("command",),
        params=("topic?",),
    ),
    "quit": Spec("quit", "leave the shell"),
}


# ---------------------------------------------------------------------------------------
# Tables


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    right: Sequence[int] = (),
    width: int = TABLE_WIDTH,
    indent: str = "",
) -> str:
    """Aligned columns, two spaces apart; over ``width``, the widest column is cut (…).

    ``right`` lists the columns to right-align (numbers). A cut path keeps its end
    (``…/channels/vm1.0``): the end is the part that tells paths apart.
    """
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    budget = width - len(indent) - 2 * (len(headers) - 1)
    while sum(widths) > budget:
        i = max(range(len(widths)), key=lambda k: widths[k])
        if widths[i] <= max(len(headers[i]), 4):
            break  # nothing left worth cutting
        widths[i] -= 1
    lines = []
    for row in cells:
        parts = []
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                keep = widths[i] - 1
                cell = "…" + cell[-keep:] if "/" in cell else cell[:keep] + "…"
            last = i == len(row) - 1
            if i in right:
                parts.append(cell.rjust(widths[i]))
            else:
                parts.append(cell if last else cell.ljust(widths[i]))
        lines.append((indent + "  ".join(parts)).rstrip())
    return "\n".join(lines)


def _fit(line: str, width: int = TABLE_WIDTH) -> str:
    """Cut a key-value line to ``width``, keeping the end of a long URI or path."""
    if len(line) <= width:
        return line
    return line[:11] + "…" + line[len(line) - (width - 12) :]


def _yes(flag: object) -> str:
    return "yes" if flag else "no"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _khz(value: object) -> str:
    return "-" if value in (None, 0) else str(value)


def format_status(result: dict[str, Any]) -> str:
    libvirt = result.get("libvirt", {})
    link = "connected" if libvirt.get("connected") else "disconnected"
    if not libvirt.get("connected") and libvirt.get("last_error"):
        link += f" ({libvirt['last_error']}); reconnecting"
    fifos = result.get("fifos") or []
    rows = [
        ("libvirt", f"{libvirt.get('uri', '?')}, {link}"),
        ("VMs", result.get("vms")),
        ("channels", f"{result.get('channels')}, {result.get('channels_connected')} connected"),
        ("FIFOs", format_cpu_list(fifos) if fifos else "none"),
        (
            "requests",
            f"{result.get('requests')}: {result.get('acks')} ACK, {result.get('nacks')} NACK",
        ),
        (
            "writes",
            f"{result.get('writes')} ({result.get('writes_skipped')} skipped,"
            f" {result.get('write_failures')} failed)",
        ),
        ("restore", f"{result.get('pending_restore')} settings to put back on exit"),
        ("reserved", result.get("reserved_cpus") or "none"),
    ]
    # Other power managers fighting over the same files: the operator must see them.
    for entry in result.get("conflicts") or []:
        where = ", ".join(
            [f"pid {p}" for p in entry.get("pids") or []]
            + ([f"unit {entry['unit']}"] if entry.get("unit") else [])
        )
        rows.append(("CONFLICT", f"{entry.get('name')} runs ({where}): it writes cpufreq too"))
    for feature, what in sorted((result.get("unsupported") or {}).items()):
        rows.append(("no " + feature, f"CPU {what.get('cpus')}: {what.get('reason')}"))
    head = (
        f"vmpowerd {result.get('version')} (pid {result.get('pid')}), up {result.get('uptime_s')} s"
    )
    return head + "\n" + "\n".join(_fit(f"{k + ':':<10} {v}") for k, v in rows)


def format_vms(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no VM known to libvirt"
    table = [
        (
            r["name"],
            r["state"],
            r["vcpus"],
            r["pcpus"] or "-",
            f"{r['connected']}/{r['channels']}",
            "on" if r["query"] else "off",
            _yes(r["tracked"]),
        )
        for r in rows
    ]
    headers = ("NAME", "STATE", "VCPUS", "HOST CPUS", "CHANNELS", "QUERY", "SERVED")
    return render_table(headers, table, right=(2, 4))


def format_vm(vm: dict[str, Any]) -> str:
    policy = vm.get("policy")
    served = "served" if vm.get("tracked") else f"not served (add_vm {vm['name']})"
    lines = [
        f"{vm['name']}: {vm['state']}, {served}, {_count(vm['vcpu_count'], 'vCPU')},"
        f" queries {'enabled' if vm.get('query') else 'disabled'}",
        f"uuid {vm.get('uuid')}",
        "policy " + (f"{policy['type']} on host CPUs {policy['cpus']}" if policy else "none"),
        "",
        render_table(
            ("VCPU", "HOST CPUS", "PINNED"),
            [(v["vcpu"], v["pcpus"] or "-", _yes(v["pinned"])) for v in vm["vcpus"]],
            right=(0,),
        ),
        "",
    ]
    channels = vm.get("channels") or []
    if channels:
        rows = [
            (
                c["index"],
                c["state"],
                _yes(c.get("enabled", True)),
                c.get("requests", 0),
                c.get("nacks", 0),
                c["path"],
            )
            for c in channels
        ]
        headers = ("CH", "STATE", "ENABLED", "REQUESTS", "NACKS", "PATH")
        lines.append(render_table(headers, rows, right=(0, 3, 4)))
    else:
        lines.append("no power channel")
    return "\n".join(lines)


def _restore_to(original: dict[str, str]) -> str:
    """What the agent puts back: the original fixed frequency, else the governor."""
    if not original:
        return "-"
    setspeed = original.get("scaling_setspeed", "")
    if setspeed.isdigit():
        return setspeed
    return original.get("scaling_governor") or "yes"


def format_cpus(rows: list[dict[str, Any]]) -> str:
    """One row per CPU; under a row, indented, the sessions' limits on it and its note
    (e.g. hybrid LP E-cores without a usable base frequency), one line each."""
    table = []
    below: dict[int, list[str]] = {}  # row index → its extra lines
    for r in rows:
        if not r.get("online", True):
            table.append(
                (r["cpu"], r.get("policy") or "", "offline", None, None, None, None, "", "")
            )
            continue
        extra = [
            f"limits {owner}: {_khz(b.get('min_khz'))}..{_khz(b.get('max_khz'))} kHz"
            for owner, b in sorted((r.get("limits") or {}).items())
        ]
        if r.get("note"):
            extra.append(f"note: {r['note']}")
        if extra:
            below[len(table)] = extra
        turbo = r.get("turbo_enabled")
        vms = ",".join(r.get("vms") or [])
        if r.get("reserved"):
            vms = "reserved" + (f" {vms}" if vms else "")
        table.append(
            (
                r["cpu"],
                # the cpufreq policy: CPUs sharing one run at the highest wish of them all
                # (it took the DRIVER column's place: one driver per host, in --json)
                r.get("policy") or "",
                r.get("governor"),
                _khz(r.get("cur_khz")),
                _khz(r.get("desired_khz")),
                "-" if turbo is None else ("on" if turbo else "off"),
                _restore_to(r.get("original") or {}),
                vms or "-",
                # everyone with a wish or a limit on it: VMs, FIFOs, policies, operator,
                # session:<key>
                ",".join(r.get("wishers") or []) or "-",
            )
        )
    headers = (
        *("CPU", "POLICY", "GOVERNOR", "CUR kHz", "WANT kHz", "TURBO", "RESTORE TO"),
        *("VMS", "WISHERS"),
    )
    # nine columns do not fit 80: this table may take up to CPUS_TABLE_WIDTH
    lines = render_table(headers, table, right=(0, 3, 4), width=CPUS_TABLE_WIDTH).split("\n")
    out = lines[:1]
    for i, line in enumerate(lines[1:]):
        out.append(line)
        for text in below.get(i, []):
            out.extend(
                textwrap.wrap(text, TABLE_WIDTH, initial_indent="    ", subsequent_indent="      ")
            )
    return "\n".join(out)


def format_cpu_freq(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        if not r.get("online", True):
            table.append((r["cpu"], "offline", None, None, None, None))
            continue
        table.append(
            (
                r["cpu"],
                r.get("governor"),
                _khz(r.get("cur_khz")),
                _khz(r.get("target_khz")),
                _khz(r.get("min_khz")),
                _khz(r.get("max_khz")),
            )
        )
    headers = ("CPU", "GOVERNOR", "CUR kHz", "SET kHz", "MIN kHz", "MAX kHz")
    return render_table(headers, table, right=(0, 2, 3, 4, 5))


def format_policies(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no policy installed"
    table = [
        (r["owner"], r.get("type"), r.get("cpus"), r.get("last_decision") or "-") for r in rows
    ]
    return render_table(("OWNER", "TYPE", "HOST CPUS", "LAST DECISION"), table)


# ---------------------------------------------------------------------------------------
# The commands


def _int_arg(text: str, what: str, usage: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"{what} must be a number, not {text!r}; usage: {usage}")
    return int(text)


def _list_arg(text: str, what: str, usage: str) -> str:
    """A list like 0-2,5 (checked here, sent as typed: the daemon parses it too)."""
    try:
        parse_cpu_list(text)
    except CpuListError as exc:
        raise UsageError(f"bad {what} {text!r} ({exc}); usage: {usage}") from None
    return text


class Shell:
    """Runs commands against the daemon and prints what they return."""

    def __init__(self, client: Client, out: TextIO, err: TextIO, json_output: bool = False) -> None:
        self.client = client
        self.out = out
        self.err = err
        self.json_output = json_output
        self._handlers: dict[str, Callable[[list[str], Spec], None]] = {
            name: getattr(self, f"cmd_{name}") for name in COMMANDS if name != "quit"
        }

    # -- running -----------------------------------------------------------------------

    def run(self, words: list[str], prefix: str = "") -> int:
        """Run one command; prints its output or one line of error; returns the status."""
        if not words:
            return EXIT_OK
        name, args = words[0], words[1:]
        spec = COMMANDS.get(name)
        try:
            if spec is None:
                raise UsageError(f"unknown command {name!r} (help lists the commands)")
            if name == "quit":
                return EXIT_OK
            self._handlers[name](args, spec)
        except UsageError as exc:
            return self.error(str(exc), EXIT_USAGE, prefix)
        except VmpowerError as exc:
            return self.error(f"error: {exc}", EXIT_REFUSED, prefix)
        return EXIT_OK

    def error(self, message: str, status: int, prefix: str = "") -> int:
        """One line on stderr; with --json one object on stdout. Returns ``status``."""
        if self.json_output:
            text = message.removeprefix("error: ")
            print(json.dumps({"error": text, "exit_status": status}), file=self.out)
        else:
            print(f"{prefix}{message}", file=self.err)
        return status

    def _call(self, cmd: str, **args: Any) -> Any:
        return self.client(cmd, **args)

    def _print(self, result: Any, text: Callable[[], str]) -> None:
        if self.json_output:
            print(json.dumps(result, indent=2, sort_keys=True), file=self.out)
        else:
            print(text(), file=self.out)

    @staticmethod
    def _arity(args: list[str], spec: Spec, low: int, high: int | None = None) -> None:
        high = low if high is None else high
        if not low <= len(args) <= high:
            raise UsageError(f"usage: {spec.usage}")

    # -- read commands -----------------------------------------------------------------

    def cmd_status(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 0)
        result = self._call("status")
        self._print(result, lambda: format_status(result))

    def cmd_list_vms(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 0)
        result = self._call("list_vms")
        self._print(result, lambda: format_vms(result))

    def cmd_show_vm(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 1)
        result = self._call("show_vm", vm=args[0])
        self._print(result, lambda: format_vm(result))

    def _cpu_rows(self, args: list[str], spec: Spec) -> list[dict[str, Any]]:
        if not args or args[0] == "all":
            return self._call("show_cpus")  # type: ignore[no-any-return]
        return self._call("show_cpus", cpu=_int_arg(args[0], "host CPU", spec.usage))  # type: ignore[no-any-return]

    def cmd_show_cpus(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 0, 1)
        rows = self._cpu_rows(args, spec)
        self._print(rows, lambda: format_cpus(rows))

    def cmd_show_cpu_freq(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 1)
        rows = self._cpu_rows(args, spec)
        self._print(rows, lambda: format_cpu_freq(rows))

    def cmd_show_policies(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 0)
        rows = self._call("show_policies")
        self._print(rows, lambda: format_policies(rows))

    # -- commands that change something ------------------------------------------------

    def cmd_add_vm(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 1)
        result = self._call("add_vm", vm=args[0])
        opened = result.get("opened") or []
        self._print(
            result,
            lambda: (
                f"{result['vm']}: served; channels opened: "
                f"{format_cpu_list(opened) if opened else 'none new'}"
            ),
        )

    def cmd_rm_vm(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 1)
        result = self._call("rm_vm", vm=args[0])
        self._print(result, lambda: f"{result['vm']}: no longer served")

    def _channels(self, text: str, spec: Spec) -> str:
        return "all" if text == "all" else _list_arg(text, "channel list", spec.usage)

    def cmd_add_channels(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 2)
        result = self._call("add_channels", vm=args[0], channels=self._channels(args[1], spec))
        self._print(
            result,
            lambda: (
                f"{result['vm']}: channels {format_cpu_list(result['channels']) or 'none'} open"
            ),
        )

    def cmd_set_channel_status(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 3)
        channels = self._channels(args[1], spec)
        if args[2] not in ("enabled", "disabled"):
            raise UsageError(
                f"status must be enabled or disabled, not {args[2]!r}; usage: {spec.usage}"
            )
        result = self._call("set_channel_status", vm=args[0], channels=channels, status=args[2])
        self._print(
            result,
            lambda: (
                f"{result['vm']}: channels "
                f"{format_cpu_list(result['channels']) or 'none'} {result['status']}"
            ),
        )

    def cmd_set_pcpu(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 3)
        vcpu = _int_arg(args[1], "vCPU", spec.usage)
        cpus = _list_arg(args[2], "host CPU list", spec.usage)
        result = self._call("set_pcpu", vm=args[0], vcpu=vcpu, cpus=cpus)
        self._print(
            result,
            lambda: f"{result['vm']}: vCPU {result['vcpu']} pinned to host CPUs {result['pcpus']}",
        )

    def cmd_set_query(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 2)
        if args[1] not in ("enable", "disable"):
            raise UsageError(f"say enable or disable, not {args[1]!r}; usage: {spec.usage}")
        result = self._call("set_query", vm=args[0], enable=args[1] == "enable")
        self._print(
            result,
            lambda: f"{result['vm']}: queries {'enabled' if result['query'] else 'disabled'}",
        )

    def cmd_set_cpu_freq(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 2)
        if args[1] == "release":  # the operator's wish goes (issue #12, point 4)
            cpu_arg = "all" if args[0] == "all" else _int_arg(args[0], "host CPU", spec.usage)
            done = self._call("set_cpu_freq", cpu=cpu_arg, op="release")
            self._print(
                done, lambda: f"released host CPU {format_cpu_list(done['released']) or 'none'}"
            )
            return
        cpu = _int_arg(args[0], "host CPU", spec.usage)
        if args[1] not in UNIT_BY_OP:
            raise UsageError(
                f"{args[1]!r} is not one of {', '.join(UNIT_BY_OP)}; usage: {spec.usage}"
            )
        result = self._call("set_cpu_freq", cpu=cpu, op=args[1])
        self._print(result, lambda: f"host CPU {result['cpu']}: {result['freq_khz']} kHz")

    def cmd_help(self, args: list[str], spec: Spec) -> None:
        self._arity(args, spec, 0, 1)
        if args and args[0] == "testing":
            print(TESTING_HELP, file=self.out)
            return
        if args:
            entry = COMMANDS.get(args[0])
            if entry is None:
                raise UsageError(f"no command {args[0]!r} (help lists the commands)")
            text = f"usage: {entry.usage}\n  {entry.summary}"
            if entry.details:
                text += "\n  " + entry.details.replace("\n", "\n  ")
            print(text, file=self.out)
            return
        print(command_list(), file=self.out)

    # -- completion --------------------------------------------------------------------

    def candidates(self, line: str, text: str) -> list[str]:
        """What ``text`` (the word being typed) may become, given the line before it."""
        words = line.split()
        if not words:
            return [name for name in COMMANDS if name.startswith(text)]
        spec = COMMANDS.get(words[0])
        position = len(words) - 1
        if spec is None or position >= len(spec.args):
            return []
        try:
            options = self._options(spec.args[position], words)
        except (VmpowerError, OSError, ValueError, KeyError, TypeError):
            return []  # no daemon, or a VM that is gone: nothing to offer
        return [o for o in options if o.startswith(text)]

    def _options(self, kind: str, words: list[str]) -> list[str]:
        if kind == "vm":
            return [row["name"] for row in self._call("list_vms")]
        if kind == "channels":
            vm = self._call("show_vm", vm=words[1])
            return ["all"] + [str(c["index"]) for c in vm["channels"]]
        if kind == "vcpu":
            vm = self._call("show_vm", vm=words[1])
            return [str(v["vcpu"]) for v in vm["vcpus"]]
        if kind in ("cpu", "cpu_all", "host_cpus"):
            cpus = [str(row["cpu"]) for row in self._call("show_cpus")]
            return ["all", *cpus] if kind == "cpu_all" else cpus
        fixed = {
            "status": ["enabled", "disabled"],
            "enable": ["enable", "disable"],
            "op": list(UNIT_BY_OP),
            "command": list(COMMANDS),
        }
        return fixed.get(kind, [])


def command_list(indent: str = "") -> str:
    width = max(len(s.usage) for s in COMMANDS.values() if len(s.usage) <= 30)
    lines = []
    for spec in COMMANDS.values():
        if len(spec.usage) <= width:
            lines.append(f"{indent}{spec.usage:<{width}}  {spec.summary}")
        else:  # too long to share a line in 80 columns
            lines.append(f"{indent}{spec.usage}\n{indent}{'':<{width}}  {spec.summary}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Interactive use: readline completion and history


def history_path() -> Path | None:
    env = os.environ.get(HISTORY_ENV)
    if env:
        return Path(env)
    try:
        return Path.home() / HISTORY_NAME
    except (RuntimeError, KeyError):  # no HOME and no passwd entry: no history
        return None


class _Readline:
    """Tab completion and history for the session; a no-op without GNU readline."""

    def __init__(self, shell: Shell, history: Path | None) -> None:
        self.shell = shell
        self.history = history
        self._matches: list[str] = []
        try:
            import readline
        except ImportError:
            self.readline = None
            return
        self.readline = readline
        readline.set_completer_delims(" \t\n")  # VM names may hold '-' or '.'
        readline.set_completer(self.complete)
        readline.parse_and_bind("tab: complete")
        readline.set_history_length(HISTORY_LENGTH)
        if history is not None:
            try:
                readline.read_history_file(history)  # keeps the last HISTORY_LENGTH
                with open(history, "rb") as f:
                    if sum(1 for _ in f) > HISTORY_LENGTH:
                        readline.write_history_file(history)  # the file, trimmed likewise
            except FileNotFoundError:
                pass
            except OSError as exc:
                print(f"vmpower: history {history} not read: {exc.strerror}", file=shell.err)

    def complete(self, text: str, state: int) -> str | None:
        assert self.readline is not None
        if state == 0:
            line = self.readline.get_line_buffer()[: self.readline.get_begidx()]
            self._matches = [m + " " for m in self.shell.candidates(line, text)]
        return self._matches[state] if state < len(self._matches) else None

    def remember(self) -> None:
        """Append the last line to the history file now (a killed terminal loses nothing)."""
        if self.readline is None or self.history is None:
            return
        try:
            if not self.history.exists():
                # append_history_file() opens without O_CREAT; private: commands name VMs.
                self.history.touch(mode=0o600)
            self.readline.append_history_file(1, self.history)
        except OSError as exc:
            print(
                f"vmpower: history not saved to {self.history}: {exc.strerror}", file=self.shell.err
            )
            self.history = None


def interactive(shell: Shell, stdin: TextIO, socket_path: Path) -> int:
    """The ``vmpower>`` shell; status 0, or for piped input the worst command status."""
    tty = stdin.isatty()
    editor = _Readline(shell, history_path()) if tty else None
    if tty:
        try:
            status = shell.client("status")
            print(
                f"vmpower: vmpowerd {status.get('version')} at {socket_path}; help lists"
                " the commands, quit leaves",
                file=shell.out,
            )
        except VmpowerError as exc:
            print(f"vmpower: {exc}", file=shell.err)
    worst = EXIT_OK
    while True:
        try:
            line = input(PROMPT) if tty else stdin.readline()
        except EOFError:  # Ctrl-D
            print(file=shell.out)
            break
        except KeyboardInterrupt:  # Ctrl-C drops the line, not the session
            print(file=shell.out)
            continue
        if not tty and not line:
            break
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            print(f"{exc}", file=shell.err)
            worst = max(worst, EXIT_USAGE)
            continue
        if words and words[0] in ("quit", "exit"):
            break  # not kept in the history: Up should bring back work
        if editor is not None and words:
            editor.remember()
        worst = max(worst, shell.run(words))
        shell.out.flush()
    return EXIT_OK if tty else worst


# ---------------------------------------------------------------------------------------
# Entry point


class ArgumentError(VmpowerError):
    """A command line argparse refused; ``usage`` is the command's one-line usage."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """Refusals as one line (an exception main() prints), not argparse's usage block."""

    def __init__(self, *args: Any, one_line_usage: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_line_usage = one_line_usage

    def error(self, message: str) -> NoReturn:
        unknown = re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)
        if unknown:
            message = f"unknown command {unknown.group(1)!r} (vmpower --help lists the commands)"
            raise ArgumentError(message, "")
        usage = self.one_line_usage or self.format_usage().strip().removeprefix("usage: ")
        raise ArgumentError(message, usage)


def _main_help() -> str:
    return (
        "commands (vmpower COMMAND --help, or vmpower help COMMAND):\n"
        + command_list("  ")
        + "\n\ntelemetry (vmpower signals --help):\n"
        "  signals                          list signals and controls, with your access\n"
        "  read NAME DOMAIN INDEX           read one signal\n"
        "  write NAME DOMAIN INDEX VALUE    set a control, held until interrupted\n"
        "  session -t SECONDS -p SECONDS    sample the signals named on stdin\n"
        "\nmaintenance:\n"
        "  restore                          with vmpowerd stopped: put back every setting\n"
        "                                   in its restore journal (after kill -9)\n"
        "  completion bash|zsh              print a shell completion script\n"
        "\nexit status: 0 done, 1 refused (or no daemon), 2 usage error."
        "\ntesting commands: vmpower help testing"
    )


def build_parser(for_completion: bool = False) -> argparse.ArgumentParser:
    """Every command is a subcommand; --socket, --config and --json go before or after.

    ``for_completion``: the subcommands carry their summaries (shtab completes and
    describes them from those); otherwise the epilog lists them, grouped.
    """
    from vmpower.telemetry import cli as telemetry_cli

    parser = _Parser(
        prog="vmpower",
        usage="%(prog)s [--socket PATH] [--config FILE] [--json] [COMMAND [ARG ...]]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The vmpower operator shell: talks to vmpowerd through its control"
        " socket.\nWith a command, runs it and exits; without one, an interactive shell"
        f"\n(Tab completes; history in ~/{HISTORY_NAME}, or ${HISTORY_ENV}).\nThe socket:"
        f" --socket, else --config's control.socket, else ${SOCKET_ENV}, else\nthe"
        f" default configuration's ({default_config_path()}, if it exists), else"
        f"\n{DEFAULT_SOCKET}.",
        epilog=_main_help(),
        parents=[telemetry_cli.common_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"vmpower {__version__}")
    common = telemetry_cli.common_options(argparse.SUPPRESS)
    # The epilog lists the commands, grouped (and simulate-sysfs out of it, testing
    # only): argparse's own flat list is suppressed.
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        parser_class=_Parser,
        help="the command" if for_completion else argparse.SUPPRESS,
    )

    def listed(summary: str) -> dict[str, str]:
        return {"help": summary} if for_completion else {}

    for name, spec in COMMANDS.items():
        if name == "quit":
            continue
        command = sub.add_parser(
            name,
            parents=[common],
            **listed(spec.summary),
            description=spec.summary + (f"\n{spec.details}" if spec.details else ""),
            usage=f"vmpower [options] {spec.usage}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            one_line_usage=spec.usage,
        )
        for param in spec.params:
            optional = param.endswith("?")
            command.add_argument(param.rstrip("?"), nargs="?" if optional else None)
    telemetry_cli.add_commands(sub, common)
    restore = sub.add_parser(
        "restore",
        parents=[common],
        **listed("with vmpowerd stopped: put back every setting in its journal"),
        description="With vmpowerd stopped (after kill -9, or before uninstalling): put"
        " back every setting\nits restore journal (state.dir) holds, and report each."
        " Refused while vmpowerd runs.\nThe state directory comes from --config, else"
        f" {default_config_path()} if it exists.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    del restore  # no option of its own: --config names the daemon's configuration
    completion = sub.add_parser(
        "completion",
        **listed("print a bash or zsh completion script"),
        description="Print a completion script for vmpower, generated from its parser."
        "\nbash: vmpower completion bash > /etc/bash_completion.d/vmpower"
        "\nzsh:  vmpower completion zsh > /usr/local/share/zsh/site-functions/_vmpower",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    # A testing command, handed whole to its own parser: no option is parsed here.
    simulate = sub.add_parser("simulate-sysfs", add_help=False)
    simulate.prefix_chars = "\0"
    simulate.add_argument("words", nargs="*")
    return parser


def resolve_socket(args: argparse.Namespace) -> Path:
    """--socket, else --config's control.socket, else $VMPOWER_SOCKET, else the default
    configuration file's (when it exists), else DEFAULT_SOCKET."""
    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        return load_config(args.config).control.socket
    env = os.environ.get(SOCKET_ENV)
    if env:
        return Path(env)
    default = default_config_path()
    if default.exists():
        return load_config(default).control.socket
    return DEFAULT_SOCKET


def make_client(socket_path: Path) -> Client:
    def client(cmd: str, **args: Any) -> Any:
        try:
            return control.request(socket_path, cmd, **args)
        except OSError as exc:  # a reset connection, a path that is not a socket, ...
            raise ControlError(f"cannot talk to vmpowerd at {socket_path}: {exc}") from None
        except ValueError:
            raise ControlError(f"vmpowerd at {socket_path} sent a malformed reply") from None

    return client


def _wants_json(argv: list[str]) -> bool:
    """--json anywhere before a ``--``: for refusals that come before parsing ends."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in words


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(args_list)
    except ArgumentError as exc:
        usage = f"; usage: {exc.usage}" if exc.usage else ""
        shell = Shell(make_client(DEFAULT_SOCKET), sys.stdout, sys.stderr, _wants_json(args_list))
        return shell.error(f"{exc}{usage}", EXIT_USAGE, "vmpower: ")
    command = args.command
    shell = Shell(make_client(DEFAULT_SOCKET), sys.stdout, sys.stderr, json_output=args.json)
    if command == "simulate-sysfs":
        from vmpower.cpufreq.simulate import main as simulate_main

        return simulate_main(args.words)
    if command == "completion":
        import shtab

        print(shtab.complete(build_parser(for_completion=True), shell=args.shell), end="")
        return EXIT_OK
    if command == "restore":
        from vmpower import offline

        return offline.main(args.config, sys.stdout, sys.stderr, json_output=args.json)
    try:
        socket_path = resolve_socket(args)
    except ConfigError as exc:
        return shell.error(str(exc), EXIT_USAGE, "vmpower: ")
    shell.client = make_client(socket_path)
    if command in TELEMETRY_COMMANDS:
        from vmpower.telemetry import cli as telemetry_cli

        return telemetry_cli.run(args, socket_path, sys.stdin, sys.stdout, sys.stderr)
    if command is None:
        return interactive(shell, sys.stdin, socket_path)
    spec = COMMANDS[command]
    words = [command]
    for param in spec.params:
        value = getattr(args, param.rstrip("?"))
        if value is not None:
            words.append(value)
    return shell.run(words, prefix="vmpower: ")


if __name__ == "__main__":
    sys.exit(main())
