"""Where the server says it is, and whether it may listen where it is told (issue 14, section 2).

Three rules, each decided here and nowhere else:

- The advertised base URL (metadata, ProbeMatches, the scan processes ``dsc process`` writes to
  the directory) is ``[server] public_url``, else the bound address (``bound_base_url``, in
  :mod:`.urls`, below the settings that use it).
- A server listening beyond loopback must not advertise a loopback (or unspecified) address: a
  scanner told ``127.0.0.1`` sends its scans to itself.
- A server listening beyond loopback needs TLS and client certificates: without them every
  client on the network is a scan administrator (R10).

``[server] allow_insecure = true`` waives the last two, and the server then logs each waiver as a
WARNING at every start.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from typing import TYPE_CHECKING

from dsc_bindings.urls import WILDCARDS, bound_base_url, url_host

if TYPE_CHECKING:
    from dsc_bindings.settings import Settings

__all__ = [
    "WILDCARDS",
    "UnsafeExposure",
    "bound_base_url",
    "check_exposure",
    "exposure_problems",
    "is_local_only",
    "is_loopback",
    "url_host",
    "url_hostname",
]


class UnsafeExposure(ValueError):
    """The server would listen beyond loopback in a way issue 14 forbids; the message is one line
    naming what is wrong and what to set."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, bracketed or not) is this machine only."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761 6.3
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_local_only(host: str) -> bool:
    """Whether another machine told ``host`` could not reach this server with it: a loopback
    address or name, or an unspecified (wildcard) address."""
    name = host.strip("[]")
    if name in WILDCARDS:
        return True
    try:
        if ipaddress.ip_address(name).is_unspecified:
            return True
    except ValueError:
        pass
    return is_loopback(name)


def url_hostname(url: str) -> str:
    """The host part of ``url`` (without brackets), empty when it has none."""
    return urllib.parse.urlsplit(url).hostname or ""


def exposure_problems(settings: Settings) -> tuple[str, ...]:
    """What is unsafe in how these settings would listen, one short phrase each with what to set;
    empty on loopback or when nothing is."""
    listen = settings.listen
    if is_loopback(listen.host):
        return ()
    problems = []
    base_url = settings.server.base_url
    if is_local_only(url_hostname(base_url)):
        problems.append(
            f"scanners and the directory would be told {base_url}, which other machines "
            'cannot reach (set [server] public_url, e.g. "https://scan.example.com:5362")'
        )
    if not listen.tls:
        problems.append("plain HTTP (give [tls] cert and key, or --tls-cert/--tls-key)")
    elif listen.client_ca is None:
        problems.append(
            "every client is a scan administrator (give [tls] client_ca and name the "
            "administrators in [users] scan_admins or [directory] admin_group)"
        )
    return tuple(problems)


def check_exposure(settings: Settings) -> str | None:
    """Raise UnsafeExposure when the server must not start as configured; return the WARNING to
    log at start when ``allow_insecure`` waived something, else None."""
    problems = exposure_problems(settings)
    if not problems:
        return None
    where = f"{url_host(settings.listen.host)}:{settings.listen.port}"
    if settings.listen.allow_insecure:
        return f"allow_insecure = true: listening on {where} with " + "; ".join(problems)
    raise UnsafeExposure(
        f"refusing to listen on {where} beyond loopback: "
        + "; ".join(problems)
        + "; or listen on 127.0.0.1 only, or accept the risk with [server] allow_insecure = true"
    )
