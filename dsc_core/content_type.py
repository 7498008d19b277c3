"""A tolerant parser for MIME ``Content-Type`` values (RFC 2045 section 5.1, loosely).

Why tolerant: the hardware-docs SendImage example (dsm-and-stack.md section 1.5) has an unquoted
boundary, a mixed-case media type, parameters folded over several lines and, in the root part,
two parameters separated only by whitespace (``type=application/soap+xml`` then ``charset=UTF-8``
on the next line).  R8 and dsm-and-stack.md section 3 ask us to accept all of that.  The parser
never raises: whatever cannot be understood is skipped, and a value without a recognisable
``type/subtype`` gets an empty ``media_type``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["ContentType", "parse_content_type", "soap_media_type_refusal"]

# RFC 2045 token characters, for recognising "type/subtype".
_MEDIA_TYPE_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+/[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Header unfolding (RFC 5322 section 2.2.3): a line break followed by white space is removed.
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
_WS = " \t\r\n"
_PARAM_SEPARATORS = ";" + _WS
_NAME_STOP = '=;"' + _WS


def _empty_params() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ContentType:
    """A parsed Content-Type: lower-cased ``media_type`` and lower-cased parameter names."""

    media_type: str
    params: Mapping[str, str] = field(default_factory=_empty_params)

    def param(self, name: str) -> str | None:
        """The value of parameter ``name`` (matched case-insensitively), or None."""
        return self.params.get(name.lower())


def _skip(s: str, i: int, chars: str) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _until(s: str, i: int, stops: str) -> int:
    while i < len(s) and s[i] not in stops:
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Read a quoted string whose opening quote is just before ``i``; resolve backslash escapes.

    An unterminated string runs to the end of the value rather than failing.
    """
    out: list[str] = []
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def parse_content_type(value: str) -> ContentType:
    """Parse a Content-Type header value; never raises.

    Accepted sloppiness (R8): folded lines, unquoted values, parameters separated by white space
    instead of ``;``, a trailing ``;``, white space around ``=``, mixed-case names.  When a
    parameter repeats, the first occurrence wins (as in the standard library's ``email``).
    """
    s = _FOLD_RE.sub("", value)
    n = len(s)
    i = _skip(s, 0, _WS)
    media_type = ""
    j = _until(s, i, _PARAM_SEPARATORS)
    first = s[i:j]
    if "=" not in first:
        # Not a parameter, so it is the media type position; keep it only if it looks like one.
        if _MEDIA_TYPE_RE.fullmatch(first):
            media_type = first.lower()
        i = j
    params: dict[str, str] = {}
    while i < n:
        i = _skip(s, i, _PARAM_SEPARATORS)
        if i >= n:
            break
        j = _until(s, i, _NAME_STOP)
        name = s[i:j].lower()
        i = _skip(s, j, _WS)
        if i < n and s[i] == "=":
            i = _skip(s, i + 1, _WS)
            if i < n and s[i] == '"':
                val, i = _quoted(s, i + 1)
            else:
                j = _until(s, i, _PARAM_SEPARATORS)
                val, i = s[i:j], j
            if name and name not in params:
                params[name] = val
        elif not name and i < n:
            # A stray quote: skip the quoted junk (also guarantees progress).
            _, i = _quoted(s, i + 1)
        # else: a bare word without "=" (e.g. a lone token); ignore it and go on.
    return ContentType(media_type, MappingProxyType(params))


#: The media types a SOAP request may have: SOAP 1.2's own (SOAP 1.2 Part 2 section 7.1.4,
#: dsm-and-stack.md section 3), and MTOM's package (R8), whose ``type`` must be XOP.
SOAP_MEDIA_TYPE = "application/soap+xml"
MTOM_MEDIA_TYPE = "multipart/related"
XOP_MEDIA_TYPE = "application/xop+xml"
#: SOAP 1.1's media type.  Such a request is let through so that the core answers it with the
#: SOAP/1.1 VersionMismatch fault and its Upgrade header (SOAP 1.2 Part 1 Appendix A, R2), the
#: one answer that tells a SOAP 1.1 client what to do.  It is no forgery risk: a browser may
#: send ``text/xml`` to another site only after a CORS preflight, which the server never grants.
SOAP11_MEDIA_TYPE = "text/xml"


#: Clients send the same few Content-Type values over and over: parsing one was ~9 us of each
#: small request (issue 20).  Bounded; the answer depends on the value alone.
@functools.lru_cache(maxsize=64)
def soap_media_type_refusal(value: str | None) -> str | None:
    """Why a request with this Content-Type is not a SOAP request (one short line, for an
    HTTP 415), or None when it is one.

    Why the server insists (issue 14): a web page on another site can make a browser POST
    ``text/plain``, ``application/x-www-form-urlencoded`` or ``multipart/form-data`` anywhere
    without asking first, but never ``application/soap+xml``; scanners and management clients
    always send the SOAP or MTOM type.  The parse is the tolerant one above (R8).
    """
    if value is None or not value.strip():
        return f"No Content-Type: a SOAP request is {SOAP_MEDIA_TYPE}."
    ctype = parse_content_type(value)
    if ctype.media_type in (SOAP_MEDIA_TYPE, SOAP11_MEDIA_TYPE):
        return None
    if ctype.media_type == MTOM_MEDIA_TYPE:
        if (ctype.param("type") or "").strip().lower() == XOP_MEDIA_TYPE:
            return None
        return f'A multipart SOAP request (MTOM) must have type="{XOP_MEDIA_TYPE}".'
    shown = ctype.media_type or "an unreadable Content-Type"
    return (
        f"{shown} is not a SOAP request: send {SOAP_MEDIA_TYPE} "
        f'(or {MTOM_MEDIA_TYPE}; type="{XOP_MEDIA_TYPE}").'
    )
