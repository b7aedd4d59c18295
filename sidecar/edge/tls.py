"""PEM files for TLS, checked before grpc is given them: grpc only fails at the first
handshake, with a message that names neither the setting nor the file.

The checks use the standard library's ``ssl`` (OpenSSL): a certificate chain
must load with its private key (and match it), a CA bundle must hold at least
one certificate. Every certificate of a server's chain must be valid *now*
(its validity dates are read from the DER here, as ``ssl`` has no public way to
read them): one that expired, or is not valid yet, would fail every handshake,
so it is never taken. Plain Python: no grpc here.
"""

from __future__ import annotations

import binascii
import datetime
import re
import ssl
from collections.abc import Sequence

from sidecar.edge.filewatch import FileProblem

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)
_SEQUENCE, _INTEGER, _VERSION, _UTC_TIME, _GENERALIZED_TIME = 0x30, 0x02, 0xA0, 0x17, 0x18


class _BadDer(ValueError):
    pass


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    """The DER element at ``at``: (tag, where its content starts, where it ends)."""
    if at + 2 > len(data):
        raise _BadDer("truncated")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4 or at + size > len(data):
            raise _BadDer("bad length")
        length = int.from_bytes(data[at : at + size], "big")
        at += size
    if at + length > len(data):
        raise _BadDer("truncated")
    return tag, at, at + length


def _time(tag: int, text: bytes) -> datetime.datetime:
    try:
        if tag == _UTC_TIME and len(text) == 13 and text.endswith(b"Z"):
            year = int(text[:2])
            value = datetime.datetime.strptime(text[2:12].decode("ascii"), "%m%d%H%M%S")
            value = value.replace(year=year + (1900 if year >= 50 else 2000))
        elif tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith(b"Z"):
            value = datetime.datetime.strptime(text[:14].decode("ascii"), "%Y%m%d%H%M%S")
        else:
            raise _BadDer("not a DER time")
    except (UnicodeDecodeError, ValueError):
        raise _BadDer("not a DER time") from None
    return value.replace(tzinfo=datetime.UTC)


def validity(der: bytes) -> tuple[datetime.datetime, datetime.datetime]:
    """A DER certificate's (not before, not after)."""
    tag, start, end = _element(der, 0)  # Certificate
    if tag != _SEQUENCE:
        raise _BadDer("not a certificate")
    tag, at, tbs_end = _element(der, start)  # TBSCertificate
    if tag != _SEQUENCE:
        raise _BadDer("not a certificate")
    tag, _, after = _element(der, at)
    if tag == _VERSION:
        at = after
    for _skipped in ("serialNumber", "signature", "issuer"):
        _, _, at = _element(der, at)
    tag, at, _ = _element(der, at)  # Validity
    if tag != _SEQUENCE or at >= tbs_end:
        raise _BadDer("no validity")
    first, start, end = _element(der, at)
    second, start2, end2 = _element(der, end)
    return _time(first, der[start:end]), _time(second, der[start2:end2])


def check_dates(chain: bytes, index: int = 0, now: datetime.datetime | None = None) -> None:
    """Every certificate of the PEM ``chain`` is valid at ``now`` (default: now)."""
    now = now or datetime.datetime.now(datetime.UTC)
    blocks = _PEM_CERTIFICATE.findall(chain)
    for number, block in enumerate(blocks, start=1):
        which = "the certificate" if number == 1 else f"certificate {number} of the chain"
        try:
            not_before, not_after = validity(binascii.a2b_base64(block))
        except (binascii.Error, _BadDer) as exc:
            raise FileProblem(f"{which}: cannot read its validity dates ({exc})", index) from None
        if now > not_after:
            raise FileProblem(
                f"{which} expired on {not_after:%Y-%m-%d %H:%M:%S} UTC: every handshake would fail", index
            )
        if now < not_before:
            raise FileProblem(
                f"{which} is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC: every handshake would fail "
                "until then",
                index,
                retry=True,
            )


def check_identity(cert_path: str, key_path: str, cert: bytes, key: bytes, index: int = 0) -> None:
    """``cert`` (a PEM chain, leaf first) and ``key`` (its PEM private key) form one identity.
    ``index``: the certificate's place among the watched files (the key's follows it)."""
    if CERTIFICATE not in cert:
        raise FileProblem("no PEM certificate in it (-----BEGIN CERTIFICATE-----)", index)
    if b"PRIVATE KEY-----" not in key:
        if CERTIFICATE in key:
            raise FileProblem("holds a certificate, not a private key (are the two files swapped?)", index + 1)
        raise FileProblem("no PEM private key in it (-----BEGIN ... PRIVATE KEY-----)", index + 1)
    if b"ENCRYPTED" in key:
        raise FileProblem("the private key is encrypted; give it unencrypted (a Secret protects it)", index + 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in str(exc):
            raise FileProblem(f"the private key in {key_path} is not this certificate's", index) from None
        raise FileProblem(f"not a usable PEM certificate and key ({reason})", index) from None


def check_ca_bundle(cafile: bytes, index: int = 0) -> None:
    """``cafile`` holds one or more PEM CA certificates."""
    if CERTIFICATE not in cafile:
        raise FileProblem("no PEM certificate in it (-----BEGIN CERTIFICATE-----)", index)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=cafile.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise FileProblem(f"not a usable PEM CA bundle ({reason})", index) from None


def parse_server_files(paths: Sequence[str], contents: Sequence[bytes]) -> tuple[bytes, bytes, bytes | None]:
    """(cert, key[, client CA]) files → (key, cert chain, client CA or None), checked (the
    chain valid now)."""
    cert, key = contents[0], contents[1]
    check_identity(paths[0], paths[1], cert, key)
    check_dates(cert)
    client_ca = contents[2] if len(contents) > 2 else None
    if client_ca is not None:
        check_ca_bundle(client_ca, 2)
    return key, cert, client_ca
