"""Command line: Go-exporter-style flags, each with a CONNTRACK_DNS_EXPORTER_* environment twin.

Bad input (unknown flag, bad value, unusable listen address) exits 2 with one line on stderr.
Subcommands: `diagnose` (the node's DNS path checked, with a verdict) and `record` (a fixture of this
namespace's conntrack statistics and table); each has `--help`.
"""

from __future__ import annotations

import argparse
import sys

from exporter import __version__
from exporter.core import caps, logs
from exporter.core.flags import Parser, add_flag, duration, int_range, parse_hostport
from exporter.features import all_features

DEFAULT_PORT = 19153
PROG = "conntrack-dns-exporter"


def listen_address(text: str) -> tuple[str, int]:
    return parse_hostport(text)


def telemetry_path(text: str) -> str:
    reserved = ("/", "/-/healthy", "/-/ready")
    if not text.startswith("/") or text in reserved or any(c in text for c in "?# \t"):
        raise argparse.ArgumentTypeError(f"invalid path {text!r} (want e.g. /metrics; not {', '.join(reserved)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Prometheus exporter for the node's conntrack table and DNS path.",
                epilog="Subcommands: diagnose (check the node's DNS path and name the cause; diagnose --help), "
                       "record (capture a replayable fixture of this namespace; record --help).",
                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g = p.add_argument_group("web")
    add_flag(g, "--web.listen-address", default=("", DEFAULT_PORT), type=listen_address, metavar="[HOST]:PORT",
             help="Address to serve the metrics on.")
    add_flag(g, "--web.telemetry-path", default="/metrics", type=telemetry_path, metavar="PATH",
             help="Path under which the metrics are served.")
    add_flag(g, "--web.disable-exporter-metrics", default=False, action="bool",
             help="Leave out the metrics about the exporter process itself (process_*, python_*) and its web "
                  "server (conntrack_dns_exporter_web_*).")
    add_flag(g, "--web.keepalive", default=True, action="bool",
             help="HTTP/1.1 keep-alive, so a scrape connection survives a full conntrack table.")
    add_flag(g, "--web.idle-timeout", default=300.0, type=duration(0.01, 86400),
             help="Close a keep-alive connection idle for this long (keep it above the scrape interval).")
    add_flag(g, "--web.read-timeout", default=10.0, type=duration(0.01, 600),
             help="A request (line, headers; a new connection: TLS handshake too) must be complete by then.")
    add_flag(g, "--web.max-connections", default=64, type=int_range(1, 4096),
             help="Open connections (one thread each); at the limit a new one takes the slot of the slowest "
                  "or longest-idle one.")
    add_flag(g, "--web.config.file", default="", metavar="FILE",
             help="Prometheus exporter-toolkit web config (TLS, basic auth); /, /-/healthy, /-/ready stay open.")
    add_flag(g, "--web.status-page.public", default=False, action="bool",
             help="Serve the / status page without the web config's basic auth (it shows node and pod names).")
    add_flag(g, "--web.notrack", default=False, action="bool",
             help="Exempt the listen port from conntrack with an nftables NOTRACK table (needs nft, CAP_NET_ADMIN).")
    add_flag(g, "--web.notrack.check-interval", default=30.0, type=duration(0.1, 86400),
             help="How often to check that the NOTRACK table is still installed (reinstalled if flushed).")
    g = p.add_argument_group("logging")
    add_flag(g, "--log.level", default="info", choices=logs.LEVELS, help="Log level.")
    add_flag(g, "--log.format", default="logfmt", choices=logs.FORMATS, help="Log format.")
    for feature in all_features():
        feature.add_arguments(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


SUBCOMMANDS = {"record": "exporter.record", "diagnose": "exporter.diagnose.command"}


def main(argv: list[str] | None = None) -> int:
    caps.raise_net_admin()  # first, before any thread exists (exporter/core/caps.py)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]))
    args = parse_args(argv)
    from exporter.app import run

    return run(args)
