"""webhook_url rules: only allowed hosts, and never a loopback, private or link-local address that the
setting does not name (resolved, every address checked)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from fluxserve.webhooks.urls import AllowedHosts, WebhookURLError, validate_webhook_url


def dns(table: dict[str, list[str]]) -> Any:
    """A resolver answering from ``table`` in getaddrinfo's shape (this machine has no DNS for public names)."""

    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in table[host]]

    return resolve


PUBLIC = dns({"hooks.example.com": ["93.184.215.14"], "a.hooks.example.com": ["93.184.215.15", "2606:2800::1"],
              "rebind.example.com": ["93.184.215.14", "10.0.0.5"], "internal.example.com": ["10.1.2.7"],
              "metadata.example.com": ["169.254.169.254"], "mapped.example.com": ["::ffff:127.0.0.1"]})


def allowed(*entries: str) -> AllowedHosts:
    return AllowedHosts.parse(entries)


def test_an_allowed_public_host_is_accepted_with_its_addresses() -> None:
    target = validate_webhook_url("https://hooks.example.com/done?x=1", allowed("hooks.example.com"), resolver=PUBLIC)
    assert (target.scheme, target.host, target.port, target.target) == ("https", "hooks.example.com", 443, "/done?x=1")
    assert target.addresses == ("93.184.215.14",)
    sub = validate_webhook_url("http://a.hooks.example.com:8080/", allowed("*.hooks.example.com"), resolver=PUBLIC)
    assert sub.addresses == ("93.184.215.15", "2606:2800::1") and sub.port == 8080


@pytest.mark.parametrize("url, entries, reason", [
    ("https://hooks.example.com/", (), "webhooks are off"),
    ("https://evil.example.org/", ("hooks.example.com",), "is not allowed"),
    ("https://hooks.example.com.evil.org/", ("hooks.example.com",), "is not allowed"),
    ("https://hooks.example.com/", ("*.hooks.example.com",), "is not allowed"),  # a wildcard means subdomains
    ("https://rebind.example.com/", ("rebind.example.com",), "private"),  # every address must be public
    ("https://internal.example.com/", ("internal.example.com",), "private"),  # a name never opens a private address
    ("https://metadata.example.com/", ("metadata.example.com",), "link-local"),
    ("https://mapped.example.com/", ("mapped.example.com",), "loopback"),
    ("http://127.0.0.1/", ("localhost",), "is not allowed"),
    ("http://localhost/", ("localhost",), "loopback"),  # resolved for real: 127.0.0.1 is not named
    ("http://[::1]:8080/", ("localhost",), "is not allowed"),
    ("ftp://hooks.example.com/", ("hooks.example.com",), "http or https"),
    ("https://user:pw@hooks.example.com/", ("hooks.example.com",), "user name or password"),
    ("https:///nohost", ("hooks.example.com",), "no host"),
    ("https://hooks.example.com:99999/", ("hooks.example.com",), "not a valid URL"),
    ("https://unknown.example.com/", ("unknown.example.com",), "cannot be resolved"),
    ("https://hooks.example.com/" + "x" * 2100, ("hooks.example.com",), "at most 2048"),
])
def test_forbidden_urls_are_refused_with_the_reason(url: str, entries: tuple[str, ...], reason: str) -> None:
    resolver = PUBLIC if "localhost" not in url else socket.getaddrinfo
    with pytest.raises(WebhookURLError, match=reason):
        validate_webhook_url(url, allowed(*entries), resolver=resolver)


def test_private_addresses_pass_only_when_the_setting_names_them() -> None:
    loopback = validate_webhook_url("http://127.0.0.1:9000/hook", allowed("127.0.0.1"))
    assert loopback.addresses == ("127.0.0.1",)
    named = validate_webhook_url("http://localhost:9000/", allowed("localhost", "127.0.0.0/8", "::1"))
    assert set(named.addresses) <= {"127.0.0.1", "::1"}
    network = validate_webhook_url("https://internal.example.com/", allowed("internal.example.com", "10.1.2.0/24"),
                                   resolver=PUBLIC)
    assert network.addresses == ("10.1.2.7",)
    with pytest.raises(WebhookURLError, match="private"):  # the network entry covers 10.1.2.0/24 only
        validate_webhook_url("https://rebind.example.com/", allowed("rebind.example.com", "10.1.2.0/24"),
                             resolver=PUBLIC)
    with pytest.raises(WebhookURLError, match="is not allowed"):
        validate_webhook_url("http://10.1.3.1/", allowed("10.1.2.0/24"))
