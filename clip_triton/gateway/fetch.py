"""Fetching image URLs on behalf of API callers without becoming an SSRF hole.

Only http(s). The host name is converted to ASCII once (IDNA 2008 with UTS #46, as httpx does) and
resolved once; every address it resolves to must be public unless private addresses are explicitly
allowed (loopback, RFC 1918, link-local such as cloud metadata 169.254.169.254, CGNAT, multicast,
reserved, and IPv6 addresses that embed one of those: IPv4-mapped, 6to4, Teredo, NAT64). The
connection then goes to the vetted address itself, with the original name in the Host header and
as TLS server name (certificates are still verified against the name): what was checked is what is
connected to, so neither a second DNS answer (rebinding) nor another IDNA reading of the name can
lead elsewhere. Redirects are followed by hand, at most ``max_redirects``, each target checked the
same way; a total time limit; a byte cap enforced while streaming; the content type must be an image.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

Resolver = Callable[[str, int], Awaitable[list[str]]]

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64, well-known and
# local-use): a private IPv4 address inside one is as private as the address itself.
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class FetchError(ValueError):
    """The URL cannot be used; the message is safe to return to the caller."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private: bool = False
    resolver: Resolver = system_resolver  # tests pass a stub: nothing there resolves a real name


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries: IPv4-mapped, 6to4, Teredo (server and client), NAT64."""
    found = []
    if ip.ipv4_mapped:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour:
        found.append(ip.sixtofour)
    if ip.teredo:
        found.extend(ip.teredo)
    if any(ip in net for net in NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def forbidden(address: str) -> bool:
    """Whether an address is anything but a global unicast address. The one place that decides: every
    resolved address and every IPv4 address an IPv6 one carries goes through it. ``is_global`` alone
    misses site-local IPv6 (fec0::/10, deprecated but routable inside sites) on the Pythons we support."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates = [ip, *(embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else [])]
    return any(
        not c.is_global
        or c.is_multicast
        or c.is_reserved
        or c.is_loopback
        or c.is_link_local
        or c.is_private
        or c.is_unspecified
        or getattr(c, "is_site_local", False)
        for c in candidates
    )


def ascii_host(hostname: str) -> str:
    """The host as DNS and HTTP see it: IDNA 2008 (UTS #46 mapping), lower case, no trailing dot."""
    import idna  # noqa: PLC0415 (httpx depends on it)

    name = hostname.rstrip(".")
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return name
    except ValueError:
        pass
    try:
        return idna.encode(name, uts46=True).decode("ascii").lower()
    except idna.IDNAError as exc:
        raise FetchError(f"invalid host name ({exc})") from None


@dataclass(frozen=True)
class Target:
    """Where a URL's request really goes: the vetted address, and the names to present there."""

    url: str  # the URL with the host replaced by the vetted address
    host_header: str
    server_name: str


MAX_URL_CHARS = 8192  # longer URLs are refused before any parsing (browsers and servers cap near here)


async def vet(url: str, policy: FetchPolicy) -> Target:
    if len(url) > MAX_URL_CHARS:
        raise FetchError(f"URL is longer than {MAX_URL_CHARS} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise FetchError("URL contains control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise FetchError(f"malformed URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError("only http and https URLs are fetched")
    if not parts.hostname:
        raise FetchError("URL has no host")
    host = ascii_host(parts.hostname)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("URL has an invalid port") from None
    try:
        addresses = await policy.resolver(host, port)
    except (OSError, UnicodeError):
        raise FetchError(f"cannot resolve host {host}") from None
    if not addresses:
        raise FetchError(f"cannot resolve host {host}")
    if not policy.allow_private and any(forbidden(a) for a in addresses):
        raise FetchError(f"host {host} resolves to a private, loopback or link-local address; such URLs are refused")
    address = addresses[0]
    literal = f"[{address}]" if ":" in address else address
    default = port == (443 if parts.scheme == "https" else 80)
    named = f"[{host}]" if ":" in host else host
    host_header = named if default else f"{named}:{port}"
    netloc = f"{literal}:{port}"
    return Target(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host_header, host)


async def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The body of an image URL, or :class:`FetchError` with a reason fit for the caller."""
    import httpx  # noqa: PLC0415 (gateway extra)

    try:
        async with asyncio.timeout(policy.timeout_s):
            async with httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s, trust_env=False) as client:
                for _ in range(policy.max_redirects + 1):
                    target = await vet(url, policy)
                    # identity: no decoder (gzip, brotli, zstd) ever inflates a small body; an encoded
                    # answer is refused in _read_image, so the byte cap bounds memory as sent.
                    headers = {
                        "User-Agent": "clip-triton-gateway",
                        "Host": target.host_header,
                        "Accept-Encoding": "identity",
                    }
                    request = client.build_request(
                        "GET", target.url, headers=headers, extensions={"sni_hostname": target.server_name}
                    )
                    response = await client.send(request, stream=True)
                    try:
                        if response.is_redirect:
                            url = urljoin(url, response.headers.get("location", ""))
                            continue
                        return await _read_image(response, policy)
                    finally:
                        await response.aclose()
                raise FetchError(f"more than {policy.max_redirects} redirects")
    except TimeoutError:
        raise FetchError(f"URL did not answer within {policy.timeout_s:g} s") from None
    except FetchError:
        raise
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:  # every other failure is the URL's
        raise FetchError(f"URL could not be fetched ({type(exc).__name__})") from None


async def _read_image(response, policy: FetchPolicy) -> bytes:
    if response.status_code != 200:
        raise FetchError(f"URL answered HTTP {response.status_code}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(f"URL answered with Content-Encoding {encoding[:40]}; only unencoded images are fetched")
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise FetchError(f"URL content type is {kind or 'missing'}, not image/*")
    length = response.headers.get("content-length")
    if length and length.isdigit() and int(length) > policy.max_bytes:
        raise FetchError(f"image is {length} bytes, over the {policy.max_bytes} byte limit")
    body = bytearray()
    async for chunk in response.aiter_raw():  # as sent: nothing decodes (encoded answers are refused above)
        body += chunk
        if len(body) > policy.max_bytes:
            raise FetchError(f"image is over the {policy.max_bytes} byte limit")
    return bytes(body)
