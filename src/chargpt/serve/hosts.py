"""Which host names are this machine's loopback: the rule for `--host` and for Host headers.

A server on a loopback address warns when it is not (anyone on the network could use it), and
answers only requests whose Host header names the loopback, which keeps a web page that a
DNS-rebinding attack points at 127.0.0.1 from reading its answers. Kept free of Starlette so the
CLI's side of `serve` imports it without the extra.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without a port) is this machine's loopback."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8000" is "::1"."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header  # a bare name, or an IPv6 address a client failed to bracket
