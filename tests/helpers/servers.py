"""Real servers on 127.0.0.1 for tests: moto's standalone S3 server, a TCP relay that can go down,
and an HTTP server with media, pages, redirects and failure modes."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class MotoServer:
    """`python -m moto.server` in its own process: S3 over real HTTP, like MinIO or R2 would be."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


class Relay:
    """A TCP relay in front of a server: `down()` refuses and cuts every connection, `up()` restores it.

    Clients see exactly what they would see if the store went away: refused connects and resets.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._trip: tuple[re.Pattern[bytes], str] | None = None
        self.tripped = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def down_on(self, request: bytes, *, after_reply: bool = False, lose_reply: bool = False) -> threading.Event:
        """Go down when a request line matches the regex `request`: before the server sees it, right after its
        reply has reached the client (`after_reply`), or as its reply arrives, which the client then never
        gets although the server did the work (`lose_reply`). A watcher polling the store would race a fast
        upload; this cuts at the same request every time. Returns the event set when it went down."""
        when = "lose_reply" if lose_reply else "after_reply" if after_reply else "before"
        with self._lock:
            self._trip = (re.compile(request, re.MULTILINE), when)
            self.tripped = threading.Event()
            return self.tripped

    def disarm(self) -> None:
        with self._lock:
            self._trip = None

    def _matches_trip(self, data: bytes) -> str | None:
        """None when data does not trip the wire; else when to go down: "before", "after_reply", "lose_reply"."""
        with self._lock:
            if self._trip is None or not self._trip[0].search(data):
                return None
            when = self._trip[1]
            self._trip = None
            return when

    def _go_down(self) -> None:
        self.down()
        self.tripped.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update({client, upstream})
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, client: socket.socket, upstream: socket.socket) -> None:
        pair = [client, upstream]
        tripped: str | None = None
        reply = b""
        try:
            while True:
                readable, _, _ = select.select(pair, [], [], 30)
                if not readable:
                    break
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client and (when := self._matches_trip(data)) is not None:
                        if when == "before":
                            self._go_down()
                            return
                        tripped = when
                    if tripped == "lose_reply" and sock is upstream and not data.startswith(b"HTTP/1.1 100"):
                        self._go_down()  # the reply dies here: the server acted, the client never hears
                        return
                    (upstream if sock is client else client).sendall(data)
                    if tripped == "after_reply" and sock is upstream:
                        reply += data  # a reply may come in several pieces (and after a 100 Continue)
                        if reply_is_complete(reply):
                            self._go_down()
                            return
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._open.discard(client)
                self._open.discard(upstream)
            client.close()
            upstream.close()


def reply_is_complete(data: bytes) -> bool:
    """Whether `data` holds a whole final HTTP response: past any 1xx, the header block and its
    Content-Length body. Going down any earlier would cut the reply the client is waiting for."""
    while (head_end := data.find(b"\r\n\r\n")) >= 0:
        head = data[:head_end].decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        end = head_end + 4 + (int(length.group(1)) if length else 0)
        if len(data) < end:
            return False
        if not 100 <= status < 200:
            return True
        data = data[end:]
    return False


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True
    failures_first: int = 0  # answer 503 this many times before succeeding


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (clients trust it through SSL_CERT_FILE) and its key."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class MediaServer:
    """HTTP(S) on 127.0.0.1 with routes set by the test; counts body bytes actually sent per path."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.sent: dict[str, int] = {}
        self.hits: dict[str, int] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request, in order
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                self._answer(head=False)

            def _answer(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.requests.append((path, dict(self.headers.items())))
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404, "Not Found")
                    return
                if server.hits[path] <= route.failures_first:
                    self.send_error(503, "Service Unavailable")
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.close_connection = True
                self.end_headers()
                if not head:
                    self._body(path, route.body)

            def _body(self, path: str, body: bytes) -> None:
                try:
                    for start in range(0, len(body), 1 << 16):
                        self.wfile.write(body[start : start + (1 << 16)])
                        server.sent[path] = server.sent.get(path, 0) + len(body[start : start + (1 << 16)])
                except OSError:
                    return  # the client hung up (e.g. a size limit): exactly what tests look for

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "https" if tls else "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were built with


def s3_env(endpoint: str, secret: str) -> dict[str, str]:
    """The standard AWS variables, pointed at a loopback store; no profile or instance lookups."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIASTEMWORKSTEST",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread
