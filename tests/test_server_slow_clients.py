"""Slow and idle connections against the server ``sdengine serve`` runs (make_server), over real sockets: a client
that trickles its request headers, or opens a connection and sends nothing, is cut off within the header timeout
while the server keeps answering others; the connection limit answers 503. Every wait is bounded."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

from _live_server import live_server, server_config


def refuse(ref: str, device: str) -> Any:
    raise FileNotFoundError(2, "No such file or directory", ref)


def read_until_closed(k: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """All the server sends until it closes the connection (bounded by limit_s), and when it closed it."""
    t0 = time.monotonic()
    k.settimeout(0.2)
    got = b""
    while time.monotonic() - t0 < limit_s:
        try:
            part = k.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not part:
            break
        got += part
    return got, time.monotonic() - t0


def test_headers_sent_one_byte_at_a_time_are_a_408_within_the_header_timeout(tmp_path) -> None:
    """uvicorn has no deadline on a request's head: a client sending its headers a byte a second (each byte
    within any per-read timeout) held its connection for as long as it liked, and a few hundred such clients hold
    every connection the process may open (slowloris). The head must now be in within --header-timeout."""
    cfg = server_config(tmp_path, devices=("cpu",), header_timeout_s=0.6)
    with live_server(cfg, loader=refuse, as_served=True) as s, httpx.Client(base_url=s.url, timeout=5) as c:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as k:
            k.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            t0 = time.monotonic()
            answer = b""
            k.settimeout(0.05)
            for byte in b"X-Slow: " + b"a" * 200:  # 200 bytes at 20 a second: 10 s, unless cut off
                if time.monotonic() - t0 > 0.3:
                    assert c.get("/healthz").status_code == 200  # others are served meanwhile
                try:
                    k.sendall(bytes([byte]))
                    part = k.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not part:
                    break
                answer += part
            else:
                raise AssertionError("the trickled head was never cut off")
            rest, closing = read_until_closed(k, 5)
            answer += rest
            elapsed = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"did not all arrive within 0.6 s" in answer
        assert elapsed < 4 and closing < 2, (elapsed, closing)  # the answer came, and the connection closed
        assert c.get("/healthz").status_code == 200


def test_an_idle_connection_is_closed_and_a_kept_alive_one_must_send_its_next_head_in_time(tmp_path) -> None:
    cfg = server_config(tmp_path, devices=("cpu",), header_timeout_s=0.5)
    with live_server(cfg, loader=refuse, as_served=True) as s:
        # a connection that sends nothing: closed, without an answer (nothing was asked)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as k:
            got, took = read_until_closed(k, 5)
        assert got == b"" and took < 3, (got, took)
        # one request answered, then the next head trickles in: the deadline counts from the end of the answer
        # (uvicorn's keep-alive timer stops at the first byte of the next request)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as k:
            k.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            first = b""
            while b"\r\n\r\n" not in first:  # the whole first answer: its head, then its content-length of body
                first += k.recv(4096)
            head, _, body = first.partition(b"\r\n\r\n")
            length = int(
                next(v for n, _, v in (h.partition(b": ") for h in head.split(b"\r\n")) if n == b"content-length")
            )
            while len(body) < length:
                body += k.recv(4096)
            assert head.startswith(b"HTTP/1.1 200") and len(body) == length, first[:100]
            t0 = time.monotonic()
            k.sendall(b"GET /healthz HTTP/1.1\r\n")
            try:
                for _ in range(40):  # 4 s of one header byte per 0.1 s, unless cut off
                    time.sleep(0.1)
                    k.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                pass
            got, _ = read_until_closed(k, 3)
            took = time.monotonic() - t0
        assert got.startswith(b"HTTP/1.1 408") and took < 3.5, (got[:100], took)


def test_the_header_timeout_does_not_cut_a_slow_body_or_a_long_answer(tmp_path) -> None:
    """The deadline is on the head alone: a body that keeps coming (each part within the body timeout) and a
    websocket that lasts longer than the header timeout are not cut."""
    cfg = server_config(tmp_path, devices=("cpu",), header_timeout_s=0.4, body_timeout_s=5.0)
    with live_server(cfg, loader=refuse, as_served=True) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as k:
            body = b'{"prompt": "x", "steps": 1, "width": 64, "height": 64}'
            head = "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            k.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
            for i in range(0, len(body), 10):  # 6 parts over ~1.2 s: three header timeouts
                time.sleep(0.2)
                k.sendall(body[i : i + 10])
            assert k.recv(4096).startswith(b"HTTP/1.1 202")
        # a websocket (ComfyUI's /ws) lives on past the header timeout: its connection is the socket's now
        import websocket

        ws = websocket.create_connection(f"ws://127.0.0.1:{s.port}/ws?clientId=slow", timeout=5)
        try:
            assert '"status"' in ws.recv()
            time.sleep(1.2)
            ws.ping(b"still there")
            frame = ws.recv_data_frame(control_frame=True)[1]
            assert frame.opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"still there"
        finally:
            ws.close()


def test_max_connections_answers_503_beyond_the_limit(tmp_path) -> None:
    cfg = server_config(tmp_path, devices=("cpu",), max_connections=2)
    with live_server(cfg, loader=refuse, as_served=True) as s:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(2)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{s.url}/healthz", timeout=5).status_code == 503
        finally:
            for k in held:
                k.close()
        deadline = time.monotonic() + 5
        while httpx.get(f"{s.url}/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
