"""Which URLs a webhook may be sent to: no server-side request forgery.

A ``webhook_url`` is accepted only when

1. it is ``http`` or ``https``, without user name or password, at most 2048 characters;
2. its host is allowed by FLUX_WEBHOOK_ALLOWED_HOSTS: a host name listed exactly, a subdomain of a
   ``*.example.com`` entry, or an IP address inside a listed address or network (``10.1.2.0/24``);
   an empty setting turns webhooks off;
3. *every* address the host resolves to is public, unless an IP address or network entry of the
   setting names it. Loopback, private, link-local (cloud metadata at 169.254.169.254), shared,
   multicast, reserved and unspecified addresses, and IPv6 forms of them, are refused otherwise:
   listing a host *name* never opens a private address.

The same check runs again before every delivery attempt, and the connection goes to the address that
was checked (no second lookup that DNS could answer differently).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_URL_CHARS = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., Sequence[tuple[Any, ...]]]
"""``socket.getaddrinfo``'s signature."""


class WebhookURLError(ValueError):
    """``webhook_url`` is not allowed; the message says why (HTTP 400 on the ``webhook_url`` field)."""

    code = "invalid_webhook_url"
    param = "webhook_url"


def is_public(address: IPAddress) -> bool:
    """A globally routable unicast address (IPv4-mapped and 6to4 IPv6 addresses are judged by their IPv4)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public(embedded)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified
                                      or address.is_loopback or address.is_link_local or address.is_private)


@dataclass(frozen=True)
class AllowedHosts:
    """FLUX_WEBHOOK_ALLOWED_HOSTS, parsed: host names, ``*.`` suffixes, and IP networks."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowedHosts:
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".").strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def names_address(self, address: IPAddress) -> bool:
        return any(address.version == network.version and address in network for network in self.networks)

    def allows_host(self, host: str) -> bool:
        literal = _ip_literal(host)
        if literal is not None:
            return self.names_address(literal)
        return host in self.names or any(host.endswith(suffix) for suffix in self.suffixes)


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the addresses it may be sent to."""

    url: str
    scheme: str
    host: str
    port: int
    target: str
    """Path and query, as sent in the request line."""
    addresses: tuple[str, ...]


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def validate_webhook_url(url: str, allowed: AllowedHosts, *, resolver: Resolver = socket.getaddrinfo) -> WebhookTarget:
    """Check ``url`` against the rules of the module doc and resolve it; raises :class:`WebhookURLError`."""
    # 1. The URL's shape.
    if allowed.empty:
        raise WebhookURLError("webhooks are off on this server (FLUX_WEBHOOK_ALLOWED_HOSTS is empty)")
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise WebhookURLError(f"webhook_url must be a URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookURLError("webhook_url is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError(f"webhook_url must be http or https, not {parts.scheme[:16]!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLError("webhook_url must not carry a user name or password")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise WebhookURLError("webhook_url has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    # 2. The host.
    if not allowed.allows_host(host):
        raise WebhookURLError(f"webhook_url's host {host[:100]!r} is not allowed (FLUX_WEBHOOK_ALLOWED_HOSTS)")
    # 3. Every address it resolves to.
    literal = _ip_literal(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        try:
            infos = resolver(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise WebhookURLError(f"webhook_url's host {host[:100]!r} cannot be resolved") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise WebhookURLError(f"webhook_url's host {host[:100]!r} cannot be resolved")
    for address in addresses:
        if not is_public(address) and not allowed.names_address(address):
            raise WebhookURLError(f"webhook_url's host {host[:100]!r} resolves to a loopback, private or link-local "
                                  "address, which FLUX_WEBHOOK_ALLOWED_HOSTS does not name")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return WebhookTarget(url=url, scheme=parts.scheme, host=host, port=port, target=target,
                         addresses=tuple(str(address) for address in addresses))
