"""`vmpower-guest`: DPDK guest_cli's commands, interactive or one at a time.

Owns the command line of the guest tool: options, the ``vmpower(guest)> `` shell,
one-shot commands (``vmpower-guest set_cpu_freq 0 max``), what is printed, and the
exit status: 0 on ACK, 1 on NACK, timeout or port failure, 2 on a usage error.

Ports are found once per run and each is opened at its first use and kept open for
the session (a virtio port opens once at a time).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vmpower import __version__, protocol
from vmpower.errors import VmpowerError
from vmpower.guest import requests
from vmpower.guest.channel import PortChannel
from vmpower.guest.ports import (
    PORT_PREFIX,
    PortError,
    PortInfo,
    discover,
    port_for_vcpu,
    port_from_arg,
)
from vmpower.guest.requests import OptionError, PolicyOptions
from vmpower.protocol import UNIT_BY_OP, Command, PolicyType, ReplyCode, Workload

PROMPT = "vmpower(guest)> "
DEFAULT_TIMEOUT_S = 2.0

# name: (usage, summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "set_cpu_freq": (
        f"set_cpu_freq <vcpu> {'|'.join(UNIT_BY_OP)}",
        "ask the host to change the frequency of a vCPU's host CPUs",
    ),
    "send_policy": ("send_policy now", "install the policy the options describe"),
    "remove_policy": ("remove_policy", "remove this VM's policy"),
    "query_cpu_freq": ("query_cpu_freq <vcpu>|all", "current frequency of vCPUs (kHz)"),
    "query_cpu_caps": ("query_cpu_caps <vcpu>|all", "turbo and priority-core capability"),
    "show_ports": ("show_ports", "the power ports found and which vCPU each serves"),
    "help": ("help [<command>]", "list the commands, or explain one"),
    "quit": ("quit", "leave the shell"),
}

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class UsageError(OptionError):
    """A command typed wrong: its message ends with the usage line."""


class GuestSession:
    """The guest tool's state for one run: its ports (opened once) and its options."""

    def __init__(
        self,
        ports: list[PortInfo],
        vm_name: str,
        policy: PolicyOptions,
        timeout_s: float,
        out: TextIO,
        no_ports_hint: str = "",
    ) -> None:
        self.ports = ports
        self.vm_name = vm_name
        self.policy = policy
        self.timeout_s = timeout_s
        self.out = out
        self.no_ports_hint = no_ports_hint
        self._open: dict[Path, PortChannel] = {}
        self._handlers: dict[str, Callable[[list[str]], int]] = {
            "set_cpu_freq": self.cmd_set_cpu_freq,
            "send_policy": self.cmd_send_policy,
            "remove_policy": self.cmd_remove_policy,
            "query_cpu_freq": self.cmd_query_cpu_freq,
            "query_cpu_caps": self.cmd_query_cpu_caps,
            "show_ports": self.cmd_show_ports,
            "help": self.cmd_help,
        }

    def close(self) -> None:
        for channel in self._open.values():
            channel.close()
        self._open.clear()

    def run(self, words: list[str]) -> int:
        """Run one command; returns its exit status (errors are raised: see _run_one)."""
        if not words:
            return EXIT_OK
        name, args = words[0], words[1:]
        handler = self._handlers.get(name)
        if handler is None:
            raise UsageError(f"unknown command {name!r} (help lists them)")
        return handler(args)

    # -- ports -------------------------------------------------------------------------

    def _port(self, vcpu: int | None) -> PortInfo:
        """Port ``vcpu`` if the guest has it; the first port for others and for None."""
        if not self.ports:
            raise PortError(f"no power port found{self.no_ports_hint}")
        return self.ports[0] if vcpu is None else port_for_vcpu(self.ports, vcpu)

    def _exchange(self, vcpu: int | None, request: bytes, accept: Callable[[bytes], bool]) -> bytes:
        port = self._port(vcpu)
        channel = self._open.get(port.device)
        if channel is None:
            channel = PortChannel(port)
            channel.open()  # once per session: a virtio port opens once at a time
            self._open[port.device] = channel
        size = protocol.REPLY_SIZE[protocol.peek_header(request)[2]]
        return channel.exchange(request, size, accept, self.timeout_s)

    # -- commands ----------------------------------------------------------------------

    def cmd_set_cpu_freq(self, args: list[str]) -> int:
        usage = COMMANDS["set_cpu_freq"][0]
        if len(args) != 2:
            raise UsageError(f"usage: {usage}")
        vcpu = _vcpu(args[0], usage, requests.VCPU_LIMIT)
        op = args[1]
        if op not in UNIT_BY_OP:
            raise UsageError(f"{op!r} is not one of {', '.join(UNIT_BY_OP)}; usage: {usage}")
        request = requests.power_request(vcpu, op, self.vm_name)
        reply = self._exchange(vcpu, request, requests.echo_of(request))
        return self._ack_or_nack(f"vCPU {vcpu} {op}", reply)

    def cmd_send_policy(self, args: list[str]) -> int:
        if args != ["now"]:
            raise UsageError(f"usage: {COMMANDS['send_policy'][0]}")
        request = requests.policy_request(self.policy, self.vm_name)
        assert self.policy.policy is not None
        # Policies go on the first port (DPDK's guest_cli hard-codes channel 1, which a
        # VM with one power channel does not have).
        reply = self._exchange(None, request, requests.echo_of(request))
        vcpus = ",".join(str(v) for v in self.policy.vcpus)
        return self._ack_or_nack(f"{self.policy.policy.name} policy on vCPUs {vcpus}", reply)

    def cmd_remove_policy(self, args: list[str]) -> int:
        if args:
            raise UsageError(f"usage: {COMMANDS['remove_policy'][0]}")
        request = requests.remove_policy_request(self.vm_name)
        reply = self._exchange(None, request, requests.echo_of(request))
        return self._ack_or_nack("remove policy", reply)

    def _query_target(self, args: list[str], usage: str) -> int | None:
        """None for ``all``, else the vCPU (the reply holds at most 8)."""
        if len(args) != 1:
            raise UsageError(f"usage: {usage}")
        if args[0] == "all":
            return None
        return _vcpu(args[0], usage, protocol.MAX_VCPU_PER_VM)

    def cmd_query_cpu_freq(self, args: list[str]) -> int:
        vcpu = self._query_target(args, COMMANDS["query_cpu_freq"][0])
        command = Command.QUERY_FREQ_LIST if vcpu is None else Command.QUERY_FREQ
        request = requests.query_request(command, vcpu or 0, self.vm_name)
        reply = self._exchange(vcpu, request, requests.freq_list_reply)
        if requests.reply_code(reply) != ReplyCode.FREQ_LIST:
            return self._query_refused("query_cpu_freq")
        freq = protocol.FreqListReply.decode(reply)
        for v in _listed(vcpu, freq.num_vcpu):
            khz = freq.freq_list_khz[v]
            text = f"{khz} kHz" if khz else "- (not pinned, or not managed by the host)"
            print(f"vCPU {v}: {text}", file=self.out)
        return EXIT_OK

    def cmd_query_cpu_caps(self, args: list[str]) -> int:
        vcpu = self._query_target(args, COMMANDS["query_cpu_caps"][0])
        command = Command.QUERY_CAPS_LIST if vcpu is None else Command.QUERY_CAPS
        request = requests.query_request(command, vcpu or 0, self.vm_name)
        reply = self._exchange(vcpu, request, requests.caps_list_reply)
        if requests.reply_code(reply) != ReplyCode.CAPS_LIST:
            return self._query_refused("query_cpu_caps")
        caps = protocol.CapsListReply.decode(reply)
        for v in _listed(vcpu, caps.num_vcpu):
            turbo = "yes" if caps.turbo[v] else "no"
            priority = "yes" if caps.priority[v] else "no"
            print(f"vCPU {v}: turbo {turbo}, priority core {priority}", file=self.out)
        return EXIT_OK

    def cmd_show_ports(self, args: list[str]) -> int:
        if args:
            raise UsageError(f"usage: {COMMANDS['show_ports'][0]}")
        if not self.ports:
            print(f"no power port found{self.no_ports_hint}", file=self.out)
            return EXIT_REFUSED
        for i, port in enumerate(self.ports):
            index = "-" if port.index is None else str(port.index)
            serves = [f"vCPU {port.index}"] if port.index is not None else []
            if i == 0:
                serves += ["vCPUs without a port of their own", "policies"]
            print(f"{index:>4}  {port.device}  ({', '.join(serves)})", file=self.out)
        return EXIT_OK

    def cmd_help(self, args: list[str]) -> int:
        if len(args) > 1:
            raise UsageError(f"usage: {COMMANDS['help'][0]}")
        if args:
            entry = COMMANDS.get(args[0])
            if entry is None:
                raise UsageError(f"no command {args[0]!r} (help lists them)")
            print(f"{entry[0]}\n  {entry[1]}", file=self.out)
            return EXIT_OK
        print(_command_list(), file=self.out)
        return EXIT_OK

    # -- output ------------------------------------------------------------------------

    def _ack_or_nack(self, what: str, reply: bytes) -> int:
        if requests.reply_code(reply) == ReplyCode.ACK:
            print(f"{what}: ACK", file=self.out)
            return EXIT_OK
        print(f"{what}: NACK (refused by the host; its log says why)", file=self.out)
        return EXIT_REFUSED

    def _query_refused(self, what: str) -> int:
        print(
            f"{what}: NACK (refused: the host must allow queries with `set_query <vm>"
            " enable`, and the vCPU must be this VM's)",
            file=self.out,
        )
        return EXIT_REFUSED


def _vcpu(text: str, usage: str, limit: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise UsageError(f"vCPU {text!r} is not a number; usage: {usage}")
    value = int(text)
    if value >= limit:
        raise UsageError(f"vCPU {value} is out of range (0-{limit - 1}); usage: {usage}")
    return value


def _listed(vcpu: int | None, num_vcpu: int) -> range:
    if vcpu is not None:
        return range(vcpu, vcpu + 1)
    return range(min(num_vcpu, protocol.MAX_VCPU_PER_VM))


# ---------------------------------------------------------------------------------------
# Command line


def _command_list(indent: str = "") -> str:
    """Each command's usage line with its summary below (usages are up to 62 columns)."""
    return "\n".join(
        f"{indent}{usage}\n{indent}    {summary}" for usage, summary in COMMANDS.values()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmpower-guest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the host's power agent (vmpowerd, or DPDK's vm_power_manager)"
        "\nfor CPU frequency changes through this VM's virtio-serial power ports."
        "\nWith a command, runs it and exits; without one, an interactive shell.",
        epilog=f"commands:\n{_command_list('  ')}\n\n"
        "exit status: 0 ACK, 1 NACK or no reply, 2 usage error",
    )
    add = parser.add_argument
    add("command", nargs="*", help="one command and its arguments")
    add("--version", action="version", version=f"vmpower-guest {__version__}")
    add(
        "--vm-name",
        default="",
        metavar="NAME",
        help="VM name put in requests; vmpowerd knows the VM by its channel, DPDK's"
        " host needs it (default: empty)",
    )
    add(
        "--vcpu-list",
        default="",
        metavar="LIST",
        help="vCPUs a policy controls, e.g. 0-1 (at most 8)",
    )
    add("--busy-hours", default="", metavar="HOURS", help="TIME policy: busy hours, e.g. 9-17")
    add("--quiet-hours", default="", metavar="HOURS", help="TIME policy: quiet hours, e.g. 1-5")
    add("--policy", choices=[p.name for p in PolicyType], help="what send_policy installs")
    add("--workload", choices=[w.name for w in Workload], help="WORKLOAD policy level")
    add(
        "--mac-list",
        default="",
        metavar="MACS",
        help="TRAFFIC policy: MAC addresses, separated by ; or ,",
    )
    add("--min-packet-thresh", type=_u32, metavar="PPS", help="TRAFFIC: packets/s")
    add(
        "--avg-packet-thresh",
        type=_u32,
        metavar="PPS",
        help="TRAFFIC: packets/s from which the middle frequency is used",
    )
    add(
        "--max-packet-thresh",
        type=_u32,
        metavar="PPS",
        help="TRAFFIC: packets/s from which the maximum is used",
    )
    add(
        "--device",
        action="append",
        default=[],
        metavar="[N=]PATH",
        help="use this port instead of discovering them; N: the vCPU it serves"
        " (repeatable, with N=)",
    )
    add(
        "--sysfs-root",
        type=Path,
        default=Path("/sys"),
        metavar="DIR",
        help="where sysfs is, for discovery (default /sys)",
    )
    add(
        "--dev-root",
        type=Path,
        default=Path("/dev"),
        metavar="DIR",
        help="where device nodes are (default /dev)",
    )
    add(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"how long to wait for a reply (default {DEFAULT_TIMEOUT_S:g})",
    )
    return parser


def _u32(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer 0-{2**32 - 1}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: give 0 < seconds <= 3600")
    return value


def _policy_options(args: argparse.Namespace) -> PolicyOptions:
    options = PolicyOptions(
        policy=PolicyType[args.policy] if args.policy else None,
        vcpus=requests.parse_number_list(args.vcpu_list, "--vcpu-list", 256)
        if args.vcpu_list
        else (),
        busy_hours=requests.parse_hours(args.busy_hours, "--busy-hours") if args.busy_hours else (),
        quiet_hours=requests.parse_hours(args.quiet_hours, "--quiet-hours")
        if args.quiet_hours
        else (),
        workload=Workload[args.workload] if args.workload else None,
        macs=requests.parse_macs(args.mac_list) if args.mac_list else (),
        min_packet_thresh=args.min_packet_thresh,
        avg_packet_thresh=args.avg_packet_thresh,
        max_packet_thresh=args.max_packet_thresh,
    )
    options.check()
    return options


def _run_one(session: GuestSession, words: list[str], err: TextIO) -> int:
    """One command with its errors printed as one line; returns the exit status."""
    try:
        return session.run(words)
    except OptionError as exc:
        print(f"vmpower-guest: {exc}", file=err)
        return EXIT_USAGE
    except VmpowerError as exc:  # PortError, NoReplyError: the exchange failed
        print(f"vmpower-guest: {exc}", file=err)
        return EXIT_REFUSED


def interactive(session: GuestSession, stdin: TextIO, err: TextIO) -> int:
    """The ``vmpower(guest)>`` shell: status 0 on a terminal; for piped commands the
    worst status of any of them, so a script notices a NACK."""
    tty = stdin.isatty()
    if tty:
        _setup_completion()
    worst = EXIT_OK
    while True:
        try:
            line = input(PROMPT) if tty else stdin.readline()
        except EOFError:  # Ctrl-D
            print(file=session.out)
            break
        except KeyboardInterrupt:  # Ctrl-C drops the line, not the session
            print(file=session.out)
            continue
        if not tty and not line:
            break
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            print(f"vmpower-guest: {exc}", file=err)
            worst = max(worst, EXIT_USAGE)
            continue
        if words and words[0] in ("quit", "exit"):
            break
        if words:
            worst = max(worst, _run_one(session, words, err))
        session.out.flush()
    return EXIT_OK if tty else worst


def _setup_completion() -> None:
    try:
        import readline
    except ImportError:  # a minimal guest may lack it: plain input() still works
        return
    first_arg = {
        "send_policy": ["now"],
        "help": list(COMMANDS),
        "query_cpu_freq": ["all"],
        "query_cpu_caps": ["all"],
    }

    def complete(text: str, state: int) -> str | None:
        words = readline.get_line_buffer()[: readline.get_begidx()].split()
        if not words:
            options = list(COMMANDS)
        elif len(words) == 1:
            options = first_arg.get(words[0], [])
        elif len(words) == 2 and words[0] == "set_cpu_freq":
            options = list(UNIT_BY_OP)
        else:
            options = []
        matches = [o + " " for o in options if o.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer_delims(" \t\n")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        policy = _policy_options(args)
        requests.check_vm_name(args.vm_name)
        if args.device:
            ports = [port_from_arg(spec) for spec in args.device]
            indices = [p.index for p in ports]
            if len(ports) > 1 and None in indices:
                # Which vCPU would each serve? Guessing from the order would surprise.
                raise OptionError("--device: with several ports, name each one's vCPU: N=PATH")
            if len(set(indices)) < len(indices):
                raise OptionError("--device: two ports for the same vCPU")
        else:
            ports = discover(args.sysfs_root, args.dev_root)
    except (OptionError, PortError) as exc:
        print(f"vmpower-guest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    hint = (
        f" ({args.sysfs_root}/class/virtio-ports has no {PORT_PREFIX}<n>: does the VM"
        " have power channels? Or name a port with --device)"
    )
    session = GuestSession(ports, args.vm_name, policy, args.timeout, sys.stdout, hint)
    try:
        if args.command:
            if args.command == ["quit"]:
                return EXIT_OK
            return _run_one(session, args.command, sys.stderr)
        return interactive(session, sys.stdin, sys.stderr)
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
