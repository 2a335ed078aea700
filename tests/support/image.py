"""The real image: built with Debian's podman/buildah from a local bookworm base, run with runc the way
containerd runs a Kubernetes container.

Everything lives under one state directory (`CDET_IMAGE_STATE`, default /var/tmp/cdet-image) with its own
containers.conf and storage.conf, passed to podman through CONTAINERS_CONF / CONTAINERS_STORAGE_CONF:
- no registry is reachable: the base is `mmdebstrap --variant=minbase bookworm` with Debian's python3,
  python3-venv and python3-pip (standing in for `python:3.11-slim-bookworm`), `podman import`ed once and kept;
- podman must never create its default bridge network (it rewrites the machine's nat table and ip_forward):
  containers default to no network, the CNI backend has an empty plugin directory (a bridge cannot be set
  up at all), the build uses `--network host` and runs use a namespace the test created;
- runtime runc with cgroupfs (crun refuses this machine's hybrid cgroup layout), LAB-NOTES' ulimits;
- the build bind-mounts the machine's CA bundle read-only, so pip trusts the registry's TLS path.

`runc_spec()` writes the OCI spec a CRI runtime would for the DaemonSet's container: the user and group,
bounding/effective/permitted set to exactly the added capabilities (no inheritable, no ambient: containerd
and CRI-O set neither), no_new_privs from allowPrivilegeEscalation, read-only root, the in-memory /tmp, the
RuntimeDefault seccomp profile (podman's default profile converted to OCI form) and a given network namespace.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("CDET_IMAGE_STATE", "/var/tmp/cdet-image"))
BASE = "localhost/cdet-base:bookworm"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3")
MIRROR = "deb http://deb.debian.org/debian bookworm main"
SECCOMP = Path("/usr/share/containers/seccomp.json")
_ids = itertools.count()

CONTAINERS_CONF = """\
[containers]
netns = "none"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["{state}/no-cni-plugins"]
network_config_dir = "{state}/networks"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{state}/storage"
runroot = "/run/{runname}"
"""


def skip_reason() -> str | None:
    if os.environ.get("CDET_IMAGE_TEST") != "1":
        return "builds and runs the real image (about a minute): set CDET_IMAGE_TEST=1 or run `make image-test`"
    if os.geteuid() != 0:
        return "needs root (podman, runc, network namespaces)"
    for tool in ("podman", "runc", "mmdebstrap", "ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool}: apt-get install podman buildah mmdebstrap uidmap runc nftables iproute2"
    if not Path(CA_BUNDLE).exists():
        return f"needs the machine's CA bundle at {CA_BUNDLE}"
    return None


def env() -> dict[str, str]:
    STATE.mkdir(parents=True, exist_ok=True)
    for d in ("no-cni-plugins", "networks"):
        (STATE / d).mkdir(exist_ok=True)
    (STATE / "containers.conf").write_text(CONTAINERS_CONF.format(state=STATE))
    (STATE / "storage.conf").write_text(STORAGE_CONF.format(state=STATE, runname=STATE.name))
    return {**os.environ, "CONTAINERS_CONF": str(STATE / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(STATE / "storage.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=env(), text=True, capture_output=True, timeout=timeout,
                          check=check)


def ensure_base() -> float:
    """Build and import the bookworm base unless it exists; returns the seconds it took (0 when cached)."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return 0.0
    start = time.monotonic()
    tar = STATE / "base.tar"
    subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                    '--aptopt=Acquire::Check-Valid-Until "false"',
                    # python:*-slim has no PEP 668 marker either: the Dockerfile's build stage pip-installs
                    '--customize-hook=rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
                    "bookworm", str(tar), MIRROR], check=True, capture_output=True, timeout=900)
    podman("import", "--change", "ENV=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           str(tar), BASE, timeout=300)
    tar.unlink()
    return time.monotonic() - start


def build(context: Path, tag: str) -> float:
    """`podman build` of the project's Dockerfile on the local base; returns the seconds it took."""
    start = time.monotonic()
    # The Dockerfile pins its base by digest: give it the local base's own digest, so nothing is pulled.
    digest = podman("image", "inspect", "--format", "{{.Digest}}", BASE).stdout.strip()
    # --no-cache: every run builds each step again (no layer from an older Dockerfile or package state).
    r = podman("build", "--no-cache", "--network", "host", "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
               "--build-arg", f"PYTHON_IMAGE={BASE}", "--build-arg", f"PYTHON_IMAGE_DIGEST={digest}",
               "--tag", tag, str(context), check=False, timeout=900)
    if r.returncode != 0:
        raise AssertionError(f"podman build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.monotonic() - start


def image_config(tag: str) -> dict[str, Any]:
    cfg = json.loads(podman("image", "inspect", tag).stdout)[0]["Config"]
    assert isinstance(cfg, dict)
    return cfg


@contextlib.contextmanager
def mounted(tag: str) -> Iterator[Path]:
    """The image's root filesystem (read-only use: the containers run with a read-only root)."""
    path = Path(podman("image", "mount", tag).stdout.strip())
    try:
        yield path
    finally:
        podman("image", "unmount", tag, check=False)


def _seccomp(caps: Sequence[str]) -> dict[str, Any]:
    """podman's default seccomp profile (Docker's format) as the OCI spec's linux.seccomp, for x86_64."""
    prof = json.loads(SECCOMP.read_text())
    arches = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    rules = []
    for s in prof["syscalls"]:
        inc, exc = s.get("includes") or {}, s.get("excludes") or {}
        if inc.get("caps") and not set(inc["caps"]) <= set(caps):
            continue
        if inc.get("arches") and not {"amd64", "x86_64"} & set(inc["arches"]):
            continue
        if exc.get("caps") and set(exc["caps"]) & set(caps):
            continue
        if exc.get("arches") and {"amd64", "x86_64"} & set(exc["arches"]):
            continue
        rule = {"names": s["names"], "action": s["action"], "args": s.get("args") or []}
        if "errnoRet" in s:
            rule["errnoRet"] = s["errnoRet"]
        rules.append(rule)
    out = {"defaultAction": prof["defaultAction"], "architectures": arches, "syscalls": rules}
    if "defaultErrnoRet" in prof:
        out["defaultErrnoRet"] = prof["defaultErrnoRet"]
    return out


def runc_spec(rootfs: Path, *, args: Sequence[str], env: Sequence[str], uid: int, gid: int, caps: Sequence[str],
              no_new_privs: bool, read_only_root: bool, netns: str, tmp_size: str = "16m") -> dict[str, Any]:
    caps = [f"CAP_{c}" for c in caps]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(args),
            "env": list(env),
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000}],
            "noNewPrivileges": no_new_privs,
        },
        "root": {"path": str(rootfs), "readonly": read_only_root},
        "hostname": "cdet-image",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", f"size={tmp_size}"]},
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": f"/run/netns/{netns}"}],
            "seccomp": _seccomp(caps),
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


class RuncContainer:
    """`runc run` of one spec in the foreground (stdout/stderr to files); `stop()` sends SIGTERM like the
    kubelet and returns the exit code."""

    def __init__(self, spec: dict[str, Any], workdir: Path) -> None:
        self.id = f"cdet-image-{os.getpid()}-{next(_ids)}"
        self.bundle = workdir / self.id
        self.bundle.mkdir(parents=True)
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self.log = self.bundle / "stderr"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(["runc", "run", "--bundle", str(self.bundle), self.id],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def pid(self) -> int | None:
        r = subprocess.run(["runc", "state", self.id], capture_output=True, text=True, check=False, timeout=10)
        return int(json.loads(r.stdout)["pid"]) if r.returncode == 0 else None

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            subprocess.run(["runc", "kill", self.id, "TERM"], capture_output=True, check=False, timeout=10)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True, check=False, timeout=10)
                self.proc.wait(10)
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True, check=False, timeout=10)
        return self.proc.returncode

    def __enter__(self) -> RuncContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
