"""Listen addresses: ``host:port`` (IPv6 in brackets) or ``unix:///path``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from sidecar.errors import ConfigError


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``server.listen`` entry."""

    text: str
    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def all_interfaces(self) -> bool:
        return self.host in ("0.0.0.0", "::", "[::]", "")

    @property
    def loopback(self) -> bool:
        """Reachable from this host only: a Unix socket, or a loopback address (a host name
        other than localhost may resolve to anything, so it is not)."""
        if self.unix_path is not None:
            return True
        host = (self.host or "").strip("[]").lower()
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_listen_address(text: str) -> ListenAddress:
    if text.startswith("unix:"):
        path = text.removeprefix("unix://") if text.startswith("unix://") else text.removeprefix("unix:")
        if not path:
            raise ConfigError("server.listen", f"{text!r} has no socket path")
        return ListenAddress(text=text, unix_path=path)
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):(\d+)", text)
    if match is None:
        raise ConfigError("server.listen", f"{text!r} is not host:port or unix:///path")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise ConfigError("server.listen", f"{text!r}: port must be 0-65535")
    return ListenAddress(text=text, host=match.group(1), port=port)
