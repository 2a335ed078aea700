"""Why the image runs non-root with a permitted-only file capability, proven on this kernel.

Kubernetes puts `securityContext.capabilities.add: [NET_ADMIN]` into the container's bounding set, and runc
(what containerd and CRI-O run) also into the permitted and effective sets, keeping them across the switch to
the non-root uid; but it sets no ambient capabilities, so the exec of the entrypoint recomputes the sets from
the executable's file capabilities: an ordinary binary ends up with NET_ADMIN only in its bounding set. The
image's interpreter carries `cap_net_admin+p`: at exec NET_ADMIN is permitted (masked by the bounding set, and
under no_new_privs by the permitted set the runtime kept), and exporter/core/caps.py makes it effective, and
ambient for the `nft` child. Without the effective bit the exec also succeeds when the bounding set lacks
NET_ADMIN (`+ep` fails it: `operation not permitted`), so a pod whose NET_ADMIN a policy removed still serves.

Each case starts the real exporter as uid 65534 in a fresh network namespace with `setpriv`, which, like runc,
keeps the permitted set across the uid switch and execs the interpreter directly (an intermediate exec, e.g.
of `env`, would empty the permitted set first: one case shows it), with the bounding set reduced to what the
DaemonSet gives, and reads `conntrack_dns_exporter_collector_success{collector="conntrack"}` (netlink
conntrack statistics need CAP_NET_ADMIN). tests/integration/test_image.py runs the built image with runc
itself. Needs root, setpriv, setcap, nft and an interpreter that uid 65534 can read.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.exporter_proc import parse, value
from tests.support.netns import Netns, skip_reason

ROOT = Path(__file__).resolve().parents[2]
UID = "65534"
PORT = 19981
NO_FEATURES = ["--no-collector.dns", "--kubernetes.enabled=false", "--no-collector.table"]


def _world_readable(path: Path) -> bool:
    p = path.resolve()
    for d in [p, *p.parents]:
        mode = d.stat().st_mode
        if d.is_dir() and not mode & stat.S_IXOTH:
            return False
    return bool(p.stat().st_mode & stat.S_IROTH)


def _interpreter() -> Path | None:
    """A python of the test venv's minor version that uid 65534 can run (pyenv under /root is not)."""
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (Path(getattr(sys, "_base_executable", sys.executable)).resolve(), Path(f"/usr/bin/{minor}")):
        stdlib = cand.parent.parent / "lib" / minor / "os.py"
        if cand.exists() and stdlib.exists() and _world_readable(cand) and _world_readable(stdlib):
            return cand
    return None


def _skip() -> str | None:
    reason = skip_reason()
    if reason:
        return reason
    for tool in ("setpriv", "setcap", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / libcap2-bin / nftables; make deps installs them)"
    if _interpreter() is None:
        return "no Python interpreter readable by uid 65534 (the venv's base lives in a private directory)"
    if not _world_readable(ROOT / "exporter" / "__init__.py"):
        return "the checkout is not readable by uid 65534"
    return None


pytestmark = pytest.mark.skipif(_skip() is not None, reason=_skip() or "")


@pytest.fixture(scope="module")
def image_like() -> Iterator[Path]:
    """A directory laid out like the image: a `venv --copies` interpreter without a file capability, with the
    image's `cap_net_admin+p` and with the former `+ep`, and a plain `nft` (the image's has no file capability).
    Dependencies come from the test venv through a .pth file."""
    d = Path(tempfile.mkdtemp(prefix="cdet-caps-", dir="/tmp"))
    try:
        d.chmod(0o755)
        interp = _interpreter()
        assert interp
        subprocess.run([str(interp), "-m", "venv", "--copies", "--without-pip", str(d / "venv")], check=True,
                       capture_output=True, timeout=120)
        site = next((d / "venv" / "lib").glob("python3.*")) / "site-packages"
        deps = next((ROOT / ".venv" / "lib").glob("python3.*")) / "site-packages"
        (site / "project.pth").write_text(f"{ROOT}\n{deps}\n")
        py = d / "venv" / "bin" / "python"
        assert not py.is_symlink()
        for name, fcap in (("python-p", "cap_net_admin+p"), ("python-ep", "cap_net_admin+ep")):
            shutil.copy2(py, d / "venv" / "bin" / name)
            subprocess.run(["setcap", fcap, str(d / "venv" / "bin" / name)], check=True)
        (d / "nft").mkdir()
        (d / "nft").chmod(0o755)
        shutil.copy2(str(shutil.which("nft")), d / "nft" / "nft")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as_nobody(ns: Netns, python: Path, nft_dir: Path, *, bounding: str, no_new_privs: bool, extra: list[str],
                  through_env: bool = False) -> tuple[subprocess.Popen[str], Path]:
    """The exporter as uid 65534 with the given bounding set: setpriv keeps the permitted set across the uid
    switch and execs the interpreter itself, as runc does; `through_env` puts an `env` exec in between."""
    log = Path(tempfile.mkstemp(prefix="cdet-caps-log-")[1])
    environ = {"PATH": f"{nft_dir}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
               "CONNTRACK_DNS_EXPORTER_COLLECTOR_DNS": "false"}
    argv = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all",
            f"--bounding-set=-all{bounding}", *(["--no-new-privs"] if no_new_privs else []),
            *(["env"] if through_env else []),
            str(python), "-m", "exporter", f"--web.listen-address=127.0.0.1:{PORT}", *NO_FEATURES, *extra]
    with log.open("w") as f:
        proc = subprocess.Popen(ns.cmd(argv), stdout=subprocess.DEVNULL, stderr=f, text=True, cwd="/", env=environ)
    return proc, log


def scrape(ns: Netns, proc: subprocess.Popen[str], timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=5)
            sock = ns.socket()
            sock.settimeout(5)
            sock.connect(("127.0.0.1", PORT))
            conn.sock = sock
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            conn.close()
            return body
        except OSError:
            time.sleep(0.2)
    raise AssertionError("exporter never answered")


def stop(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


NET_ADMIN = ",+net_admin"  # the DaemonSet: drop ALL, add NET_ADMIN
NONE = ""                  # the same with NET_ADMIN removed by a policy


@pytest.mark.parametrize(("interpreter", "bounding", "no_new_privs", "through_env", "works"), [
    ("python", NET_ADMIN, True, False, False),   # capabilities.add alone, non-root: only in the bounding set
    ("python-p", NET_ADMIN, True, False, True),  # the image as deployed (allowPrivilegeEscalation: false)
    ("python-p", NET_ADMIN, False, False, True),  # the same with allowPrivilegeEscalation: true
    ("python-p", NONE, True, False, False),      # NET_ADMIN removed by policy: starts, serves, says 0
    ("python-p", NET_ADMIN, True, True, False),  # an exec in between (env) empties the permitted set first
], ids=["bounding-set-only", "file-capability-no-new-privs", "file-capability-escalation-allowed",
        "no-net-admin-in-bounding-set", "through-env-under-no-new-privs"])
def test_net_admin_is_effective_for_a_non_root_user_through_the_permitted_file_capability(
        netns: Netns, image_like: Path, interpreter: str, bounding: str, no_new_privs: bool, through_env: bool,
        works: bool) -> None:
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / interpreter, image_like / "nft",
                              bounding=bounding, no_new_privs=no_new_privs, through_env=through_env, extra=[])
    try:
        samples = parse(scrape(netns, proc))
    finally:
        stop(proc)
        text = log.read_text()
        log.unlink()
    assert value(samples, "conntrack_dns_exporter_collector_success", collector="conntrack") == (1.0 if works else 0.0)
    assert (value(samples, "conntrack_entries") is not None) == works
    if not works:
        assert "NET_ADMIN" in text, text


def test_effective_bit_makes_the_exec_fail_without_net_admin(netns: Netns, image_like: Path) -> None:
    """Why `+p` and not `+ep`: with the effective bit the kernel refuses the exec outright when the bounding
    set lacks the capability, so not even `--version` runs (the image before issue 13)."""
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / "python-ep", image_like / "nft",
                              bounding=NONE, no_new_privs=True, extra=["--version"])
    try:
        assert proc.wait(timeout=15) != 0
        assert "not permitted" in log.read_text().lower()
    finally:
        stop(proc)
        log.unlink()
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / "python-p", image_like / "nft",
                              bounding=NONE, no_new_privs=True, extra=["--version"])
    try:
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        stop(proc)
        log.unlink()


def test_notrack_with_a_plain_nft_through_the_ambient_set(netns: Netns, image_like: Path) -> None:
    """The exporter passes NET_ADMIN to its `nft` child through the ambient set (nft has no file capability
    in the image), also under no_new_privs; the table is gone after SIGTERM."""
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / "python-p", image_like / "nft",
                              bounding=NET_ADMIN, no_new_privs=True, extra=["--web.notrack"])
    try:
        samples = parse(scrape(netns, proc))
        assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 1.0, log.read_text()
        listed = netns.exec(["nft", "list", "table", "inet", "conntrack_dns_exporter_notrack"], check=False)
        assert listed.returncode == 0 and "notrack" in listed.stdout
        stop(proc)
        assert proc.returncode == 0
        gone = netns.exec(["nft", "list", "table", "inet", "conntrack_dns_exporter_notrack"], check=False)
        assert gone.returncode != 0, "the NOTRACK table outlived the exporter"
    finally:
        stop(proc)
        log.unlink()


def test_notrack_without_net_admin_serves_without_the_table(netns: Netns, image_like: Path) -> None:
    """NET_ADMIN removed by policy and `--web.notrack` as in the DaemonSet: the exporter serves (the rule gauge
    0) instead of crash-looping, and says why in one line."""
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / "python-p", image_like / "nft",
                              bounding=NONE, no_new_privs=True, extra=["--web.notrack"])
    try:
        samples = parse(scrape(netns, proc))
        stop(proc)
        text = log.read_text()
    finally:
        stop(proc)
        log.unlink()
    assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 0.0
    assert value(samples, "conntrack_dns_exporter_collector_success", collector="conntrack") == 0.0
    lines = [ln for ln in text.splitlines() if "--web.notrack" in ln]
    assert len(lines) == 1 and "bounding set" in lines[0], text
    assert proc.returncode == 0, text
