"""PEM files for TLS, checked before grpc is given them: grpc only fails at the first
handshake, with a message that names neither the setting nor the file.

The checks use the standard library's ``ssl`` (OpenSSL): a certificate chain
must load with its private key (and match it), a CA bundle must hold at least
one certificate. Plain Python: no grpc here.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from sidecar.filewatch import FileProblem

CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


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
    """(cert, key[, client CA]) files → (key, cert chain, client CA or None), checked."""
    cert, key = contents[0], contents[1]
    check_identity(paths[0], paths[1], cert, key)
    client_ca = contents[2] if len(contents) > 2 else None
    if client_ca is not None:
        check_ca_bundle(client_ca, 2)
    return key, cert, client_ca
