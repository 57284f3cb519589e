"""A server's address as Offload takes it: HOST:PORT, checked before anything dials it.

gRPC takes any string as a target and only fails when it tries to connect, so a typo
("gpu-host" without a port, "not a host") would start an agent that degrades every
cloud-bound row without saying why. Checking the form up front turns that into one
clear line at start-up.
"""

from __future__ import annotations

import ipaddress
import re

EXAMPLE = "gpu-host:8101, 10.0.0.5:8101 or [fd00::5]:8101"
# A DNS name: dot-separated labels of letters, digits and hyphens, not starting or ending with
# a hyphen. Underscores are let through: container runtimes (Docker Compose) resolve service
# names that have them, and refusing a name that resolves would help nobody.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def host_port(host: str, port: int) -> str:
    """HOST:PORT for a host and a port, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_address(text: str) -> str:
    """`text` unchanged if it is HOST:PORT, else ValueError saying what is wrong with it.

    HOST is an IPv4 address, an IPv6 address in brackets, or a DNS name; PORT is 1 to 65535.
    """
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError(f"{text!r} is not HOST:PORT: an IPv6 address goes in brackets, then the port ({EXAMPLE})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not HOST:PORT: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} is not HOST:PORT: it has no port ({EXAMPLE})")
        if ":" in host:
            raise ValueError(f"{text!r} is not HOST:PORT: an IPv6 address goes in brackets, as in [{host}]:{port}")
        _check_host(text, host)
    if not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT: the port {port!r} is not a number from 1 to 65535")
    return text


def _check_host(text: str, host: str) -> None:
    name = host[:-1] if host.endswith(".") else host  # a fully qualified name may end with a dot
    labels = name.split(".")
    if labels[-1].isdigit():
        # All digits at the end: meant as an IPv4 address (no top-level domain is numeric).
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{text!r} is not HOST:PORT: {host!r} is not an IPv4 address") from None
        return
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{text!r} is not HOST:PORT: {host!r} is neither an IP address nor a DNS name "
            f"(letters, digits, hyphens and dots; {EXAMPLE})"
        )
