"""Fetching image URLs on behalf of API callers without becoming an SSRF hole.

Only http(s); every address a host name resolves to must be public unless private addresses are
explicitly allowed (loopback, RFC 1918, link-local such as cloud metadata 169.254.169.254, CGNAT,
multicast, reserved); redirects are followed by hand, at most ``max_redirects``, each target checked
again; a total time limit; a byte cap enforced while streaming; the content type must be an image.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit


class FetchError(ValueError):
    """The URL cannot be used; the message is safe to return to the caller."""


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private: bool = False


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local


async def _check_host(url: str, policy: FetchPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("only http and https URLs are fetched")
    if not parts.hostname:
        raise FetchError("URL has no host")
    if policy.allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, parts.port or 0,
                                                             type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise FetchError(f"cannot resolve host {parts.hostname}") from None
    if any(_forbidden(info[4][0]) for info in infos):
        raise FetchError(f"host {parts.hostname} resolves to a private, loopback or link-local address; "
                         "such URLs are refused")


async def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The body of an image URL, or :class:`FetchError` with a reason fit for the caller."""
    import httpx  # noqa: PLC0415 (gateway extra)

    try:
        async with asyncio.timeout(policy.timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s) as client:
                for _ in range(policy.max_redirects + 1):
                    await _check_host(url, policy)
                    async with client.stream("GET", url, headers={"User-Agent": "clip-triton-gateway"}) as response:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise FetchError(f"URL answered HTTP {response.status_code}")
                        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                        if not kind.startswith("image/"):
                            raise FetchError(f"URL content type is {kind or 'missing'}, not image/*")
                        length = response.headers.get("content-length")
                        if length and length.isdigit() and int(length) > policy.max_bytes:
                            raise FetchError(f"image is {length} bytes, over the {policy.max_bytes} byte limit")
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > policy.max_bytes:
                                raise FetchError(f"image is over the {policy.max_bytes} byte limit")
                        return bytes(body)
                raise FetchError(f"more than {policy.max_redirects} redirects")
    except TimeoutError:
        raise FetchError(f"URL did not answer within {policy.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"URL could not be fetched ({type(exc).__name__})") from None
