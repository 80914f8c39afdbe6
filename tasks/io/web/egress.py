"""A loopback forward proxy that applies the network policy to every connection a fetch makes.

yt-dlp and urllib follow redirects on their own; routing them through this proxy means every
hop (the page, each redirect, the media itself) is resolved once, checked, and connected to the
checked address. Refusals are remembered so the fetcher can report the real reason instead of
a bare "HTTP 403".
"""

from __future__ import annotations

import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from tasks.core.errors import FetchError
from tasks.io.web.policy import NetworkPolicy, UnsafeURLError

RELAY_IDLE_SECONDS = 60.0
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
}


_LOOPBACK = "127.0.0.1"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, policy: NetworkPolicy, timeout: float) -> None:
        super().__init__((_LOOPBACK, 0), _Handler)
        self.policy = policy
        self.connect_timeout = timeout
        self.refusals: list[str] = []
        self.failures: list[str] = []
        self.closing = threading.Event()

    def open_upstream(self, host: str, port: int) -> socket.socket:
        """Connect to host:port at an address the policy allows (refusals and failures are recorded)."""
        try:
            addresses = self.policy.resolve(host, port)
        except UnsafeURLError as exc:
            self.refusals.append(exc.reason)
            raise
        except FetchError as exc:
            self.failures.append(exc.reason)
            raise
        last: OSError | None = None
        for address in addresses:
            try:
                return socket.create_connection((address, port), timeout=self.connect_timeout)
            except OSError as exc:
                last = exc
        self.failures.append(f"cannot connect to {host}:{port}: {last}")
        raise FetchError(f"cannot connect to {host}:{port}: {last}", retryable=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        return  # URLs may carry signed queries; the fetcher logs redacted ones itself

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        upstream = self._upstream(host.strip("[]"), int(port) if port.isdigit() else 443)
        if upstream is None:
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self._relay(upstream)

    def _plain(self) -> None:
        parts = urlsplit(self.path)
        if parts.scheme != "http" or not parts.hostname:
            self.send_error(400, "proxy accepts absolute http URLs and CONNECT only")
            return
        upstream = self._upstream(parts.hostname, parts.port or 80)
        if upstream is None:
            return
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{self.command} {target} HTTP/1.1"]
        head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        head.append("Connection: close")  # one request per upstream connection keeps the relay simple
        upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        self._relay(upstream)

    do_GET = do_HEAD = _plain  # noqa: N815 - stdlib naming; bodies (POST) are never needed to fetch media

    def _upstream(self, host: str, port: int) -> socket.socket | None:
        try:
            return self.server.open_upstream(host, port)
        except UnsafeURLError as exc:
            self.send_error(403, "Refused by stemworks network policy", exc.reason)
        except FetchError as exc:
            self.send_error(502, "Upstream unreachable", exc.reason)
        return None

    def _relay(self, upstream: socket.socket) -> None:
        """Copy bytes both ways until either side closes or the connection idles out."""
        self.close_connection = True
        client = self.connection
        sockets = [client, upstream]
        try:
            while not self.server.closing.is_set():
                readable, _, _ = select.select(sockets, [], [], RELAY_IDLE_SECONDS)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class EgressProxy:
    """`with EgressProxy(policy) as proxy:` runs the proxy; `proxy.url` is what clients use."""

    def __init__(self, policy: NetworkPolicy, connect_timeout: float = 30.0) -> None:
        self._server = _Server(policy, connect_timeout)
        self._thread = threading.Thread(target=self._server.serve_forever, name="stemworks-egress", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{_LOOPBACK}:{self._server.server_port}"

    @property
    def refusals(self) -> list[str]:
        return list(self._server.refusals)

    @property
    def failures(self) -> list[str]:
        return list(self._server.failures)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
