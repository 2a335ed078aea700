"""Loading one of the native pieces (a shared library built from a C file next to it, docs/architecture.md)
through ctypes, with its ABI check: the library and "", or None and why it is not usable (the caller
falls back to Python and logs that once)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def load(path: Path, source: str, abi: str, want: int,
         functions: Mapping[str, tuple[Any, Sequence[Any]]]) -> tuple[ctypes.CDLL | None, str]:
    """`path` built from `source`: its function `abi()` must return `want`; each of `functions` gets its
    (restype, argtypes)."""
    try:
        lib = ctypes.CDLL(str(path))
        check = getattr(lib, abi)
        check.restype = ctypes.c_int64
        check.argtypes = []
        if check() != want:
            return None, f"{path.name} was built from another version of {source} (rebuild it: make deps)"
        for name, (restype, argtypes) in functions.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
    except (OSError, AttributeError) as e:
        return None, f"{path.name} did not load ({e})"
    return lib, ""
