"""Flag helpers shared by every feature: Go-exporter style names, environment twins, value parsers.

Every flag `--a.b-c` has the environment twin `CONNTRACK_DNS_EXPORTER_A_B_C`. A command-line value wins
over the environment, the environment over the default. Values are validated while parsing, so a bad
value exits 2 with one line before anything starts (blackbox_exporter validates at load, never at
probe time). A bad environment twin only counts when the command line does not set that flag: the
command line overriding it is the usual fix, so it must not abort the start (`check_env`).
`--help` shows each flag's built-in default and its twin.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

ENV_PREFIX = "CONNTRACK_DNS_EXPORTER_"

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def env_name(flag: str) -> str:
    """`--web.listen-address` -> `CONNTRACK_DNS_EXPORTER_WEB_LISTEN_ADDRESS`."""
    return ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", flag.lstrip("-")).upper()


MAX_DURATION = 366 * 86400.0  # no duration flag means more than a year; beyond that is a typo or an attack


def parse_duration(text: str) -> float:
    """Parse a Go-style duration (`5s`, `500ms`, `1m30s`) or a bare number of seconds.

    Finite and positive only: `float()` alone would accept `nan`, `inf` and `1e400` (= inf), and a
    `nan` timeout or interval makes every comparison false (dropped connections, a busy loop).
    """
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pos, value = 0, 0.0
        for m in _DURATION_RE.finditer(s):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if pos != len(s) or not s:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r} (want e.g. 5s, 500ms, 1m)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: not a finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    if value > MAX_DURATION:
        raise argparse.ArgumentTypeError(f"duration {text!r} is out of range (at most 366 days)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _fmt_seconds(v: float) -> str:
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        if v >= scale and (v / scale) == int(v / scale):
            return f"{int(v / scale)}{unit}"
    return f"{v:g}s"


class duration:  # lower case: used like a type, `type=duration(0.1, 3600)`
    """A duration flag type bounded to [lo, hi] seconds; `range` is shown in --help and docs/flags.md."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.range = f"{_fmt_seconds(lo)} to {_fmt_seconds(hi)}"
        self.__name__ = "duration"

    def __call__(self, text: str) -> float:
        value = parse_duration(text)
        if not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"duration {text!r} is out of range ({self.range})")
        return value


class int_range:
    """An integer flag type bounded to [lo, hi]; `range` is shown in --help and docs/flags.md."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self.range = f"{lo} to {hi}"
        self.__name__ = "integer"

    def __call__(self, text: str) -> int:
        value = positive_int(text) if self.lo > 0 else _int(text)
        if not self.lo <= value <= self.hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range ({self.range})")
        return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (want true or false)")


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `:port`, or (with a default port) a bare host/IP."""
    s = text.strip()
    host: str
    port_s: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"invalid address {text!r}: missing ']'")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"invalid address {text!r}")
        port_s = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    elif s.count(":") > 1:  # bare IPv6
        host, port_s = s, None
    else:
        host, port_s = s, None
    if port_s is None:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"invalid address {text!r}: want host:port")
        port = default_port
    else:
        if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise argparse.ArgumentTypeError(f"invalid port in {text!r}")
        port = int(port_s)
    if host and not _valid_host(host):
        raise argparse.ArgumentTypeError(f"invalid host in {text!r}")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?", host))


class BadEnv:
    """The default of a flag whose environment twin did not parse; an error only if the flag stays unset."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"<invalid environment: {self.message}>"


def check_env(namespace: argparse.Namespace) -> None:
    """Exit 2 with one line if a flag kept the default of a bad environment twin (call after parsing)."""
    for value in vars(namespace).values():
        if isinstance(value, BadEnv):
            _fail(value.message)


def show_default(default: Any, dest: str = "") -> str:
    """A flag's default as --help and docs/flags.md show it ("" when there is none worth showing)."""
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, tuple) and len(default) == 2 and isinstance(default[1], int):
        return f"{default[0]}:{default[1]}"
    if isinstance(default, tuple):  # NAMESPACE/NAME pairs, or lists of choices
        return ("/" if dest.endswith("dns_service") else ",").join(str(d) for d in default)
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):  # every float flag is a duration (parse_duration)
        return f"{default:g}s"
    if isinstance(default, list):
        return ",".join(str(d) for d in default)
    return str(default)


HELP_SUFFIX = re.compile(r" \[(?:default: .*; )?env [A-Z0-9_]+\]$")


def add_flag(
    parser: argparse.ArgumentParser | Any,
    flag: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] | None = None,
    help: str,
    action: str | type[argparse.Action] | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> None:
    """Add a flag whose default comes from its environment twin when that is set.

    `action="append"` flags are plain lists on `args` (given values, else the environment twin's
    comma-separated list, else the default); boolean flags use
    `argparse.BooleanOptionalAction` (`--x` / `--no-x`) and read true/false.
    """
    env = env_name(flag)
    raw = os.environ.get(env)
    bounds = getattr(type, "range", None)
    if bounds:
        help = f"{help} Range: {bounds}."
    shown = show_default(default, _dest(flag))
    # argparse %-formats help strings: a literal % (a default such as 0.1%) must be doubled
    text = f"{help} [default: {shown}; env {env}]" if shown else f"{help} [env {env}]"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if action == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
        value: Any = default
        if raw is not None:
            try:
                value = parse_bool(raw)
            except argparse.ArgumentTypeError as e:
                value = BadEnv(f"{env}: {e}")
        kwargs["default"] = value
    elif action == "append":
        kwargs["action"] = _Append
        kwargs["type"] = type
        value = list(default or [])
        if raw:
            items = [p.strip() for p in raw.split(",") if p.strip()]
            try:
                value = [type(p) if type else p for p in items]
            except argparse.ArgumentTypeError as e:
                value = BadEnv(f"{env}: {e}")
        kwargs["default"] = value
    else:
        if action is not None:
            kwargs["action"] = action
        if type is not None:
            kwargs["type"] = type
        value = default
        if raw is not None:
            try:
                value = type(raw) if type else raw
            except argparse.ArgumentTypeError as e:
                value = BadEnv(f"{env}: {e}")
            if choices is not None and not isinstance(value, BadEnv) and value not in choices:
                value = BadEnv(f"{env}: invalid choice {raw!r} (choose from {', '.join(choices)})")
        kwargs["default"] = value
    if choices is not None:
        kwargs["choices"] = choices
    if metavar is not None:
        kwargs["metavar"] = metavar
    parser.add_argument(flag, dest=_dest(flag), **kwargs)


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"conntrack-dns-exporter: error: {message}\n")
    raise SystemExit(2)


def _dest(flag: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", flag.lstrip("-"))


class _Append(argparse.Action):
    """A repeatable flag whose first use replaces the default (or the environment twin's list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


class Parser(argparse.ArgumentParser):
    """The parser of every command: errors are one line naming the program and exit 2 (never a usage dump),
    and a bad environment twin counts only if the command line left that flag unset."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed = super().parse_known_args(args, namespace)
        check_env(parsed[0])
        return parsed

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)
