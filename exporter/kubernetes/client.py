"""list + watch of one resource in one thread: the informer loop, its backoff and its stream handling.

A watch starts from the list's resourceVersion, asks for bookmarks, and is renewed from the last seen
resourceVersion when the API server ends it. `410 Gone` (as a status or an ERROR event) forces a relist;
any other failure (refused, reset mid-stream, 5xx, 403) is retried with capped exponential backoff and
jitter. Failures never clear what is known: handlers keep their state until the API answers again.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from exporter.core import logs
from exporter.kubernetes.state import KubeState

log = logs.get("kubernetes")

Obj = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# RBAC rule a 403 on each request is missing: (apiGroup, resource, verbs the exporter needs).
RBAC_RULES = {
    "services": ("", "services", "get"),
    "endpointslices": ("discovery.k8s.io", "endpointslices", "list, watch"),
    "pods": ("", "pods", "list, watch"),
}

class Gone(Exception):
    """The resourceVersion we watch from is too old (410): relist."""


class Forbidden(Exception):
    """403: the ServiceAccount lacks an RBAC rule; the message names it."""


class WatchError(Exception):
    """The API server sent a watch ERROR event other than 410."""


class Backoff:
    """Capped exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to `cap`, each scaled by 0.5-1.0."""

    def __init__(self, cap: float, base: float = 0.5) -> None:
        self.cap, self.base, self.attempt = cap, base, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


CONNTRACK_DIR = "/proc/sys/net/netfilter"


def conntrack_full(root: str = CONNTRACK_DIR) -> bool:
    """This namespace's conntrack table holds >= 99 % of nf_conntrack_max (False when unreadable)."""
    try:
        with open(f"{root}/nf_conntrack_count") as f:
            count = int(f.read())
        with open(f"{root}/nf_conntrack_max") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return False
    return limit > 0 and count >= 0.99 * limit


def blocked_by_conntrack(e: BaseException) -> bool:
    """A request that could not even connect while the table is full: its SYN got no conntrack entry."""
    from exporter.kubernetes.incluster import ConnectFailed

    names = {type(x).__name__ for x in (e, getattr(e, "reason", None), e.__cause__, e.__context__) if x}
    connect = isinstance(e, ConnectFailed) or bool(names & {"NewConnectionError", "ConnectTimeoutError"})
    return connect and conntrack_full()


def describe_error(e: BaseException) -> str:
    """A short bounded description for logs: `403 Forbidden`, `connection refused`, `reset mid-stream`."""
    status = getattr(e, "status", None)
    if isinstance(status, int) and status:
        return f"HTTP {status} {getattr(e, 'reason', '')}".strip()
    text = " ".join(str(e).split())
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timeout"),
                          ("Read timed out", "timeout"), ("ended prematurely", "stream ended mid-event"),
                          ("InvalidChunkLength", "stream reset mid-chunk"), ("IncompleteRead", "stream reset")):
        if needle in text:
            return short
    return f"{type(e).__name__}: {text[:200]}"


class Handler(Protocol):
    resource: str

    def replace(self, items: list[Obj]) -> None: ...

    def apply(self, kind: str, obj: Obj) -> None: ...

    def count(self) -> int: ...


@dataclass
class Timeouts:
    connect: float = 5.0
    list_read: float = 30.0
    watch_seconds: int = 300  # server side; the server ends the watch cleanly, we renew it
    watch_slack: float = 30.0  # client read timeout = watch_seconds + slack (dead peer behind a NAT)
    max_backoff: float = 30.0
    page_size: int = 500  # list in pages, as informers do, so a big list never loads the API server at once


class ListWatch:
    """list + watch of one resource in one thread, until `stop` is set."""

    def __init__(self, handler: Handler, list_fn: Callable[..., Any], rbac_namespace: str, state: KubeState,
                 stop: threading.Event, timeouts: Timeouts, before_list: Callable[[], None] | None = None,
                 after_watch: Callable[[], None] | None = None, listed: Callable[[], None] | None = None) -> None:
        self.h = handler
        self.resource = handler.resource
        self._list_fn = list_fn
        self._ns = rbac_namespace
        self._state = state
        self._stop = stop
        self._t = timeouts
        self._before_list = before_list
        self._after_watch = after_watch
        self._listed = listed  # after every list attempt, answered or failed (discovery's "synced")
        self._lock = threading.Lock()
        self._resp: Any = None
        self._rv: str | None = None  # where the next watch resumes; None: (re)list first
        self._watch_opened: float | None = None
        self._watch_events = 0
        self._last_gone = -1e9
        self._forbidden_logged: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"kube-{self.resource}", daemon=True)

    # -- lifecycle --
    def start(self) -> None:
        self.thread.start()

    def interrupt(self) -> None:
        """Unblock a read in progress (called after `stop` is set)."""
        with self._lock:
            resp = self._resp
        if resp is not None:
            shutdown_response(resp)

    def _run(self) -> None:
        backoff = Backoff(self._t.max_backoff)
        while not self._stop.is_set():
            verb = "list" if self._rv is None else "watch"
            try:
                if self._rv is None:
                    if self._before_list is not None:
                        self._before_list()
                    try:
                        self._rv = self._list()
                    finally:
                        if self._listed is not None:
                            self._listed()
                    backoff.reset()
                verb = "watch"
                started = time.monotonic()
                events = self._watch()
                if self._stop.is_set():
                    break
                if self._after_watch is not None:
                    self._after_watch()
                # The server ended the watch (its timeout): renew from where we are, at once; but a
                # server that keeps closing watches straight away must not make us spin.
                if events == 0 and time.monotonic() - started < 1.0:
                    self._stop.wait(backoff.next())
                else:
                    backoff.reset()
                continue
            except Gone:
                if self._stop.is_set():
                    break
                log.info("watch expired (410 Gone), relisting", extra={"kv": {"resource": self.resource}})
                self._state.restarted(self.resource)
                self._rv = None
                # A server answering 410 again right after a relist must not make us spin.
                now = time.monotonic()
                if now - self._last_gone < 1.0:
                    self._stop.wait(backoff.next())
                self._last_gone = now
                continue
            except Forbidden as e:
                if self._stop.is_set():
                    break
                self._state.failed(self.resource, "forbidden")
                if str(e) not in self._forbidden_logged:
                    self._forbidden_logged.add(str(e))
                    log.error("%s", e)
            except Exception as e:
                if self._stop.is_set():
                    break
                if self._watch_was_healthy():
                    backoff.reset()  # a long-lived stream that broke: retry soon, it is not a flapping server
                desc = describe_error(e)
                blocked = blocked_by_conntrack(e)
                if blocked:
                    desc = "conntrack table full"
                if self._state.failed(self.resource, desc, blocked):
                    log.warning("Kubernetes API request failed, retrying with backoff; keeping the last known "
                                "state", extra={"kv": {"resource": self.resource, "verb": verb, "error": desc}})
                else:
                    log.debug("Kubernetes API request failed again", extra={"kv": {"resource": self.resource,
                                                                                   "error": desc}})
            self._stop.wait(backoff.next())

    def _watch_was_healthy(self) -> bool:
        opened, self._watch_opened = self._watch_opened, None
        return opened is not None and (self._watch_events > 0 or time.monotonic() - opened > 10.0)

    # -- requests --
    def _call(self, verb: str, **kwargs: Any) -> Any:
        try:
            return self._list_fn(_preload_content=False, **kwargs)
        except Exception as e:
            if getattr(e, "status", None) == 403:
                raise Forbidden(forbidden_message(self.resource, verb, self._ns)) from None
            if getattr(e, "status", None) == 410:
                raise Gone() from None
            raise

    def _list(self) -> str:
        items: list[Obj] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self._t.page_size,
                                      "_request_timeout": (self._t.connect, self._t.list_read)}
            if token:
                kwargs["_continue"] = token
            resp = self._call("list", **kwargs)
            with self._lock:
                self._resp = resp
            try:
                if self._stop.is_set():  # stop() came before we published resp: it could not interrupt us
                    raise InterruptedError("stopping")
                body = json.loads(resp.data)
            finally:
                with self._lock:
                    self._resp = None
                # One connection per request keeps a half-read response from ever being reused.
                resp.close()
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                break
        self.h.replace(items)
        self._state.ok(self.resource, self.h.count())
        rv = str(meta.get("resourceVersion") or "")
        log.debug("listed", extra={"kv": {"resource": self.resource, "items": len(items), "resource_version": rv}})
        return rv

    def _watch(self) -> int:
        """Follow one watch stream from `self._rv` (advanced as events arrive, so that a stream cut
        mid-way resumes after the last event seen); return the number of events when the server ends it."""
        rv = self._rv
        # Spread renewals so that a fleet of DaemonSet pods does not re-watch in lock step.
        seconds = int(self._t.watch_seconds * random.uniform(0.9, 1.1))
        resp = self._call("watch", watch=True, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=seconds,
                          _request_timeout=(self._t.connect, seconds + self._t.watch_slack))
        with self._lock:
            self._resp = resp
        self._state.ok(self.resource)
        self._watch_opened, self._watch_events = time.monotonic(), 0
        events = 0
        try:
            if self._stop.is_set():  # stop() came before we published resp: it could not interrupt us
                return 0
            for line in iter_lines(resp):
                if self._stop.is_set():
                    break
                ev = json.loads(line)
                kind = ev.get("type")
                obj = ev.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise WatchError(f"watch error event: {obj.get('code')} {obj.get('reason')} "
                                     f"{obj.get('message', '')}"[:300])
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                events += 1
                self._watch_events = events
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.h.apply(kind, obj)
                    log.debug("watch event", extra={"kv": {"resource": self.resource, "type": kind,
                                                           "name": (obj.get("metadata") or {}).get("name", "")}})
                if new_rv:
                    self._rv = str(new_rv)
                self._state.event(self.resource, self.h.count())
        finally:
            with self._lock:
                self._resp = None
            resp.close()
        return events


def forbidden_message(resource: str, verb: str, namespace: str) -> str:
    group, res, verbs = RBAC_RULES[resource]
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    kind = "Role" if namespace else "ClusterRole"
    return (f"Kubernetes API denied {verb} on {res}{'.' + group if group else ''} {where} (403): the exporter's "
            f"ServiceAccount needs a {kind} rule apiGroups=[\"{group}\"] resources=[\"{res}\"] verbs=[{verbs}]"
            + (f" in namespace {namespace}" if namespace else ""))


def iter_lines(resp: Any) -> Iterator[bytes]:
    """Newline-delimited JSON watch events, as chunks arrive (a line may span several chunks)."""
    buf = b""
    for chunk in resp.stream(None, decode_content=True) if resp.chunked else _read1(resp):
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].strip(), buf[nl + 1:]
            if line:
                yield line
    if buf.strip():
        yield buf.strip()


def _read1(resp: Any) -> Iterator[bytes]:
    while True:
        data = resp.read1(65536)
        if not data:
            return
        yield data


def shutdown_response(resp: Any) -> None:
    """Wake a thread blocked reading `resp` (urllib3 >= 2.3 shutdown(); else shut the socket down)."""
    try:
        resp.shutdown()
        return
    except Exception:
        pass
    try:
        sock = resp._fp.fp.raw._sock  # http.client's socket; older urllib3 only
        sock.shutdown(2)
    except Exception:
        pass


def meta(obj: Obj) -> Obj:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}
