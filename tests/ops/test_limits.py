"""Body-size limits (413), the overload gate (429 + Retry-After) and the request caps (400)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest

from tests.ops.conftest import SERVER
from tests.server_utils import LiveServer, live_server

MB = 1024 * 1024


@pytest.fixture(scope="module")
def srv(tiny_model: str) -> LiveServer:
    with live_server(model=tiny_model, max_body_mb=1, max_upload_mb=2, max_tokens_limit=32, max_n=2, max_stop=2,
                     **SERVER) as s:
        yield s


def raw_request(url: str, head: str, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send `head` (+ body) on a fresh socket; return what the server answers (until it closes or times out)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and b'"error"' in data:
                    break
        except TimeoutError:
            pass
    return data


def padded_completion(size: int) -> bytes:
    body = json.dumps({"prompt": "hi", "max_tokens": 1, "user": ""}).encode()
    return body[:-2] + b"x" * (size - len(body)) + b'"}'


def assert_413(r: httpx.Response, flag: str) -> None:
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["type"] == "request_too_large" and flag in err["message"], err


def test_413_from_content_length_without_reading_the_body(srv: LiveServer) -> None:
    # Announce 50 MB and send none of it: the answer must come at once, from the header alone.
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * MB}\r\n\r\n")
    data = raw_request(srv.url, head)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"--max-body-mb" in data


def test_413_by_content_length(srv: LiveServer) -> None:
    with srv.client() as c:
        assert_413(c.post("/v1/completions", content=padded_completion(MB + 10),
                          headers={"content-type": "application/json"}), "--max-body-mb")
        small = c.post("/v1/completions", content=padded_completion(MB - 10),
                       headers={"content-type": "application/json"})
        assert small.status_code == 200, small.text


def test_413_by_counting_a_chunked_body(srv: LiveServer) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        body = padded_completion(total)
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    with srv.client() as c:
        r = c.post("/v1/completions", content=chunks(MB + 10), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert_413(r, "--max-body-mb")
        r = c.post("/v1/completions", content=chunks(MB - 10), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_413_chunked_is_answered_before_the_body_ends(srv: LiveServer) -> None:
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * (256 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    data = raw_request(srv.url, head, b'10\r\n{"messages": ["x\r\n' + chunk * 5)  # 1.25 MB, never terminated
    assert data.startswith(b"HTTP/1.1 413"), data[:200]


def test_upload_routes_use_max_upload_mb(srv: LiveServer) -> None:
    with srv.client() as c:
        # 1.5 MB: over --max-body-mb but under --max-upload-mb, so it reaches the adapter routes
        r = c.post("/v1/adapters", content=b"x" * (MB + MB // 2), headers={"content-type": "application/zip"})
        assert r.status_code != 413, r.text
        assert_413(c.post("/v1/adapters", content=b"x" * (2 * MB + 1)), "--max-upload-mb")
        assert_413(c.post("/v1/load_lora_adapter", content=b"x" * (MB + 1)), "--max-body-mb")


def test_413_for_a_chunked_upload_even_when_the_route_catches_the_error(srv: LiveServer) -> None:
    # The adapter routes turn any multipart parsing error into a 400; the size limit still answers 413.
    boundary = "peftserve-test"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"'
            '\r\nContent-Type: application/octet-stream\r\n\r\n').encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(9):
            yield b"\0" * (256 * 1024)

    with srv.client() as c:
        r = c.post("/v1/adapters", content=chunks(),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert_413(r, "--max-upload-mb")


@pytest.mark.parametrize("extra,param,flag", [
    ({"max_tokens": 33}, "max_tokens", "--max-tokens-limit"),
    ({"n": 3}, "n", "--max-n"),
    ({"stop": ["a", "b", "c"]}, "stop", "--max-stop"),
])
def test_request_caps_are_400_naming_the_flag(srv: LiveServer, extra: dict, param: str, flag: str) -> None:
    with srv.client() as c:
        for route, base in (("/v1/completions", {"prompt": "hi"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = c.post(route, json={**base, "max_tokens": 4, **extra})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and flag in err["message"], err


def test_429_with_retry_after_when_the_queue_is_full(tiny_model: str) -> None:
    with live_server(model=tiny_model, max_queue=1, max_num_seqs=1, **SERVER) as srv:
        async def burst() -> list[httpx.Response]:
            async with srv.async_client() as c:
                body = {"prompt": [7] * 8, "max_tokens": 40, "ignore_eos": True}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6)))

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(429) >= 3 and codes.count(200) >= 1, codes
        assert set(codes) == {200, 429}, codes
        for r in rs:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                err = r.json()["error"]
                assert err["type"] == "rate_limit_error" and "--max-queue" in err["message"], err
        # once the queue drains, requests are accepted again
        with srv.client() as c:
            assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
            assert c.get("/v1/models").status_code == 200
