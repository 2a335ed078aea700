"""The real C libraries to compare the resolver models with: `lookup.c` built against glibc (gcc) and
musl (`musl-gcc -static`, Debian's musl-tools) into a per-user cache directory, once per source change.

`build()` returns {"glibc": path, "musl": path} for the compilers present; `missing()` names what is
not there (tests skip with that reason elsewhere; CI installs musl-tools via scripts/bootstrap.sh).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("lookup.c")
COMPILERS = {"glibc": ["gcc", "-O2"], "musl": ["musl-gcc", "-O2", "-static"]}


def missing() -> list[str]:
    return [argv[0] for argv in COMPILERS.values() if shutil.which(argv[0]) is None]


def build() -> dict[str, str]:
    digest = hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:12]
    out_dir = Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / f"cde-clookup-{os.getuid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for lib, argv in COMPILERS.items():
        if shutil.which(argv[0]) is None:
            continue
        exe = out_dir / f"lookup-{lib}-{digest}"
        if not exe.exists():
            tmp = exe.with_suffix(".tmp")
            subprocess.run([*argv, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True, text=True)
            tmp.rename(exe)
        built[lib] = str(exe)
    return built


@dataclass
class Result:
    result: str     # ok, partial, failed
    seconds: float
    rc: int         # getaddrinfo's return code (EAI_AGAIN = -3 on both libraries)
    families: str   # "46", "4", "6" or ""


def parse(line: str) -> Result:
    f = line.split()
    return Result(f[0], float(f[1]), int(f[2]), f[3] if len(f) > 3 else "")
