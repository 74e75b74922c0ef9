"""Who a webhook may reach: the rules for a job's webhook URL and for the
address a notice is sent to.

Two checks, because a name is only a promise. At submission, and again before
every attempt (the admin may have shortened the list since), the URL must be
http(s), well-formed, without credentials, and its host on the admin
allow-list `webhook_allowed_hosts` (`url_problem`). At each attempt the name
is resolved and the address it resolves to must be public, unless the admin
listed that very address (`address_allowed`): otherwise whoever controls a
listed name's DNS could point the proxy at its own loopback or the private
network behind it. Nothing here touches the network; resolving and
connecting are webhook_post.py's.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

# Refused above this at submission; intake.py sizes the form field by it.
MAX_URL_LENGTH = 2048


def url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why `url` may not be a webhook target, in one sentence for its user, or None.

    Args:
        url: the URL as submitted (already stripped).
        allowed_hosts: the admin allow-list (lower case; "*.domain" for subdomains).
    """
    if len(url) > MAX_URL_LENGTH:
        return f"the webhook URL is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a malformed port
    except ValueError:
        return "the webhook URL is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "the webhook URL must be an http:// or https:// URL with a host"
    if parts.username is not None or parts.password is not None:
        return "the webhook URL must not carry a user name or password"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "the webhook URL contains spaces or control characters"
    if not host_allowed(parts.hostname, allowed_hosts):
        return (f"webhook host {parts.hostname[:100]!r} is not allowed: the admin allow-list "
                f"webhook_allowed_hosts is {', '.join(allowed_hosts)}")
    return None


def host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """True when `host` is listed, or is a subdomain of a listed "*.domain"."""
    host = host.lower().rstrip(".")
    return any(host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:]))
               for pattern in allowed_hosts)


def address_allowed(address: str, allowed_hosts: tuple[str, ...]) -> bool:
    """True for a public address, or for any address listed exactly in `allowed_hosts`.

    Loopback, private, link-local, shared (100.64/10), reserved, multicast and
    unspecified addresses are reachable only through an explicit entry for the
    address itself: a name on the list, wildcard or not, never unlocks them,
    since whoever controls the name's DNS chooses where it points.
    """
    ip = _ip(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is not part of it
    if any(_ip(entry) == ip for entry in allowed_hosts):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_private or ip.is_unspecified)


def _ip(text: str):
    """The address in `text` (an IPv4-mapped IPv6 one as its IPv4 address), or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
