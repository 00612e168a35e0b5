"""The URL policy for http(s) media, against SSRF: pure decisions, no I/O (the client does DNS and connects).

:func:`check_url` is the static part (scheme, host name, credentials, IP literals), run before the cache and on
every redirect hop; :func:`check_resolved` judges every address a name resolved to. Every refusal raises
:class:`~mmtriton.protocol.InvalidInput` naming the item (``where``) and the URL, its query elided.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

from yarl import URL

from mmtriton.media.policy import MediaPolicy
from mmtriton.protocol import InvalidInput

HTTP_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance-metadata endpoints: refused whatever the allow_* settings say (they hand out credentials).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean
    "169.254.170.2",  # AWS ECS task metadata
    "fd00:ec2::254",  # AWS IMDS over IPv6 (a ULA, so allow_private alone would let it through)
    "100.100.100.200",  # Alibaba Cloud (CGNAT range, likewise)
    "192.0.0.192",  # Oracle Cloud (legacy)
    "168.63.129.16",  # Azure wire server: a public address, only this list catches it
))
METADATA_HOSTNAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
    "metadata.tencentyun.com",
})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")

_LOOPBACK_HINT = "set MMT_ALLOW_LOOPBACK_MEDIA_URLS=1 to allow"
_PRIVATE_HINT = "set MMT_ALLOW_PRIVATE_MEDIA_URLS=1 to allow"


def address_refusal(
    address: str | IPAddress, *, allow_loopback: bool = False, allow_private: bool = False
) -> str | None:
    """Why media may not be fetched from ``address``, or None when it may. Pure: connects to nothing."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        # ::ffff:127.0.0.1, 64:ff9b::a00:1, 2002:a00:1:: reach the IPv4 address inside: judge that one.
        reason = address_refusal(embedded, allow_loopback=allow_loopback, allow_private=allow_private)
        return None if reason is None else f"IPv6 address {ip} embedding {reason}"
    if ip in METADATA_ADDRESSES:
        return f"cloud metadata address {ip}"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return f"unspecified address {ip}"
    if ip.is_multicast:
        return f"multicast address {ip}"
    if ip.is_link_local:
        return f"link-local address {ip}"
    if ip.is_loopback:
        return None if allow_loopback else f"loopback address {ip} ({_LOOPBACK_HINT})"
    if ip.is_reserved:
        return f"reserved address {ip}"
    if not ip.is_global:
        # RFC 1918, ULA, CGNAT (100.64/10), documentation and benchmarking ranges.
        return None if allow_private else f"private address {ip} ({_PRIVATE_HINT})"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def _policy_refusal(address: str, policy: MediaPolicy) -> str | None:
    return address_refusal(address, allow_loopback=policy.allow_loopback, allow_private=policy.allow_private)


@dataclass(frozen=True)
class Target:
    """An http(s) URL that passed the static policy (scheme, host name or literal); not yet resolved."""

    url: URL  # fragment dropped
    scheme: str
    host: str  # lower-case, no brackets, no trailing dot
    port: int

    @property
    def host_header(self) -> str:
        """``Host`` header value: the name, bracketed when IPv6, with the port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def normalized(self) -> str:
        """Cache key: lower-case scheme and host, default port and fragment dropped, path '/' when empty."""
        query = f"?{self.url.raw_query_string}" if self.url.raw_query_string else ""
        return f"{self.scheme}://{self.host_header}{self.url.raw_path or '/'}{query}"

    @property
    def ip_literal(self) -> str | None:
        """The host when it is an IP address (already judged by check_url: nothing to resolve), else None."""
        return ip_literal(self.host)


def shown_url(url: str | URL, limit: int = 200) -> str:
    """The URL for error messages: the query elided (pre-signed URLs carry credentials there), length capped."""
    raw = str(url)
    try:
        parts = urllib.parse.urlsplit(raw)
        text = urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        has_query = bool(parts.query)
    except ValueError:  # urlsplit refuses some netlocs (http://[::1): cut by hand, never raise from here
        before_query, question, _ = raw.partition("#")[0].partition("?")
        scheme, slashes, rest = before_query.rpartition("//")
        netloc, slash, path = rest.partition("/")
        text = f"{scheme}{slashes}{netloc.rpartition('@')[2]}{slash}{path}"
        has_query = bool(question)
    text += "?…" if has_query else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_url(url: str | URL, where: str, policy: MediaPolicy) -> Target:
    """The static part of the policy (no DNS): scheme, credentials, metadata names, and IP literals."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        # yarl decodes an IDNA host lazily: a bad label (http://xn--/) raises here, not at URL().
        scheme, port, host = parsed.scheme.lower(), parsed.port, (parsed.host or "").lower().rstrip(".")
    except (ValueError, TypeError, IndexError) as exc:  # UnicodeError is a ValueError; yarl raises IndexError
        # for some malformed authorities, e.g. http://[::1]:x@/ (bench/fuzz.py)
        raise InvalidInput(f"{where}: {shown_url(url)} is not a valid URL ({exc})") from exc
    refuse = f"{where}: {shown_url(url)} refused by URL policy:"
    # Not a dispatch: a redirect hop may name any scheme, and only these two may be followed.
    if scheme not in HTTP_SCHEMES:
        raise InvalidInput(f"{refuse} unsupported URL scheme {scheme or '(none)'!r}; only http and https")
    if not host:
        raise InvalidInput(f"{refuse} no host")
    if parsed.user is not None or parsed.password is not None:
        raise InvalidInput(f"{refuse} credentials in the URL are not allowed")
    if host in METADATA_HOSTNAMES:
        raise InvalidInput(f"{refuse} {host} is a cloud metadata host")
    if (host == "localhost" or host.endswith(".localhost")) and not policy.allow_loopback:
        raise InvalidInput(f"{refuse} {host} is a loopback name ({_LOOPBACK_HINT})")
    literal = ip_literal(host)
    if literal is not None and (reason := _policy_refusal(literal, policy)):
        raise InvalidInput(f"{refuse} {reason}")
    return Target(url=parsed.with_fragment(None), scheme=scheme, host=host, port=port or DEFAULT_PORTS[scheme])


def check_resolved(target: Target, addresses: list[str], where: str, policy: MediaPolicy) -> None:
    """Every address ``target.host`` resolved to must pass: one refused address refuses the URL."""
    for address in addresses:
        if reason := _policy_refusal(address, policy):
            raise InvalidInput(
                f"{where}: {shown_url(target.url)} refused by URL policy: {target.host} resolves to {reason}"
            )


def ip_literal(host: str) -> str | None:
    """``host`` as a canonical IP address string, or None when it is a name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None
