"""Resolver models: lookups that wait exactly as an application's C library waits.

The `mode` probes (`exporter.dns.resolver`) measure each query on the wire; a model answers a different
question: what did `getaddrinfo(name, AF_UNSPEC)` in an application return, and after how long? Each
model follows one library's source (cited in its module) and is driven by resolv.conf-style options.

    glibc                         glibc 2.3x `send_dg`: A+AAAA on one connected socket, single-request
                                  fallback after a half answer, new socket after errors (fresh process)
    glibc-sticky                  the same in a long-lived process that keeps the fallback once taken
    glibc-single-request          `options single-request`
    glibc-single-request-reopen   `options single-request-reopen`
    glibc-use-vc                  `options use-vc`: `send_vc`, one TCP attempt, no read timeout
    musl                          musl 1.2 `__res_msend_rc`: resend every timeout/attempts, give up at timeout

Every model returns a `Lookup`: `result` is what the application got (`ok`: every query answered;
`partial`: addresses of one family only, the other query went unanswered; `failed`: no address,
EAI_AGAIN and friends) and `duration` what it waited.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from exporter.discovery.ownports import OwnPorts

RESULTS = ("ok", "partial", "failed")


@dataclass(frozen=True)
class ResolverOptions:
    """The resolv.conf `options` a model obeys (glibc's and musl's defaults)."""

    timeout: float = 5.0
    attempts: int = 2
    rotate: bool = False
    single_request: bool = False
    single_request_reopen: bool = False
    use_vc: bool = False
    vc_limit: float = 135.0  # use-vc has no read timeout in glibc; the probe gives up here (kernel SYN retries: 127 s)
    # where the probe registers its sockets' local ports (exporter.discovery.ownports), or None
    own: OwnPorts | None = field(default=None, compare=False, repr=False)


@dataclass
class GlibcState:
    """`statp->options` bits glibc sets on itself at run time (sticky for the life of a process)."""

    single_request: bool = False
    single_request_reopen: bool = False
    rotation: int = 0


@dataclass
class Lookup:
    resolver: str
    result: str = "failed"
    duration: float = 0.0
    answered: dict[str, int] = field(default_factory=dict)  # qtype -> rcode of the accepted answer
    sent: int = 0                                              # datagrams / TCP messages put on the wire
    error: str | None = None                                   # last socket error (errno name), if any


Servers = list[tuple[str, int]]
ModelFn = Callable[[Servers, str, ResolverOptions, GlibcState | None], Awaitable[Lookup]]


@dataclass(frozen=True)
class Model:
    name: str
    library: str              # "glibc" or "musl": how the result is derived
    fn: ModelFn
    options: Callable[[ResolverOptions], ResolverOptions]
    sticky: bool = False


def _models() -> dict[str, Model]:
    from exporter.dns.models import glibc, musl

    def same(o: ResolverOptions) -> ResolverOptions:
        return o

    return {
        "glibc": Model("glibc", "glibc", glibc.lookup, same),
        "glibc-sticky": Model("glibc-sticky", "glibc", glibc.lookup, same, sticky=True),
        "glibc-single-request": Model("glibc-single-request", "glibc", glibc.lookup,
                                      lambda o: replace(o, single_request=True)),
        "glibc-single-request-reopen": Model("glibc-single-request-reopen", "glibc", glibc.lookup,
                                             lambda o: replace(o, single_request_reopen=True)),
        "glibc-use-vc": Model("glibc-use-vc", "glibc", glibc.lookup, lambda o: replace(o, use_vc=True)),
        "musl": Model("musl", "musl", musl.lookup, same),
    }


RESOLVERS = ("glibc", "glibc-sticky", "glibc-single-request", "glibc-single-request-reopen", "glibc-use-vc", "musl")
DEFAULT_RESOLVERS = ("glibc", "musl")
_registry: dict[str, Model] = {}


def model(name: str) -> Model:
    if not _registry:
        _registry.update(_models())
    return _registry[name]


async def run(name: str, servers: Servers, qname: str, options: ResolverOptions,
              state: GlibcState | None = None) -> Lookup:
    """One application lookup of `qname` by resolver model `name`; never raises for DNS or network faults."""
    m = model(name)
    if m.library == "glibc" and state is None:
        state = GlibcState()  # a fresh process
    r = await m.fn(servers, qname, m.options(options), state)
    r.resolver = name
    return r
