"""Which network addresses URL sources may reach: the SSRF policy.

Links arrive from untrusted users, so by default a URL may only reach public (globally routable)
addresses. Loopback, private, link-local (cloud metadata), shared, multicast and reserved
addresses are refused unless the operator opts in through the environment (never through
job settings, which untrusted callers control).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from tasks.core.errors import FetchError
from tasks.io.locations import redact

ALLOW_PRIVATE_ENV = "STEMWORKS_ALLOW_PRIVATE_URLS"
ALLOWED_NETWORKS_ENV = "STEMWORKS_ALLOWED_NETWORKS"
URL_SCHEMES = frozenset({"http", "https"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_KINDS = (
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_unspecified", "unspecified"),
    ("is_private", "private"),
    ("is_reserved", "reserved"),
)


class UnsafeURLError(FetchError):
    """The URL is refused by the network policy (scheme or address). Retrying cannot help."""

    default_retryable = False


def is_url_source(source: str) -> bool:
    return urlsplit(source).scheme.lower() in URL_SCHEMES


def check_scheme(url: str) -> None:
    """Only http(s) may be fetched for a URL source: file://, ftp://, data: and the like are refused."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise UnsafeURLError(
            f"URL scheme {scheme or '(none)'!r} is not allowed; only http and https", source=redact(url)
        )


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """IPv6 forms that carry an IPv4 address are judged by that address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


@dataclass(frozen=True)
class NetworkPolicy:
    """allow_private opens every address; allowed_networks opens only the listed ranges."""

    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NetworkPolicy:
        env = os.environ if environ is None else environ
        allow = env.get(ALLOW_PRIVATE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
        networks = tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in env.get(ALLOWED_NETWORKS_ENV, "").split(",")
            if part.strip()
        )
        return cls(allow_private=allow, allowed_networks=networks)

    def address_problem(self, address: str) -> str | None:
        """Why `address` may not be contacted, or None when it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if self.allow_private or any(ip in net for net in self.allowed_networks):
            return None
        judged = _embedded_ipv4(ip)
        for attribute, kind in _KINDS:
            if getattr(judged, attribute):
                return f"{address} is a {kind} address"
        if not judged.is_global:
            return f"{address} is not a public address"
        return None

    def resolve(self, host: str, port: int) -> list[str]:
        """Addresses to connect to for host:port; refuses the host if ANY of them is not allowed.

        Callers connect to these addresses, never re-resolve the name: a second lookup could be
        answered differently (DNS rebinding).
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(f"cannot resolve host {host!r}: {exc}", retryable=False) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            problem = self.address_problem(address)
            if problem is not None:
                raise UnsafeURLError(
                    f"refused: host {host!r} resolves to {problem}; set {ALLOW_PRIVATE_ENV}=1 to allow "
                    f"private addresses on a trusted network"
                )
        return addresses
