"""Incremental decoding of a MIME part's ``Content-Transfer-Encoding`` (RFC 2045 section 6).

A SendImage's image part may arrive base64 or quoted-printable encoded (issue 16).  Filing the
encoded text as the image would acknowledge one thing and keep another (DPWS R0036/R0037), so
the part is either decoded or refused.  The decoders are fed the part's bytes in chunks of any
size, as :class:`dsc_core.mime.MultipartReader` yields them, and return the decoded bytes at
once: between feeds they hold back only an incomplete base64 quantum (at most 3 characters) or
the tail of a quoted-printable line that may still turn into a soft line break, an ``=XX``
escape or trailing white space (bounded by ``_MAX_QP_HOLD``), so memory stays flat in the
image size (R8).

docs/rulings.md "Transfer-encoded MIME parts": 7bit, 8bit and binary are identity encodings
(RFC 2045 section 6.2: they only declare what the data holds); base64 and quoted-printable are
decoded strictly (a character outside the encoding, or data after the base64 padding, is
refused rather than skipped as RFC 2045 section 6.8 allows: skipping would file an image other
than the one sent); any other encoding is refused.
"""

from __future__ import annotations

import binascii
import re
from typing import Protocol

__all__ = [
    "IDENTITY_ENCODINGS",
    "PartDecoder",
    "TransferEncodingError",
    "decoder_for",
]

#: RFC 2045 section 6.2: these declare the data's range, not an encoding.
IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
#: White space RFC 2045 section 6.8 lets base64 lines carry (line breaks, transport padding).
_B64_WHITESPACE = b" \t\r\n"
#: The longest run of white space (or a pending ``=``) a quoted-printable line may end with
#: before we refuse it; RFC 2045 section 6.7 rule 5 limits lines to 76 characters.
_MAX_QP_HOLD = 8192
_QP_TRAILING_SPACE = re.compile(rb"[ \t]+(?=\r?\n)")
_QP_BAD_ESCAPE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r?\n)")


class TransferEncodingError(Exception):
    """The part's transfer encoding is not one we decode, or its content is not valid in it;
    ``reason`` is one English sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PartDecoder(Protocol):
    """Feed a part's encoded bytes, get decoded bytes; ``close`` at the part's end."""

    def feed(self, data: bytes) -> bytes: ...

    def close(self) -> bytes: ...


def decoder_for(header: str | None) -> PartDecoder | None:
    """The decoder for a ``Content-Transfer-Encoding`` header value (case-insensitive, RFC 2045
    section 6.1), or None for an identity encoding or no header (RFC 2045 section 6.1: the
    default is 7bit).  Raises :class:`TransferEncodingError` for any other encoding."""
    name = "7bit" if header is None else header.strip().lower()
    if name in IDENTITY_ENCODINGS:
        return None
    if name == "base64":
        return Base64Decoder()
    if name == "quoted-printable":
        return QuotedPrintableDecoder()
    raise TransferEncodingError(
        f"The Content-Transfer-Encoding {name!r} is not supported; "
        "send the part binary (as MTOM does), base64 or quoted-printable."
    )


class Base64Decoder:
    """RFC 2045 section 6.8, strictly: white space is skipped, anything else outside the
    alphabet is refused, ``=`` pads only the last quantum."""

    def __init__(self) -> None:
        self._carry = b""  # an incomplete quantum (at most 3 characters)
        self._padded = False

    def feed(self, data: bytes) -> bytes:
        clean = data.translate(None, _B64_WHITESPACE)
        if not clean:
            return b""
        if self._padded:
            raise TransferEncodingError("The base64 content goes on after its final '=' padding.")
        clean = self._carry + clean
        whole = len(clean) - len(clean) % 4
        self._carry = clean[whole:]
        if not whole:
            return b""
        quanta = clean[:whole]
        pad = quanta.find(b"=")
        if pad >= 0:
            # "=" pads only the last quantum of the content (RFC 2045 section 6.8).
            if pad < whole - 4 or self._carry:
                raise TransferEncodingError(
                    "The base64 content goes on after its final '=' padding."
                )
            self._padded = True
        try:
            decoded = binascii.a2b_base64(quanta, strict_mode=True)
        except binascii.Error as exc:
            raise TransferEncodingError(f"The base64 content is not valid ({exc}).") from None
        return decoded

    def close(self) -> bytes:
        if self._carry:
            raise TransferEncodingError(
                "The base64 content ends inside a 4-character group: it was cut short."
            )
        return b""


class QuotedPrintableDecoder:
    """RFC 2045 section 6.7: ``=XX`` escapes, soft line breaks (``=`` at a line's end, also
    before transport padding), trailing white space of a line removed; hard line breaks
    (CRLF, or a bare LF) are kept as they are.  An ``=`` that starts neither is refused (rule
    1 lets a decoder keep it; we do not file bytes the sender may not have meant)."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._held + data
        keep = _undecided_tail(buffer)
        if keep > _MAX_QP_HOLD:
            raise TransferEncodingError(
                f"A quoted-printable line ends in more than {_MAX_QP_HOLD} characters of white "
                "space (RFC 2045 section 6.7 limits lines to 76 characters)."
            )
        self._held = buffer[len(buffer) - keep :]
        return _decode_qp(buffer[: len(buffer) - keep])

    def close(self) -> bytes:
        # The part's last line has no line break (the boundary's belongs to the delimiter):
        # its trailing white space is transport padding too (rule 3).
        tail = self._held.rstrip(b" \t")
        self._held = b""
        if tail.endswith(b"=") or tail[-2:-1] == b"=":
            raise TransferEncodingError(
                "The quoted-printable content ends inside an '=XX' escape: it was cut short."
            )
        return _decode_qp(tail)


def _undecided_tail(buffer: bytes) -> int:
    """How many bytes at the end of ``buffer`` may still change meaning with what follows:
    trailing white space and a CR (a line break may follow), then a pending ``=`` or ``=X``."""
    end = len(buffer)
    while end and buffer[end - 1] in b" \t\r":
        end -= 1
    if buffer[end - 1 : end] == b"=":
        end -= 1
    elif end == len(buffer) and buffer[end - 2 : end - 1] == b"=":
        end -= 2
    return len(buffer) - end


def _decode_qp(segment: bytes) -> bytes:
    segment = _QP_TRAILING_SPACE.sub(b"", segment)
    if b"=" not in segment:
        return segment
    bad = _QP_BAD_ESCAPE.search(segment)
    if bad is not None:
        sample = segment[bad.start() : bad.start() + 3]
        raise TransferEncodingError(
            f"The quoted-printable content has {sample!r}, which is neither an '=XX' escape "
            "nor a soft line break."
        )
    # Every "=" now starts an escape or a soft line break, which is all a2b_qp changes.
    return binascii.a2b_qp(segment)
