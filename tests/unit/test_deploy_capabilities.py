"""Why the image runs non-root with file capabilities, proven on this kernel.

Kubernetes puts `securityContext.capabilities.add: [NET_ADMIN]` into the container's bounding set, but for a
non-root UID the runtimes (containerd, CRI-O) set no ambient capabilities, so the kernel clears the permitted
and effective sets at exec: the process has NET_ADMIN in its bounding set and cannot use it. The image fixes
that with a file capability (`setcap cap_net_admin+ep`) on the venv's own interpreter and on `nft`, and the
DaemonSet must allow privilege escalation, because no_new_privs (allowPrivilegeEscalation: false) makes the
kernel ignore file capabilities.

Each case starts the real exporter as uid 65534 in a fresh network namespace with `setpriv`, with the bounding
set reduced to NET_ADMIN (what the DaemonSet's drop ALL / add NET_ADMIN gives), and reads its
`conntrack_dns_exporter_collector_success{collector="conntrack"}` (netlink conntrack statistics need
CAP_NET_ADMIN). Needs root, setpriv, setcap and an interpreter that uid 65534 can read.
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
    """A directory laid out like the image: a `venv --copies` interpreter with and without the file capability,
    and `nft` with and without it. Dependencies come from the test venv through a .pth file."""
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
        shutil.copy2(py, d / "venv" / "bin" / "python-capable")
        subprocess.run(["setcap", "cap_net_admin+ep", str(d / "venv" / "bin" / "python-capable")], check=True)
        for sub in ("nft-plain", "nft-capable"):
            (d / sub).mkdir()
            (d / sub).chmod(0o755)
            shutil.copy2(str(shutil.which("nft")), d / sub / "nft")
        subprocess.run(["setcap", "cap_net_admin+ep", str(d / "nft-capable" / "nft")], check=True)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as_nobody(ns: Netns, python: Path, nft_dir: Path, *, no_new_privs: bool, extra: list[str]
                  ) -> tuple[subprocess.Popen[str], Path]:
    log = Path(tempfile.mkstemp(prefix="cdet-caps-log-")[1])
    argv = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all,+net_admin", *(["--no-new-privs"] if no_new_privs else []),
            "env", f"PATH={nft_dir}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE=1",
            str(python), "-m", "exporter", f"--web.listen-address=127.0.0.1:{PORT}", *NO_FEATURES, *extra]
    with log.open("w") as f:
        proc = subprocess.Popen(ns.cmd(argv), stdout=subprocess.DEVNULL, stderr=f, text=True, cwd="/")
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


@pytest.mark.parametrize(("interpreter", "no_new_privs", "works"), [
    ("python", False, False),          # capabilities.add alone, non-root: NET_ADMIN only in the bounding set
    ("python-capable", False, True),   # the image: file capability on the interpreter
    ("python-capable", True, False),   # the same with allowPrivilegeEscalation: false (no_new_privs)
], ids=["bounding-set-only", "file-capability", "file-capability-under-no-new-privs"])
def test_net_admin_is_effective_for_a_non_root_user_only_through_file_capabilities(
        netns: Netns, image_like: Path, interpreter: str, no_new_privs: bool, works: bool) -> None:
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / interpreter, image_like / "nft-plain",
                              no_new_privs=no_new_privs, extra=[])
    try:
        samples = parse(scrape(netns, proc))
    finally:
        stop(proc)
        text = log.read_text()
        log.unlink()
    assert value(samples, "conntrack_dns_exporter_collector_success", collector="conntrack") == (1.0 if works else 0.0)
    assert (value(samples, "conntrack_entries") is not None) == works
    if not works:
        assert "NET_ADMIN" in text or "not permitted" in text.lower(), text


@pytest.mark.parametrize("nft_dir", ["nft-capable", "nft-plain"])
def test_notrack_needs_the_capability_on_nft_too(netns: Netns, image_like: Path, nft_dir: str) -> None:
    """Capabilities of the (file-capable) interpreter do not pass to the `nft` child it runs: the child needs
    its own file capability, as the Dockerfile gives it."""
    proc, log = run_as_nobody(netns, image_like / "venv" / "bin" / "python-capable", image_like / nft_dir,
                              no_new_privs=False, extra=["--web.notrack"])
    try:
        if nft_dir == "nft-capable":
            samples = parse(scrape(netns, proc))
            assert value(samples, "conntrack_dns_exporter_web_notrack_rule_present") == 1.0
            listed = netns.exec(["nft", "list", "table", "inet", "conntrack_dns_exporter_notrack"], check=False)
            assert listed.returncode == 0 and "notrack" in listed.stdout
            stop(proc)
            assert proc.returncode == 0
            gone = netns.exec(["nft", "list", "table", "inet", "conntrack_dns_exporter_notrack"], check=False)
            assert gone.returncode != 0, "the NOTRACK table outlived the exporter"
        else:
            assert proc.wait(timeout=15) == 2
            assert "not permitted" in log.read_text().lower()
    finally:
        stop(proc)
        log.unlink()
