"""`--web.config.file`: TLS and basic auth in the Prometheus exporter-toolkit web configuration format.

The same YAML file node_exporter, blackbox_exporter and friends accept, so one file and one habit serve
every exporter on the node:

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to this file's directory
      key_file: server.key
      client_ca_file: ca.crt         # optional
      client_auth_type: RequireAndVerifyClientCert   # optional, default NoClientCert
      min_version: TLS12             # optional (TLS10..TLS13)
      max_version: TLS13             # optional
    http_server_config:
      headers: {X-Frame-Options: deny}   # optional extra response headers
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

Everything is validated at load (unknown keys, unreadable files, bad certificates, non-bcrypt hashes), so
a bad file stops the exporter at start with one line instead of failing scrapes later. Keys the Go toolkit
accepts but this exporter cannot honour (`cipher_suites`, `curve_preferences`, `prefer_server_cipher_suites`:
Python's TLS stack chooses; `http_server_config.http2`: it serves HTTP/1.1; `rate_limit`) are logged with
a warning and ignored, so one file serves every exporter on the node. Keys whose silent absence would weaken
security (inline `cert`/`key`, `client_allowed_sans`) still stop the start.

Like the toolkit, which re-reads the file per request, the file is checked on every request (one stat) and
re-read when it changed: new users, headers and TLS settings apply to the next request or connection. A
changed file that does not load keeps the previous configuration, logs one line and sets
`conntrack_dns_exporter_web_config_last_reload_successful` to 0. Certificates are also re-read when their
own files change (cert-manager rotation) without a restart.

Basic auth: a bcrypt check costs tens of milliseconds on purpose. Like the Go toolkit, a verified
(user, password) pair is remembered (as a keyed digest, never the password) so a scrape every few seconds
does not burn a core; an unknown user is checked against a dummy hash so the response time does not tell
which user names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from exporter.core import files, logs
from exporter.web import certinfo

log = logs.get("web")

CLIENT_AUTH_TYPES = {
    # exporter-toolkit name -> (ssl verify mode, require a CA file)
    "NoClientCert": (ssl.CERT_NONE, False),
    "RequestClientCert": (ssl.CERT_OPTIONAL, True),
    "RequireAnyClientCert": (ssl.CERT_REQUIRED, True),
    "VerifyClientCertIfGiven": (ssl.CERT_OPTIONAL, True),
    "RequireAndVerifyClientCert": (ssl.CERT_REQUIRED, True),
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version",
             "cert", "key", "client_allowed_sans"}
# Accepted by the Go toolkit, not honoured here: warned about and ignored (where -> key -> why).
_IGNORED = {
    "": {"rate_limit": "this exporter bounds load with --web.max-connections instead"},
    "tls_server_config": dict.fromkeys(("cipher_suites", "curve_preferences", "prefer_server_cipher_suites"),
                                       "Python's TLS stack chooses ciphers and curves"),
    "http_server_config": {"http2": "this exporter serves HTTP/1.1"},
}
_AUTH_CACHE_MAX = 1024
_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
MAX_SIZE = files.MIB  # a web config is a few hundred bytes; a bigger "file" is a mistake (or /dev/zero)


class WebConfigError(Exception):
    """The web config file is unusable; the message is one line naming the file and the problem."""


@dataclass
class TLSSettings:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None


@dataclass
class WebConfig:
    path: Path
    tls: TLSSettings | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    _ctx: ssl.SSLContext | None = field(default=None, repr=False)
    _stamp: tuple[float, ...] = field(default=(), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _auth_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _auth_ok: dict[bytes, None] = field(default_factory=dict, repr=False)
    _dummy: bytes = field(default=b"", repr=False)
    cert_period: tuple[float, float] | None = field(default=None, repr=False)  # (notBefore, notAfter)
    _cert_warned: bool = field(default=False, repr=False)
    _file_stamp: tuple[int, ...] | None = field(default=None, repr=False)
    _successor: WebConfig | None = field(default=None, repr=False)
    _reload_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    reload_ok: bool = True

    # --- reload ------------------------------------------------------------------------------------------
    def reloaded(self, force: bool = False) -> WebConfig:
        """The configuration to use now: this one, or the file's new content if it changed and loads.

        `force` (SIGHUP) re-reads the file even if it looks unchanged. A broken new file keeps this
        configuration (one warning per change, `reload_ok` false)."""
        if self._successor is not None:
            return self._successor.reloaded(force)
        stamp = _file_stamp(self.path)
        if stamp == self._file_stamp and not force:
            return self
        with self._reload_lock:
            if self._successor is not None:
                return self._successor.reloaded(force)
            if stamp == self._file_stamp and not force:
                return self
            try:
                new = load(self.path)
            except WebConfigError as e:
                log.warning("keeping the previous web config: %s", e)
                self._file_stamp, self.reload_ok = stamp, False
                return self
            log.info("web config %s %s", self.path, "reloaded (SIGHUP)" if force else "changed; reloaded")
            self._successor = new
            return new

    # --- TLS -------------------------------------------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context, rebuilt when a certificate/key/CA file changed on disk.

        If a changed file is broken (rotation half-way), the previous context is kept and a warning
        logged, so a rotation never takes the exporter down.
        """
        if self.tls is None:
            return None
        stamp = _stamp(self.tls)
        with self._lock:
            if self._ctx is not None and stamp == self._stamp:
                self._check_validity()
                return self._ctx
            try:
                ctx = build_ssl_context(self.tls)
            except WebConfigError as e:
                if self._ctx is None:
                    raise
                log.warning("keeping the previous TLS certificate: %s", e)
                self._stamp = stamp
                return self._ctx
            if self._ctx is not None:
                log.info("TLS certificate files changed; reloaded")
            self._ctx, self._stamp = ctx, stamp
            try:
                self.cert_period = certinfo.read_validity(self.tls.cert_file)
            except certinfo.CertInfoError as e:
                self.cert_period = None
                log.warning("cannot read the validity of %s: %s", self.tls.cert_file, e)
            self._cert_warned = False
            self._check_validity()
            return ctx

    def _check_validity(self) -> None:
        """Log once per certificate when it is expired or not valid yet (Python's TLS serves it anyway)."""
        if self.cert_period is None or self._cert_warned or self.tls is None:
            return
        why = certinfo.problem(*self.cert_period)
        if why:
            self._cert_warned = True
            log.warning("serving TLS certificate %s is %s; clients that verify it will fail",
                        self.tls.cert_file, why)

    # --- basic auth ------------------------------------------------------------------------------------
    @property
    def auth_required(self) -> bool:
        return bool(self.users)

    def check_password(self, user: str, password: str) -> bool:
        """Timing-safe: an unknown user costs one bcrypt check too; verified pairs are cached."""
        hashed = self.users.get(user)
        key = hmac.new(self._auth_key, b"%s\0%s\0%s" % (user.encode(), password.encode(), hashed or b""),
                       hashlib.sha256).digest()
        if hashed is not None and key in self._auth_ok:
            return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._dummy)
        except ValueError:
            ok = False
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                if len(self._auth_ok) >= _AUTH_CACHE_MAX:
                    self._auth_ok.pop(next(iter(self._auth_ok)))
                self._auth_ok[key] = None
        return ok


def _stamp(tls: TLSSettings) -> tuple[float, ...]:
    out = []
    for p in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if p is None:
            continue
        try:
            st = p.stat()
            out += [st.st_mtime, float(st.st_size), float(st.st_ino)]
        except (OSError, ValueError):
            out.append(-1.0)
    return tuple(out)


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.min_version
    if tls.max_version is not None:
        ctx.maximum_version = tls.max_version
    for what, f in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("client_ca_file", tls.client_ca_file)):
        why = files.not_regular(f) if f is not None else None
        if why:  # a FIFO would block the TLS library's open() forever
            raise WebConfigError(f"{what} {f} {why}")
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (OSError, ssl.SSLError, ValueError) as e:
        raise WebConfigError(f"cannot load cert_file {tls.cert_file} / key_file {tls.key_file}: {_why(e)}") from None
    mode, _ = CLIENT_AUTH_TYPES[tls.client_auth_type]
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError, ValueError) as e:
            raise WebConfigError(f"cannot load client_ca_file {tls.client_ca_file}: {_why(e)}") from None
    if tls.client_auth_type in ("RequestClientCert", "RequireAnyClientCert") and tls.client_ca_file is None:
        # Python cannot accept an unverified client certificate; without a CA we cannot honour this.
        raise WebConfigError(f"client_auth_type {tls.client_auth_type} needs client_ca_file here")
    ctx.verify_mode = mode
    return ctx


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load(path: str | os.PathLike[str]) -> WebConfig:
    """Read and validate the file; raise WebConfigError with one line on any problem."""
    p = Path(path)
    stamp = _file_stamp(p)  # before reading: a change during the read is seen by the next check
    try:
        raw, _ = files.read_regular(p, MAX_SIZE)
    except OSError as e:
        raise WebConfigError(f"web config {p}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WebConfigError(f"web config {p}: not UTF-8 text (byte {e.start}); want YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise WebConfigError(f"web config {p}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise WebConfigError(f"web config {p}: invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a timestamp like 2024-02-30
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WebConfigError(f"web config {p}: invalid YAML value: {why}") from None
    try:
        cfg = _parse(p, data if data is not None else {})
    except WebConfigError as e:
        raise WebConfigError(f"web config {p}: {e}") from None
    cfg._file_stamp = stamp
    return cfg


def _file_stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{what} must be a mapping")
    return value


def _parse(path: Path, data: Any) -> WebConfig:
    top = _mapping(data, "the file")
    _warn_ignored(path, top, "")
    unknown = set(top) - {"tls_server_config", "http_server_config", "basic_auth_users", *_IGNORED[""]}
    if unknown:
        raise WebConfigError(f"unknown key {sorted(unknown)[0]!r} (want tls_server_config, http_server_config, "
                             "basic_auth_users)")
    cfg = WebConfig(path=path)
    base = path.parent

    tls = _mapping(top.get("tls_server_config"), "tls_server_config")
    if tls:
        _check_keys(tls, _TLS_KEYS, "tls_server_config", path)
        if "cert" in tls or "key" in tls or "client_allowed_sans" in tls:
            raise WebConfigError("tls_server_config: inline cert/key and client_allowed_sans are not supported; "
                                 "use cert_file/key_file")
        cert, key = tls.get("cert_file"), tls.get("key_file")
        if not cert or not key:
            raise WebConfigError("tls_server_config needs both cert_file and key_file")
        auth = str(tls.get("client_auth_type") or "NoClientCert")
        if auth not in CLIENT_AUTH_TYPES:
            raise WebConfigError(f"invalid client_auth_type {auth!r} (choose from {', '.join(CLIENT_AUTH_TYPES)})")
        ca = tls.get("client_ca_file")
        if ca is None and auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
            raise WebConfigError(f"client_auth_type {auth} needs client_ca_file")
        if ca is not None and auth == "NoClientCert":
            auth = "RequireAndVerifyClientCert"  # the Go toolkit's rule: a CA alone means verify clients
        settings = TLSSettings(cert_file=base / str(cert), key_file=base / str(key),
                               client_ca_file=base / str(ca) if ca else None, client_auth_type=auth,
                               min_version=_version(tls.get("min_version"), ssl.TLSVersion.TLSv1_2))
        if tls.get("max_version") is not None:
            settings.max_version = _version(tls.get("max_version"), ssl.TLSVersion.TLSv1_3)
            if settings.max_version < settings.min_version:
                raise WebConfigError("tls_server_config: max_version is below min_version")
        cfg.tls = settings
        cfg.ssl_context()  # load the certificate now: a broken one fails the start, not the first scrape

    http = _mapping(top.get("http_server_config"), "http_server_config")
    if http:
        _check_keys(http, {"headers"}, "http_server_config", path)
        headers = _mapping(http.get("headers"), "http_server_config.headers")
        for k, v in headers.items():
            if (not isinstance(k, str) or not isinstance(v, str | int) or "\n" in f"{k}{v}" or "\r" in f"{k}{v}"
                    or not f"{k}{v}".isascii()):
                raise WebConfigError(f"http_server_config.headers: invalid header {k!r}")
            cfg.headers[k] = str(v)

    users = _mapping(top.get("basic_auth_users"), "basic_auth_users")
    for user, hashed in users.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise WebConfigError(f"basic_auth_users: invalid user name {user!r}")
        if not isinstance(hashed, str) or not _is_bcrypt(hashed):
            raise WebConfigError(f"basic_auth_users: the password of {user!r} is not a bcrypt hash "
                                 "(want $2a$/$2b$/$2y$..., e.g. from `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)")
        cfg.users[user] = hashed.encode()
    if cfg.users:
        # Checked instead of a real hash for unknown users: same cost as the real ones, same time.
        cfg._dummy = _dummy_hash(min(14, max(int(h[4:6]) for h in cfg.users.values())))
    if cfg.users and cfg.tls is None:
        log.warning("basic auth without TLS: passwords cross the network in clear text")
    return cfg


_DUMMIES: dict[int, bytes] = {}


def _dummy_hash(cost: int) -> bytes:
    if cost not in _DUMMIES:
        _DUMMIES[cost] = bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(cost))
    return _DUMMIES[cost]


def _warn_ignored(path: Path, d: dict[str, Any], where: str) -> None:
    for k, why in _IGNORED[where].items():
        if k in d:
            log.warning("web config %s: %s is ignored (%s)", path, f"{where}.{k}" if where else k, why)


def _check_keys(d: dict[str, Any], allowed: set[str], where: str, path: Path) -> None:
    _warn_ignored(path, d, where)
    for k in d:
        if k not in allowed and k not in _IGNORED[where]:
            raise WebConfigError(f"{where}: unknown key {k!r}")


def _version(value: Any, default: ssl.TLSVersion) -> ssl.TLSVersion:
    if value is None:
        return default
    if str(value) not in TLS_VERSIONS:
        raise WebConfigError(f"invalid TLS version {value!r} (choose from {', '.join(TLS_VERSIONS)})")
    return TLS_VERSIONS[str(value)]


def _is_bcrypt(h: str) -> bool:
    m = _BCRYPT_RE.fullmatch(h)
    return m is not None and 4 <= int(m.group(1)) <= 31
