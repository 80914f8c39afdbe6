"""Which network addresses URL sources may reach: the SSRF policy.

Links arrive from untrusted users, so by default a URL may only reach public (globally routable)
addresses. Loopback, private, link-local (cloud metadata), shared, multicast and reserved
addresses are refused unless the operator opts in through the environment (never through
job settings, which untrusted callers control).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from tasks.core.errors import FetchError
from tasks.io.locations import has_scheme, redact

ALLOW_PRIVATE_ENV = "STEMWORKS_ALLOW_PRIVATE_URLS"
ALLOWED_NETWORKS_ENV = "STEMWORKS_ALLOWED_NETWORKS"
# More fsspec schemes an operator allows for sources, comma-separated (`gcs,az`): a host setting, never a job's.
ALLOWED_SCHEMES_ENV = "STEMWORKS_ALLOWED_SCHEMES"
URL_SCHEMES = frozenset({"http", "https"})
# Remote sources other than URLs: object stores, opened through fsspec with the host's own credentials.
STORE_SCHEMES = frozenset({"s3"})
_CHAINED_URL = re.compile(r"::[a-zA-Z][a-zA-Z0-9+.-]*://")  # `simplecache::http://...` has no leading scheme

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


def is_local_source(source: str) -> bool:
    """A path on this host (`file://` URLs included), read without fsspec: operator input, not a remote source."""
    return source.startswith("file://") or not has_scheme(source)


def allowed_schemes(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """http, https and s3, plus what the operator lists in STEMWORKS_ALLOWED_SCHEMES."""
    env = os.environ if environ is None else environ
    extra = {part.strip().lower() for part in env.get(ALLOWED_SCHEMES_ENV, "").split(",") if part.strip()}
    return URL_SCHEMES | STORE_SCHEMES | extra


def _is_chained(source: str) -> bool:
    """fsspec reads `zip://a.wav::http://host/b.zip` as a chain of file systems, the outer one fetching
    from any host without the egress proxy. A bracketed IPv6 host (`http://[::1]/`) is no chain."""
    try:
        host = urlsplit(source).netloc
    except ValueError:
        return "::" in source
    rest = source.replace(host, "", 1) if "[" in host else source
    return "::" in rest


def source_problem(source: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Why a source may not be read, or None: the one URL rule for every remote source, applied when
    sources are expanded and again at fetch, before any connection is made.

    Local paths and `file://` are operator input and pass. Remote sources must use http, https, s3 or
    a scheme the operator allows in STEMWORKS_ALLOWED_SCHEMES; chained URLs (`::`) are always refused.
    """
    if _CHAINED_URL.search(source) or (not is_local_source(source) and _is_chained(source)):
        return "chained URLs ('::') are not allowed as sources"
    if is_local_source(source):
        return None
    scheme = source.split("://", 1)[0].lower()
    if scheme not in allowed_schemes(environ):
        return (
            f"URL scheme {scheme!r} is not allowed for sources; only http, https and s3 "
            f"(an operator may allow more in {ALLOWED_SCHEMES_ENV}, e.g. gcs,az)"
        )
    return None


def check_source(source: str) -> None:
    """Raise UnsafeURLError (never retried) when `source_problem` refuses the source."""
    problem = source_problem(source)
    if problem is not None:
        raise UnsafeURLError(f"refused: {problem}", source=redact(source))


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
