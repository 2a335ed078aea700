"""The probe loop: an asyncio event loop in a background thread that probes the targets each interval.

Scrapes never wait for it: results go into a `ProbeStore` that the `dns` collector reads. Each round
(every `--probe.interval`, counted on the wall clock from a per-node phase, see `exporter.dns.sampler`):
- re-decides the resolv.conf fallback: the nameservers of `--probe.resolv-conf` become targets (kind
  `resolvconf`) only while no other origin (static servers, NodeLocal, Kubernetes) provides any; the
  first round waits (bounded) for discovery's "synced" event, so the fallback is not probed just because
  the first EndpointSlice list had not returned yet. Unless `--probe.timeout`/`--probe.attempts` are
  given, resolv.conf targets are probed with the file's own `options timeout:`/`attempts:`;
- takes the target registry's snapshot, so targets added or removed (a rollout replacing endpoints)
  are picked up within one interval, and forgets the results of removed ones;
- probes every node-local target (Service IP, NodeLocal, static, resolv.conf) and only
  `--probe.endpoints-per-round` of the CoreDNS endpoints (kind `endpoint`), chosen by the sampler;
- starts one task per target, after a random delay of up to a quarter of the interval (jitter, so a
  node's probes do not go out in a burst). Targets are independent (issue 13): each has its own
  `--probe.concurrency` lookups in flight at most, so a target that times out only delays itself. A
  target whose previous probe is still running (timeouts take `timeout x attempts`) is skipped this
  round and the skip counted (`dns_probe_skipped_total{reason="busy"}`), unless that probe began less
  than half an interval ago (the first round is off the grid: the next can follow within milliseconds).
- a `nodelocal` target is first asked one short question; it is probed only while it answers.
- the search-path probe replays glibc's search-list walk for each `--probe.search-name`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass

from exporter.core import logs
from exporter.discovery import SYNC_TIMEOUT, Discovery
from exporter.discovery.targets import Target
from exporter.dns import models, resolvconf
from exporter.dns.resolver import ProbeResult, lookup
from exporter.dns.sampler import EndpointSampler
from exporter.dns.store import COMPACT_KINDS, ProbeStore

log = logs.get("probes")

RESOLVCONF = "resolvconf"


@dataclass(frozen=True)
class ProbeConfig:
    names: tuple[str, ...] = ("kubernetes.default.svc.cluster.local.",)
    modes: tuple[str, ...] = ("parallel", "tcp")
    resolvers: tuple[str, ...] = models.DEFAULT_RESOLVERS  # application lookups (exporter.dns.models)
    timeout: float = 5.0
    attempts: int = 2
    interval: float = 5.0
    concurrency: int = 8  # per target
    resolv_conf: str = "/etc/resolv.conf"
    search_names: tuple[str, ...] = ()
    search_port: int = 53  # resolv.conf cannot name a port; tests point this at their own server
    jitter: float = 0.25  # fraction of the interval
    resolv_timeout: bool = False  # resolv.conf targets use the file's options timeout (flag not given)
    resolv_attempts: bool = False  # ... and its options attempts
    endpoints_per_round: int = 2  # CoreDNS endpoints (kind endpoint) probed per round
    node: str = ""  # node name: seeds the endpoint sampler


def application_path(targets: tuple[Target, ...]) -> tuple[str, ...]:
    """The kinds of target the node's pods send their lookups to, where the resolver models run: NodeLocal
    DNSCache when it is configured (pods' resolv.conf names it), else the Service IP (or the configured and
    resolv.conf servers without Kubernetes). Never the sampled endpoints (docs/scale.md)."""
    if any(t.kind == "nodelocal" for t in targets):
        return ("nodelocal",)
    return tuple(k for k in ("service", "static", "resolvconf") if k not in COMPACT_KINDS)


class ProbeService:
    """Background prober (a `Service`): `start()` spawns the loop thread, `stop()` ends it."""

    name = "dns-probes"

    def __init__(self, config: ProbeConfig, discovery: Discovery, store: ProbeStore) -> None:
        self.config = config
        self.discovery = discovery
        self.targets = discovery.targets
        self.store = store
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._resolv_error: str | None = None
        self._resolv_options: tuple[float, int] = (config.timeout, config.attempts)
        self._state: dict[tuple[str, str, str, str], str] = {}  # last failure summary per probe, for logs
        self._sems: dict[object, asyncio.Semaphore] = {}  # per target (or search name): issue 13
        self.sampler = EndpointSampler(config.node, config.endpoints_per_round)
        self._glibc: dict[tuple[str, str, str], models.GlibcState] = {}  # glibc-sticky: one "process" per probe
        self._rotate = False  # resolv.conf targets: the file's options rotate
        self._started: dict[object, float] = {}  # when each running target probe began (monotonic)
        self.rounds = 0

    # Service -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dns-probes", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("probe loop crashed")

    # the loop ------------------------------------------------------------------------------------
    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        running: dict[object, asyncio.Task[None]] = {}
        deadline = time.monotonic() + SYNC_TIMEOUT
        while not self.discovery.synced and not self._stopping.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        interval = self.config.interval
        last: int | None = None
        try:
            while not self._stopping.is_set():
                r = self.sampler.round_at(time.time(), interval)
                if last is not None and r <= last:  # woke early, or the clock stepped back
                    r = last + 1
                self.round(running, r)
                last = r
                self.rounds += 1
                delay = min(max(self.sampler.round_start(r + 1, interval) - time.time(), 0.0), interval)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    def _sem(self, key: object) -> asyncio.Semaphore:
        sem = self._sems.get(key)
        if sem is None:
            sem = self._sems[key] = asyncio.Semaphore(self.config.concurrency)
        return sem

    def round(self, running: dict[object, asyncio.Task[None]], round_: int = 0) -> None:
        self._refresh_resolvconf()
        snapshot = self.targets.snapshot()
        live = {(t.server, t.kind) for t in snapshot}
        self.store.retain(live)
        self._state = {k: v for k, v in self._state.items() if (k[0], k[1]) in live}
        self._glibc = {k: v for k, v in self._glibc.items() if (k[0], k[1]) in live}
        for key in [k for k, task in running.items() if task.done()]:
            del running[key]
        now = time.monotonic()
        self._started = {k: v for k, v in self._started.items() if k in running}
        self._sems = {k: v for k, v in self._sems.items() if k in running or k in snapshot}
        chosen = set(self.sampler.choose([t for t in snapshot if t.kind == "endpoint"], round_))
        app_kinds = application_path(snapshot)
        for t in snapshot:
            key = (t.server, t.kind)
            resolvers = self.config.resolvers if t.kind in app_kinds else ()
            if t.kind != "nodelocal":
                self.store.ensure(key, self.config.modes, resolvers)
            if t.kind == "endpoint" and t not in chosen:
                continue
            if t in running:
                # A round that comes soon after the target's probe began (the first round is off the node's
                # round grid, so the next grid round can follow it by milliseconds) is not a missed round.
                if now - self._started.get(t, now) >= self.config.interval / 2:
                    self.store.skip(key, "busy")
            else:
                running[t] = asyncio.create_task(self._probe_target(t, self._sem(t)), name=f"probe {t.server}")
                self._started[t] = now
            # own tasks: a glibc lookup may wait 20 s, it must not hold the mode probes back. Only on the path
            # the node's pods resolve through (application_path): what an application waits is its question.
            for res in resolvers:
                if (t, res) not in running:
                    running[(t, res)] = asyncio.create_task(self._probe_resolver(t, res, self._sem(t)),
                                                            name=f"{res} {t.server}")
        for name in self.config.search_names:
            key = ("search", name)
            if key not in running:
                running[key] = asyncio.create_task(self._probe_search(name, self._sem(key)), name=f"search {name}")

    def _configured_elsewhere(self) -> bool:
        return any(o != RESOLVCONF for o in self.targets.origins())

    def _refresh_resolvconf(self) -> None:
        if self._configured_elsewhere():
            self.targets.set(RESOLVCONF, [])
            self.store.set_resolv_conf(None)
            return
        try:
            conf = resolvconf.load(self.config.resolv_conf)
            error = None if conf.nameservers else f"no nameserver in {self.config.resolv_conf}"
        except OSError as e:
            conf, error = resolvconf.ResolvConf(), f"cannot read {self.config.resolv_conf}: {e.strerror}"
        if error != self._resolv_error:
            if error:
                log.warning("no probe targets: %s", error)
            self._resolv_error = error
        self.store.set_resolv_conf(error is None)
        self._rotate = conf.rotate
        self._resolv_options = (conf.timeout if self.config.resolv_timeout else self.config.timeout,
                                conf.attempts if self.config.resolv_attempts else self.config.attempts)
        self.targets.set(RESOLVCONF, [Target(ns, 53, RESOLVCONF) for ns in conf.nameservers])

    async def _jitter(self) -> None:
        await asyncio.sleep(random.uniform(0, self.config.interval * self.config.jitter))

    async def _lookup(self, sem: asyncio.Semaphore, t: Target, name: str, mode: str,
                      timeout: float | None = None, attempts: int | None = None) -> ProbeResult:
        default_timeout, default_attempts = (self._resolv_options if t.kind == RESOLVCONF
                                             else (self.config.timeout, self.config.attempts))
        async with sem:
            r = await lookup(t.host, t.port, name, mode, timeout or default_timeout, attempts or default_attempts,
                             self.discovery.own_ports)
        if log.isEnabledFor(logging.DEBUG):  # the fields are not built for nothing
            log.debug("probe", extra={"kv": {
                "server": t.server, "kind": t.kind, "mode": mode, "name": name, "seconds": f"{r.duration:.6f}",
                "outcome": ",".join(f"{q}={o.reason or 'ok'}" for q, o in r.outcomes.items())}})
        return r

    async def _probe_target(self, t: Target, sem: asyncio.Semaphore) -> None:
        await self._jitter()
        key = (t.server, t.kind)
        if t.kind == "nodelocal":
            # One short question decides whether NodeLocal DNSCache is there at all.
            r = await self._lookup(sem, t, self.config.names[0], "parallel",
                                   timeout=min(self.config.timeout, 1.0), attempts=1)
            present = r.heard
            if self.store.set_present(t.server, present):
                log.warning("nodelocal %s", "answers, probing it" if present else "does not answer, not probing it",
                            extra={"kv": {"server": t.server}})
            if not present:
                return
            self.store.ensure(key, self.config.modes,
                              self.config.resolvers if t.kind in application_path(self.targets.snapshot()) else ())
        await asyncio.gather(*(self._probe_mode(t, key, mode, sem) for mode in self.config.modes))

    async def _probe_resolver(self, t: Target, resolver: str, sem: asyncio.Semaphore) -> None:
        await self._jitter()
        key = (t.server, t.kind)
        if t.kind == "nodelocal" and not self.store.is_present(t.server):
            return
        timeout, attempts = (self._resolv_options if t.kind == RESOLVCONF
                             else (self.config.timeout, self.config.attempts))
        options = models.ResolverOptions(timeout=timeout, attempts=attempts,
                                         rotate=self._rotate and t.kind == RESOLVCONF, own=self.discovery.own_ports)
        state = None
        if models.model(resolver).sticky:
            state = self._glibc.setdefault((t.server, t.kind, resolver), models.GlibcState())
        for name in self.config.names:
            async with sem:
                r = await models.run(resolver, [(t.host, t.port)], name, options, state)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("lookup", extra={"kv": {"server": t.server, "kind": t.kind, "resolver": resolver,
                                                  "name": name, "result": r.result, "seconds": f"{r.duration:.6f}"}})
            self.store.record_lookup(key, r)

    async def _probe_mode(self, t: Target, key: tuple[str, str], mode: str, sem: asyncio.Semaphore) -> None:
        for name in self.config.names:
            r = await self._lookup(sem, t, name, mode)
            self.store.record(key, r, name)  # dropped if the target was removed meanwhile
            failing = ",".join(sorted({f"{q}={o.reason}" for q, o in r.outcomes.items() if o.reason}))
            state_key = (t.server, t.kind, mode, name)
            if self._state.get(state_key, "") != failing:
                if failing or state_key in self._state:
                    log.warning("probe %s", f"failing: {failing}" if failing else "recovered", extra={"kv": {
                        "server": t.server, "kind": t.kind, "mode": mode, "name": name}})
                self._state[state_key] = failing

    async def _probe_search(self, name: str, sem: asyncio.Semaphore) -> None:
        await self._jitter()
        try:
            conf = resolvconf.load(self.config.resolv_conf)
        except OSError:
            return
        if not conf.nameservers:
            return
        server = Target(conf.nameservers[0], self.config.search_port, RESOLVCONF)
        sent = 0

        async def ask(candidate: str) -> str:
            nonlocal sent
            r = await self._lookup(sem, server, candidate, conf.mode)
            sent += r.sent
            return r.status()

        start = time.perf_counter()
        await resolvconf.search(name, conf, ask)
        self.store.record_search(name, sent, time.perf_counter() - start)
