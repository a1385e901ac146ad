"""Fetch an image by URL without letting the server be turned against its own network (SSRF).

Off unless enabled. When enabled: http(s) only, hosts on an allowlist, the name resolved once and
every address checked (no private, loopback, link-local, multicast or reserved ones), the request
sent to the checked address (so a second DNS answer cannot redirect it), no redirects followed,
and caps on bytes and total time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..config import ImageURLSettings
from .media import ImageError


def host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def address_is_public(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_private or addr.is_loopback or addr.is_link_local
                                   or addr.is_multicast or addr.is_reserved or addr.is_unspecified)


class ImageFetcher:
    def __init__(self, settings: ImageURLSettings):
        self.settings = settings

    async def fetch(self, url: str, param: str) -> bytes:
        s = self.settings
        if not s.enabled:
            raise ImageError(f"{param}: image URLs are disabled on this server (image_urls.enabled); "
                             "send the image inline as a data:image/...;base64 URI")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageError(f"{param}: only http(s) URLs and data: URIs are accepted")
        host = parts.hostname
        if not host_allowed(host, s.allowlist):
            raise ImageError(f"{param}: host '{host}' is not on the image URL allowlist (image_urls.allowlist)")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), s.timeout_seconds)
        except (OSError, asyncio.TimeoutError):
            raise ImageError(f"{param}: cannot resolve host '{host}'") from None
        addresses = sorted({info[4][0] for info in infos})
        if not s.allow_private_networks and not all(address_is_public(a) for a in addresses):
            raise ImageError(f"{param}: host '{host}' resolves to a private, loopback or link-local address")
        ip = addresses[0]
        netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        try:
            return await asyncio.wait_for(self._get(pinned, headers, host, param), s.timeout_seconds)
        except asyncio.TimeoutError:
            raise ImageError(f"{param}: fetching the image took longer than {s.timeout_seconds}s") from None

    async def _get(self, url: str, headers: dict, sni_host: str, param: str) -> bytes:
        limit = self.settings.max_bytes
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.settings.timeout_seconds,
                                     trust_env=False) as client:
            try:
                async with client.stream("GET", url, headers=headers,
                                         extensions={"sni_hostname": sni_host}) as r:
                    if r.is_redirect:
                        raise ImageError(f"{param}: the image URL redirects; redirects are not followed")
                    if r.status_code != 200:
                        raise ImageError(f"{param}: fetching the image returned HTTP {r.status_code}")
                    declared = r.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limit:
                        raise ImageError(f"{param}: image is larger than {limit} bytes (image_urls.max_bytes)", 413,
                                         "image_too_large")
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise ImageError(f"{param}: image is larger than {limit} bytes (image_urls.max_bytes)",
                                             413, "image_too_large")
                    return bytes(data)
            except httpx.HTTPError as e:
                raise ImageError(f"{param}: fetching the image failed ({type(e).__name__})") from None
