"""The server's safety rules, each in one place.

* Bind: a loopback host is the default; any other host needs an API key (or an explicit
  ``--insecure-no-auth``), checked before anything is loaded (:func:`check_bind`).
* API key: ``Authorization: Bearer KEY`` (what the ``openai`` client sends) or HTTP Basic with the key as
  password (what ``webuiapi``'s ``set_auth`` sends), compared in constant time.
* Browsers: a state-changing request (POST, PUT, PATCH, DELETE) that carries an ``Origin`` other than the
  server's own - ``Origin: null`` included - is refused unless listed in ``cors_origins`` (CSRF). Without a
  key, the ``Host`` header must name a loopback host too, so that a DNS-rebinding page (whose Origin and
  Host agree) is refused as well.
* Body: over ``max_body_bytes`` is a 413, from ``Content-Length`` or while the body streams in; a body that stops
  arriving for ``body_timeout_s`` is a 408.
* Images: the format (PNG, JPEG, WebP) and the size are read from the header, and an image over
  ``max_image_pixels`` is refused before any pixel is decoded (decompression bombs). URLs are never fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdengine.server.errors import BadRequest, BodyTimeout, PayloadTooLarge, ServerConfigError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # answered without a key (load balancers' health checks)
# GET without a key, as A1111 serves them with --api-auth: the API's description holds no secret, and the docs
# page's "Authorize" sends the key on the calls it tries
PUBLIC_DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PAGE = ("/", "/static/")  # the web page: no secret in it; it asks for the key itself
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class Caller:
    """Who sent the request being handled: ``client`` is the client a job belongs to (its key's user, ``key N``,
    when the server has several user keys; else its address as uvicorn gives it, with its proxy headers the
    address a trusted proxy on this machine forwards in X-Forwarded-For); ``admin``: it sent ``--admin-key`` and
    may see and act on every client's jobs. The job queue gives every client its share by ``client``, and the
    routes show and touch only the caller's own jobs (:func:`sdengine.server.jobs.may_see`)."""

    client: str
    admin: bool = False


# Set by :class:`SecurityMiddleware` for every HTTP request (the ComfyUI websocket finds its own); None outside a
# request (the workers, tests calling the job manager directly): no request, no owner to check.
REQUEST_CALLER: ContextVar[Caller | None] = ContextVar("sdengine_request_caller", default=None)


def owned(owner: str | None, caller: Caller | None = None) -> bool:
    """Whether ``caller`` (by default the request being handled's) may see a thing whose client is ``owner`` (a
    job, a ComfyUI history entry, an upload): its own client's, or anything for the admin; outside a request
    (the workers, the server's own code) everything."""
    who = caller if caller is not None else REQUEST_CALLER.get()
    return who is None or who.admin or owner == who.client


def client_of(scope: Mapping[str, Any]) -> str:
    """The client address of an ASGI scope (``unknown`` when the server does not know it)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    h = host.strip().lower()
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.strip("[]")).is_loopback
    except ValueError:
        return False


def check_key(key: str, flag: str = "--api-key (or $SDENGINE_API_KEY)") -> None:
    """A key a client can send: not empty, printable ASCII without spaces."""
    if not key:
        raise ServerConfigError(f"{flag.split(' ')[0]} must not be empty")
    if key != key.strip() or not all(33 <= ord(c) <= 126 for c in key):
        # A Bearer value is read stripped, and headers are Latin-1: such a key could never be sent back, and
        # every request would be a 401 (a trailing newline or \r from a key file, a space, an accented letter).
        raise ServerConfigError(
            f"{flag} must be printable ASCII without spaces: it has whitespace, a "
            "control character or a non-ASCII letter (a newline from a key file?), so no client could send it"
        )


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve on a non-loopback host without a key, unless explicitly told to."""
    if api_key is not None:
        check_key(api_key)
    if not is_loopback(host) and api_key is None and not insecure_no_auth:
        raise ServerConfigError(
            f"refusing to listen on {host} without --api-key: anyone who can reach it could use it "
            "(give --api-key KEY, or --insecure-no-auth if the network is trusted)"
        )


def key_matches(headers: Mapping[str, str], api_key: str) -> bool:
    """Bearer KEY, or Basic auth whose password is KEY; constant-time compare."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    elif "x-api-key" in headers:
        given = headers["x-api-key"]
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode("utf-8"))


def caller_of(
    scope: Mapping[str, Any], headers: Mapping[str, str], user_keys: tuple[str, ...], admin_key: str | None
) -> Caller | None:
    """Who sends this request (see :class:`Caller`); None when the server has keys and none of them was sent.
    Every key is compared (in constant time), so the time taken does not say which one came close."""
    address = client_of(scope)
    if not user_keys and admin_key is None:
        return Caller(address)
    matched = [i for i, key in enumerate(user_keys) if key_matches(headers, key)]
    if admin_key is not None and key_matches(headers, admin_key):
        return Caller("admin" if len(user_keys) > 1 else address, admin=True)
    if not matched:
        return None
    return Caller(f"key {matched[0] + 1}" if len(user_keys) > 1 else address)


def _host_name(host_header: str) -> str:
    """``example.com:7860`` -> ``example.com``; ``[::1]:7860`` -> ``::1``."""
    h = host_header.strip()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def origin_allowed(origin: str, host_header: str, allowed: tuple[str, ...]) -> bool:
    """The server's own origin (same host:port as the Host header) or one listed; never ``null``."""
    o = origin.strip().rstrip("/")
    if o in allowed or "*" in allowed and o != "null":
        return True
    if o == "null" or not host_header:
        return False
    return o.lower() in (f"http://{host_header.lower()}", f"https://{host_header.lower()}")


class SecurityMiddleware:
    """Pure ASGI middleware applying the rules of this module to every HTTP request."""

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        more_api_keys: tuple[str, ...] = (),
        admin_key: str | None = None,
        cors_origins: tuple[str, ...],
        max_body_bytes: int,
        loopback_only_hosts: bool,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.user_keys = ((api_key,) if api_key is not None else ()) + tuple(more_api_keys)
        self.admin_key = admin_key
        self.auth = bool(self.user_keys) or admin_key is not None
        self.cors_origins = tuple(o.rstrip("/") for o in cors_origins)
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.loopback_only_hosts = loopback_only_hosts

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        host = headers.get("host", "")
        caller = caller_of(scope, headers, self.user_keys, self.admin_key)
        # a public route answered without a key (health checks, the page) is its address's, never an admin's
        REQUEST_CALLER.set(caller or Caller(client_of(scope)))
        problem = self._refusal(method, path, headers, host, caller is not None)
        if problem is not None:
            status, message = problem
            await _send_json(send, status, message, www_auth=status == 401)
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                too_big = False
            if too_big:
                await _send_json(send, 413, f"request body over the limit of {self.max_body_bytes} bytes")
                return
        seen = 0
        started = False
        # a body is announced (a length, or chunks): until it has all come, each part must arrive within
        # body_timeout_s (a client that stops sending held its connection and the route forever: slowloris)
        pending = [bool(length and length.strip() not in ("", "0")) or "transfer-encoding" in headers]
        timed_out: list[BodyTimeout] = []

        async def limited_receive() -> Any:
            nonlocal seen
            if pending[0]:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout_s)
                except TimeoutError:
                    timed_out.append(
                        BodyTimeout(f"the request body stopped arriving: nothing came for {self.body_timeout_s:g} s")
                    )
                    raise timed_out[-1] from None
            else:
                message = await receive()
            if message.get("type") == "http.request":
                pending[0] = bool(message.get("more_body", False))
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise PayloadTooLarge(f"request body over the limit of {self.max_body_bytes} bytes")
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if timed_out:  # FastAPI answers a body it could not read with its own 400: the 408 says why
                if message.get("type") == "http.response.start" and not started:
                    started = True
                    await _send_json(send, 408, str(timed_out[0]))
                return
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (PayloadTooLarge, BodyTimeout) as e:
            if not started:
                await _send_json(send, e.status, str(e))

    def _refusal(
        self, method: str, path: str, headers: dict[str, str], host: str, key_ok: bool
    ) -> tuple[int, str] | None:
        if self.loopback_only_hosts and host and not is_loopback(_host_name(host)):
            return 403, (
                f"Host {host!r} is not this server's (it listens on loopback only); a page on another "
                "site cannot use it"
            )
        origin = headers.get("origin")
        if method in STATE_CHANGING and origin is not None and not origin_allowed(origin, host, self.cors_origins):
            return 403, (
                f"requests from the page at Origin {origin!r} are refused (not this server's; see --cors-origins)"
            )
        public = path in PUBLIC_PATHS or (
            method in ("GET", "HEAD")
            and (
                path == PUBLIC_PAGE[0] or path in PUBLIC_DOCS or (path.startswith(PUBLIC_PAGE[1]) and ".." not in path)
            )
        )
        if self.auth and not public and method != "OPTIONS":
            if not key_ok:
                return 401, "missing or wrong API key (send 'Authorization: Bearer KEY')"
        return None


async def _send_json(
    send: Callable[[Any], Awaitable[None]], status: int, message: str, *, www_auth: bool = False
) -> None:
    body = json.dumps({"detail": message, "error": {"message": message, "type": _TYPES.get(status, "error")}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if www_auth:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


_TYPES = {401: "authentication_error", 403: "permission_error", 408: "request_timeout", 413: "request_too_large"}


# ---------------------------------------------------------------------------------------------- images

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_image(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Bytes of a PNG/JPEG/WebP -> a loaded PIL image; refused (413) before decoding when the header's
    width x height is over ``max_pixels``, and 400 when it is not an image of those formats."""
    try:
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own (higher) limit, also found from the header
        raise PayloadTooLarge(f"{what}: {e}; over the limit of {max_pixels} pixels, refused before decoding") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for garbage
        raise BadRequest(f"{what}: not a PNG, JPEG or WebP image ({type(e).__name__})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise PayloadTooLarge(
            f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; refused before decoding"
        )
    try:
        im.load()
    except Exception as e:  # noqa: BLE001
        raise BadRequest(f"{what}: the image data cannot be decoded ({type(e).__name__}: {e})") from None
    return im


def decode_base64_image(text: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL); http(s) URLs are refused, never fetched."""
    s = text.strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.IGNORECASE):
        raise BadRequest(f"{what}: image URLs are not fetched; send the image as base64 or upload it")
    s = _DATA_URL.sub("", s, count=1)
    try:
        data = base64.b64decode(s + "=" * (-len(s) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what}: not valid base64") from None
    if not data:
        raise BadRequest(f"{what}: empty image")
    return decode_image(data, what, max_pixels)


# ---------------------------------------------------------------------------------------------- request heads


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 HTTP protocol with a deadline on request heads (slowloris): from the moment a connection
    opens, or its last response ends (keep-alive), the whole head of the next request (request line and headers)
    must have come within ``header_timeout_s``, however the bytes trickle in; past it, a connection that had sent
    part of a head gets a 408 and is closed, an idle one is closed (so is one still sending the body of a request
    already answered, a 413). uvicorn has no such deadline (its keep-alive
    timer stops at the first byte of the next request), and a body is bounded by :class:`SecurityMiddleware`'s
    ``body_timeout_s`` once the head is in; a response the server is still sending (an event stream) is never
    cut."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(
        {
            "detail": f"the request headers did not all arrive within {header_timeout_s:g} s",
            "error": {
                "message": f"the request headers did not all arrive within {header_timeout_s:g} s",
                "type": _TYPES[408],
            },
        }
    ).encode()
    answer = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderTimeoutProtocol(H11Protocol):  # type: ignore[misc]
        head_deadline: asyncio.TimerHandle | None = None

        def _watch_head(self) -> None:
            # armed once per wait for a head (never pushed back by the bytes that arrive), dropped once it is in;
            # also once the answer is sent while the client still sends its body (a 413): the rest must come in time
            waiting = (self.conn.their_state is h11.IDLE or self.conn.our_state is h11.DONE) and not (
                self.transport.is_closing()
            )
            if waiting and self.head_deadline is None:
                self.head_deadline = self.loop.call_later(header_timeout_s, self._head_timed_out)
            elif not waiting and self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_timed_out(self) -> None:
            self.head_deadline = None
            if self.transport.is_closing():
                return
            if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head came: say why
                self.transport.write(answer)
            self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
