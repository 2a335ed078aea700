"""Throw-away certificates for TLS tests, made with the `openssl` CLI (EC P-256, valid two days)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def available() -> bool:
    return shutil.which("openssl") is not None


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (cert, key)."""
    _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
         "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def make_cert(d: Path, name: str, ca: tuple[Path, Path], *, san: str = "IP:127.0.0.1,DNS:localhost",
              client: bool = False) -> tuple[Path, Path]:
    """A leaf certificate signed by `ca`: (cert, key)."""
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={'clientAuth' if client else 'serverAuth'}\n")
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-days", "2", "-out", f"{name}.crt", "-extfile", str(ext), cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def make_cert_dated(d: Path, name: str, ca: tuple[Path, Path], start: str, end: str,
                    san: str = "IP:127.0.0.1,DNS:localhost") -> tuple[Path, Path]:
    """A server certificate valid only from `start` to `end` (`YYYYMMDDHHMMSSZ`): expired or not yet
    valid ones, made with `openssl ca` (`x509 -days` cannot go backwards)."""
    (d / f"{name}.index").write_text("")
    (d / f"{name}.serial").write_text("1000\n")
    (d / f"{name}.cnf").write_text(
        "[ca]\ndefault_ca = tca\n[tca]\n"
        f"database = {name}.index\nnew_certs_dir = .\nserial = {name}.serial\ndefault_md = sha256\n"
        "policy = pol\nunique_subject = no\n[pol]\ncommonName = supplied\n")
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    _run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _run("ca", "-batch", "-notext", "-config", f"{name}.cnf", "-cert", str(ca[0]), "-keyfile", str(ca[1]),
         "-in", f"{name}.csr", "-out", f"{name}.crt", "-startdate", start, "-enddate", end,
         "-extfile", f"{name}.ext", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"
