"""Image URL fetching: allowlist, SSRF address checks, no redirects, byte and time caps.

A real HTTP server on loopback stands in for the internet; loopback is refused unless
allow_private_networks is on, which the positive tests turn on for that reason.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tkr_embed.config import ImageURLSettings
from tkr_embed.engine.fetch import ImageFetcher, address_is_public, host_allowed
from tkr_embed.engine.media import ImageError
from tests.helpers import png_bytes

PNG = png_bytes(16, 16)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            self.wfile.write(b"x" * 50_000)
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()


def fetcher(**kw):
    base = dict(enabled=True, allowlist=["localhost"], max_bytes=10_000, timeout_seconds=1.0,
                allow_private_networks=True)
    base.update(kw)
    return ImageFetcher(ImageURLSettings(**base))


async def test_fetches_an_allowed_image(server):
    assert await fetcher().fetch(server + "/img.png", "p") == PNG


@pytest.mark.parametrize("kw,path,match,status", [
    ({"enabled": False}, "/img.png", "disabled", 400),
    ({"allow_private_networks": False}, "/img.png", "private, loopback", 400),
    ({"allowlist": ["images.example.com"]}, "/img.png", "allowlist", 400),
    ({}, "/redirect", "redirect", 400),
    ({}, "/big", "larger than", 413),
    ({}, "/slow", "longer than", 400),
    ({}, "/missing", "HTTP 404", 400),
])
async def test_refusals(server, kw, path, match, status):
    with pytest.raises(ImageError, match=match) as e:
        await fetcher(**kw).fetch(server + path, "p")
    assert e.value.status == status


async def test_only_http_schemes():
    for url in ("file:///etc/passwd", "ftp://localhost/x.png", "gopher://x"):
        with pytest.raises(ImageError, match="http"):
            await fetcher().fetch(url, "p")


def test_allowlist_matching():
    assert host_allowed("cdn.example.com", ["*.example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("evil-example.com", ["*.example.com"])
    assert host_allowed("Example.COM.", ["example.com"])
    assert not host_allowed("example.com", [])


@pytest.mark.parametrize("ip,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("fc00::1", False),
    ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False),
])
def test_address_classification(ip, public):
    assert address_is_public(ip) is public
