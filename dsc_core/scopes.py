"""WS-Discovery 2005/04 scope matching (section 5.1; issue 16): a Probe matches only when every
scope it lists matches one of the device's scopes under the Probe's ``MatchBy`` rule.

Rules implemented (docs/rulings.md "Scopes"):

* ``.../discovery/rfc2396``, the default when ``MatchBy`` is absent (RFC 3986, which replaced
  RFC 2396, compares the same way; its 2009 URI is accepted as a synonym): scheme and authority
  equal ignoring case, and the probe's path segments, percent-decoded, a segment-wise prefix of
  the device's, compared case-sensitively; no ``.`` or ``..`` segment on either side; query and
  fragment are not compared.
* ``.../discovery/uuid``: both are ``urn:uuid:`` URIs of the same UUID.
* ``.../discovery/strcmp0``: the same string.

Any other rule (``ldap``, or one we do not know) is :class:`UnsupportedMatchingRule`: the
caller answers a directed Probe with ``wsd:MatchingRuleNotSupported`` and drops a datagram.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from urllib.parse import unquote, urlsplit

from . import names

__all__ = [
    "RFC2396",
    "STRCMP0",
    "SUPPORTED_RULES",
    "UUID",
    "UnsupportedMatchingRule",
    "scopes_match",
]

RFC2396 = names.WSD + "/rfc2396"
UUID = names.WSD + "/uuid"
STRCMP0 = names.WSD + "/strcmp0"
#: WS-Discovery 1.1's name for the same rule; a client mixing versions still means it.
_RFC3986 = "http://docs.oasis-open.org/ws-dd/ns/discovery/2009/01/rfc3986"
SUPPORTED_RULES = (RFC2396, UUID, STRCMP0)


class UnsupportedMatchingRule(Exception):
    """The Probe's ``MatchBy`` is not a rule this device implements."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


def scopes_match(probe: Sequence[str], device: Sequence[str], match_by: str | None) -> bool:
    """Whether every scope of the Probe matches one of the device's (an empty list always
    does, section 5.1)."""
    rule = _RULES.get(match_by or RFC2396)
    if rule is None:
        raise UnsupportedMatchingRule(match_by or "")
    return all(any(rule(wanted, ours) for ours in device) for wanted in probe)


def _segments(path: str) -> list[str] | None:
    parts = [unquote(p) for p in path.split("/")]
    if parts and parts[0] == "":
        parts = parts[1:]  # the leading "/" of an absolute path
    if parts and parts[-1] == "":
        parts = parts[:-1]  # "a/b/" is "a/b"
    if any(p in (".", "..") for p in parts):
        return None
    return parts


def _rfc2396(wanted: str, ours: str) -> bool:
    try:
        a, b = urlsplit(wanted), urlsplit(ours)
    except ValueError:
        return False  # not a URI: matches nothing
    if (
        a.scheme.lower() != b.scheme.lower()
        or unquote(a.netloc).lower() != unquote(b.netloc).lower()
    ):
        return False
    sa, sb = _segments(a.path), _segments(b.path)
    return sa is not None and sb is not None and sb[: len(sa)] == sa


def _uuid(wanted: str, ours: str) -> bool:
    def value(uri: str) -> uuid.UUID | None:
        if uri[:9].lower() != "urn:uuid:":
            return None
        try:
            return uuid.UUID(uri[9:])
        except ValueError:
            return None

    a = value(wanted)
    return a is not None and a == value(ours)


def _strcmp0(wanted: str, ours: str) -> bool:
    return wanted == ours


_RULES: dict[str, Callable[[str, str], bool]] = {
    RFC2396: _rfc2396,
    _RFC3986: _rfc2396,
    UUID: _uuid,
    STRCMP0: _strcmp0,
}
