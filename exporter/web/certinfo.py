"""The validity period of the serving certificate, read from its PEM file (issue 13 item 7).

Python's `ssl` module happily serves an expired or not-yet-valid certificate and says nothing; the
scraper then fails its TLS check and the exporter looks down for no visible reason. So the exporter
reads notBefore/notAfter of the first certificate in `cert_file` (a minimal DER walk: Certificate ->
TBSCertificate -> Validity; no extra dependency), logs once when the certificate is outside its
validity, and exports `conntrack_dns_exporter_web_tls_certificate_not_after_timestamp_seconds` and
`..._not_before_timestamp_seconds` so an alert can fire days before expiry.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
import time
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from exporter.core import files

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


class CertInfoError(ValueError):
    """The certificate could not be decoded far enough to find its validity."""


def _tlv(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at `pos`."""
    if pos + 2 > len(der):
        raise CertInfoError("truncated")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(der):
            raise CertInfoError("bad length")
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    if pos + length > len(der):
        raise CertInfoError("truncated")
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii", errors="replace")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; RFC 5280: YY >= 50 means 19YY
        if not text[:2].isdigit():
            raise CertInfoError("bad UTCTime")
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise CertInfoError("validity is not a time")
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%d%H%M%SZ")))
    except ValueError:
        raise CertInfoError(f"bad time {text!r}") from None


def validity(der: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) as Unix times, from a DER X.509 certificate."""
    tag, start, _ = _tlv(der, 0)            # Certificate ::= SEQUENCE
    if tag != 0x30:
        raise CertInfoError("not a certificate")
    tag, pos, end = _tlv(der, start)        # TBSCertificate ::= SEQUENCE
    if tag != 0x30:
        raise CertInfoError("not a certificate")
    tag, _, nxt = _tlv(der, pos)
    if tag == 0xA0:                         # [0] version (optional)
        pos = nxt
    for _ in range(3):                      # serialNumber, signature, issuer
        _, _, pos = _tlv(der, pos)
    tag, vpos, _ = _tlv(der, pos)           # Validity ::= SEQUENCE { notBefore, notAfter }
    if tag != 0x30 or pos >= end:
        raise CertInfoError("no validity")
    t1, s1, e1 = _tlv(der, vpos)
    t2, s2, e2 = _tlv(der, e1)
    return _time(t1, der[s1:e1]), _time(t2, der[s2:e2])


def read_validity(path: Path) -> tuple[float, float]:
    """(notBefore, notAfter) of the first certificate of the PEM file at `path`."""
    try:
        raw, _ = files.read_regular(path, files.MIB)
    except OSError as e:
        raise CertInfoError(e.strerror or str(e)) from None
    m = _PEM.search(raw)
    if m is None:
        raise CertInfoError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise CertInfoError("bad base64 in PEM certificate") from None
    return validity(der)


def problem(not_before: float, not_after: float, now: float | None = None) -> str | None:
    """Why the certificate is not valid now ('expired ...', 'not valid before ...'), else None."""
    now = time.time() if now is None else now
    if now > not_after:
        return f"expired at {_fmt(not_after)}"
    if now < not_before:
        return f"not valid before {_fmt(not_before)}"
    return None


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def families(period: tuple[float, float] | None) -> list[Metric]:
    """The two gauges, or none when TLS is off or the certificate could not be decoded."""
    if period is None:
        return []
    nb = GaugeMetricFamily("conntrack_dns_exporter_web_tls_certificate_not_before_timestamp_seconds",
                           "Start of the serving certificate's validity (notBefore), Unix time.")
    nb.add_metric([], period[0])
    na = GaugeMetricFamily("conntrack_dns_exporter_web_tls_certificate_not_after_timestamp_seconds",
                           "End of the serving certificate's validity (notAfter), Unix time.")
    na.add_metric([], period[1])
    return [nb, na]
