"""URL sources: direct media links and pages yt-dlp understands, fetched safely into the work area.

Every connection goes through `EgressProxy`, so the SSRF policy applies to each hop, redirects
included. Limits are enforced before the download (live status, reported duration and size) and
during it (bytes counted while streaming: a lying or missing Content-Length cannot fill the disk).
"""

from __future__ import annotations

import base64
import http.client
import re
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from tasks.core.errors import FetchError, InvalidAudioError
from tasks.core.records import FetchedSource
from tasks.core.settings import Limits
from tasks.io.faults import is_transient_http_status
from tasks.io.hashcopy import copy_hashed
from tasks.io.locations import is_audio_name, redact
from tasks.io.web.egress import EgressProxy
from tasks.io.web.policy import NetworkPolicy, UnsafeURLError, check_scheme

TIMEOUT_SECONDS = 30.0
MAX_REDIRECTS = 10
# The best audio-only stream that is one plain HTTP(S) download (not HLS/DASH fragments, and never video).
AUDIO_FORMAT = "bestaudio[protocol=https]/bestaudio[protocol=http]"
_NOT_MEDIA_TYPES = re.compile(r"^(text/|image/|application/(json|xml|xhtml|javascript|pdf|zip))", re.IGNORECASE)
_LIVE = {"is_live", "is_upcoming", "post_live"}


def is_direct_media(url: str) -> bool:
    """A link whose path names an audio file is downloaded as is, without asking yt-dlp."""
    return is_audio_name(unquote(urlsplit(url).path))


# -- yt-dlp ------------------------------------------------------------------------------------


class _YtdlpLog:
    """yt-dlp prints to the terminal unless given a logger; its errors reach us as exceptions."""

    def debug(self, msg: str) -> None: ...
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def error(self, msg: str) -> None: ...


def _ytdlp_options(proxy: EgressProxy, **extra: Any) -> dict[str, Any]:
    return {
        "proxy": proxy.url,
        "logger": _YtdlpLog(),
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "cachedir": False,
        "socket_timeout": TIMEOUT_SECONDS,
        "extractor_retries": 0,
        "simulate": True,
        "noplaylist": True,
        "format": AUDIO_FORMAT,
        **extra,
    }


def _extract(url: str, proxy: EgressProxy, **extra: Any) -> dict[str, Any]:
    import yt_dlp  # heavy import: only when a URL source is actually used

    try:
        with yt_dlp.YoutubeDL(_ytdlp_options(proxy, **extra)) as ydl:
            return ydl.sanitize_info(ydl.extract_info(url, download=False))
    except yt_dlp.utils.DownloadError as exc:
        raise _ytdlp_error(url, exc, proxy) from None


def _ytdlp_error(url: str, exc: Exception, proxy: EgressProxy) -> FetchError:
    label = redact(url)
    if proxy.refusals:
        return UnsafeURLError(proxy.refusals[-1], source=label)
    message = re.sub(r"^ERROR:\s*", "", str(exc)).split(" (caused by", 1)[0]
    message = message.replace(url, label)
    if "Unsupported URL" in message:
        return FetchError(
            "no audio or video found at this URL (not a media file, and no page yt-dlp understands)",
            source=label,
            retryable=False,
        )
    if "Requested format is not available" in message:
        return FetchError("no audio-only stream downloadable over HTTP(S) at this URL", source=label, retryable=False)
    status = re.search(r"HTTP Error (\d{3})", message)
    transient = (
        is_transient_http_status(int(status.group(1)))
        if status
        else bool(re.search(r"(?i)timed out|connection|reset|temporar|unreachable", message))
    )
    return FetchError(message, source=label, retryable=transient)


def expand_url(url: str, max_entries: int, policy: NetworkPolicy) -> list[str]:
    """A playlist page becomes its entries' URLs (at most `max_entries`); anything else stays as is.

    Pages that fail to load here are kept as one source: the fetch step then reports the reason
    (and retries transient failures), so expansion never hides an error.
    """
    check_scheme(url)
    if is_direct_media(url):
        return [url]
    with EgressProxy(policy) as proxy:
        try:
            info = _extract(url, proxy, noplaylist=False, extract_flat="in_playlist", playlist_items=f"1:{max_entries}")
        except FetchError:
            return [url]
    if info.get("_type") not in {"playlist", "multi_video"}:
        return [url]
    entries = [entry.get("url") or entry.get("webpage_url") for entry in info.get("entries") or []]
    return [entry for entry in entries[:max_entries] if isinstance(entry, str) and entry]


def _check_before_download(info: dict[str, Any], limits: Limits, label: str) -> None:
    if info.get("is_live") or info.get("live_status") in _LIVE:
        raise InvalidAudioError("live streams are not supported", source=label)
    if info.get("vcodec") not in (None, "none") and info.get("acodec") in (None, "none"):
        raise InvalidAudioError("the selected stream has no audio", source=label)
    duration = info.get("duration")
    if isinstance(duration, (int, float)) and duration > limits.max_seconds:
        raise InvalidAudioError(
            f"duration {duration:.0f} s is over the limit of {limits.max_seconds:.0f} s", source=label
        )
    size = info.get("filesize") or info.get("filesize_approx")
    if isinstance(size, (int, float)) and size > limits.max_file_bytes:
        raise InvalidAudioError(
            f"reported size {int(size)} bytes is over the limit of {limits.max_file_bytes} bytes", source=label
        )


def _origin(url: str, info: dict[str, Any] | None) -> dict[str, str | None]:
    info = info or {}

    def text(key: str) -> str | None:
        value = info.get(key)
        return None if value is None else str(value)

    return {
        "url": redact(url),
        "extractor": text("extractor_key") or "direct",
        "title": text("title"),
        "uploader": text("uploader"),
        "upload_date": text("upload_date"),
        "webpage_url": redact(text("webpage_url") or url),
    }


# -- streaming download ------------------------------------------------------------------------


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Each redirect target must be http(s); its address is then checked by the egress proxy."""

    max_redirections = MAX_REDIRECTS

    def http_error_302(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: http.client.HTTPMessage
    ) -> Any:
        location = headers.get("location") or headers.get("uri")
        if location:
            check_scheme(urljoin(req.full_url, location))  # file://, ftp://... refused with a clear reason
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener(proxy: EgressProxy) -> urllib.request.OpenerDirector:
    """Only HTTP(S), always through the egress proxy; no file/ftp/data handlers at all."""
    opener = urllib.request.OpenerDirector()
    handlers = (
        urllib.request.ProxyHandler({"http": proxy.url, "https": proxy.url}),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        _SafeRedirects(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    )
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def without_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """`url` without `user:password@`, and the Basic `Authorization` header that carries them instead.

    urllib would otherwise send the userinfo upstream as part of the `Host` header (and to the proxy).
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, {"Authorization": f"Basic {token}"}


def _download(
    media_url: str, headers: dict[str, str], target: Path, limits: Limits, proxy: EgressProxy, label: str
) -> tuple[str, int]:
    media_url, auth = without_userinfo(media_url)
    request = urllib.request.Request(media_url, headers={"User-Agent": "stemworks", **auth, **headers})
    with _opener(proxy).open(request, timeout=TIMEOUT_SECONDS) as response:
        content_type = response.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if _NOT_MEDIA_TYPES.match(content_type):
            raise InvalidAudioError(f"not audio: the server sent {content_type}", source=label)
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_file_bytes:
            raise InvalidAudioError(
                f"file is over the limit of {limits.max_file_bytes} bytes "
                f"(server reports {declared} bytes); not downloaded",
                source=label,
            )
        return copy_hashed(
            response,
            target,
            limits.max_file_bytes,
            lambda: InvalidAudioError(
                f"file is over the limit of {limits.max_file_bytes} bytes; download aborted", source=label
            ),
        )


def _download_error(exc: Exception, proxy: EgressProxy, label: str) -> FetchError:
    if proxy.refusals:
        return UnsafeURLError(proxy.refusals[-1], source=label)
    if isinstance(exc, urllib.error.HTTPError):
        if exc.code == 502 and proxy.failures:
            return FetchError(proxy.failures[-1], source=label, retryable=True)
        return FetchError(f"HTTP {exc.code} {exc.reason}", source=label, retryable=is_transient_http_status(exc.code))
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return FetchError(f"transient error while downloading: {reason}", source=label, retryable=True)


def _suffix(info: dict[str, Any] | None, url: str) -> str:
    ext = str((info or {}).get("ext") or PurePosixPath(urlsplit(url).path).suffix.lstrip("."))
    return f".{ext.lower()}" if ext.isalnum() and len(ext) <= 8 else ""


def fetch_url(url: str, work_dir: str | Path, limits: Limits, policy: NetworkPolicy | None = None) -> FetchedSource:
    """Download the best audio behind `url` into `work_dir`; origin metadata goes into the record."""
    label = redact(url)
    policy = policy or NetworkPolicy.from_env()
    check_scheme(url)
    with EgressProxy(policy) as proxy:
        info = None if is_direct_media(url) else _extract(url, proxy)
        if info is not None:
            _check_before_download(info, limits, label)
        media_url = info.get("url") if info else url
        if not isinstance(media_url, str):
            raise FetchError("the page lists no downloadable audio", source=label, retryable=False)
        check_scheme(media_url)
        target = Path(work_dir) / ("source" + _suffix(info, media_url))
        try:
            sha, size = _download(media_url, dict((info or {}).get("http_headers") or {}), target, limits, proxy, label)
        except (InvalidAudioError, UnsafeURLError):
            raise
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _download_error(exc, proxy, label) from None  # copy_hashed removed the partial file
    return FetchedSource(
        source=label, local_path=str(target), content_sha256=sha, size_bytes=size, origin=_origin(url, info)
    )
