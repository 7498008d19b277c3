"""An incremental ``multipart/related`` reader for MTOM/XOP request bodies (R8, R12).

SendImage carries the image as a separate MIME part (dsm-and-stack.md section 3, "MTOM/XOP").
R8 requires the image to be streamed with memory that does not grow with its size, so this
reader is fed the body in chunks of any size and emits events as soon as bytes are certainly
not part of a boundary delimiter.  Between feeds it holds back at most about
``len(b"\\r\\n--" + boundary)`` bytes of part body; it never accumulates a part.

Grammar (RFC 2046 section 5.1.1, made tolerant as R8 asks):

* The delimiter is CRLF ``--boundary``; a bare LF ``--boundary`` is accepted too (the
  hardware-docs example in dsm-and-stack.md section 1.5 uses LF line ends).  With a bare LF only
  the LF is stripped from the part body; with CRLF both are.
* ``--boundary`` is also a delimiter at the very start of the body and right after a part's
  header block (there the header block's last line break doubles as the delimiter's).
* After the boundary: ``--`` (closing delimiter), or optional spaces/tabs then CRLF or LF.
  Anything else means the boundary occurs inside a part, which RFC 2046 forbids; we refuse it.
* Part headers end at an empty line or, tolerated, a line of only spaces/tabs (the example has a
  single space there).  Continuation lines are folded into the previous header.
* Everything after the closing delimiter (the epilogue) is dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .content_type import ContentType, parse_content_type

__all__ = [
    "MultipartError",
    "MultipartReader",
    "PartData",
    "PartEnd",
    "PartEvent",
    "PartStart",
]

_CR = 0x0D
_LF = 0x0A
_PADDING = b" \t"
#: Longest boundary we accept.  RFC 2046 allows 70 characters (the hardware-docs example uses
#: exactly 70); we are more lenient, and this cap only keeps the hold-back buffer small.
_MAX_BOUNDARY_BYTES = 256
#: Transport padding allowed after a boundary (RFC 2046 gives no limit; we need one).
_MAX_PADDING_BYTES = 1024


class MultipartError(Exception):
    """The body is not a multipart body we can read; ``reason`` is one English sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Events completed in the failing feed() before the error, so that the caller sees the
        #: same events whatever the chunk sizes were.
        self.events: list[PartEvent] = []


@dataclass(frozen=True, slots=True)
class PartStart:
    """A part begins; ``headers`` has lower-cased names and unfolded values (last one wins)."""

    headers: Mapping[str, str]

    @property
    def content_id(self) -> str | None:
        """The Content-ID without the surrounding ``<>`` and white space, or None.

        XOP references it as ``cid:`` + this value (percent-encoded, RFC 2392), which the
        caller must decode before comparing.
        """
        raw = self.headers.get("content-id")
        if raw is None:
            return None
        value = raw.strip()
        if value.startswith("<"):
            value = value[1:]
        if value.endswith(">"):
            value = value[:-1]
        value = value.strip()
        return value or None

    @property
    def content_type(self) -> ContentType | None:
        """The part's parsed Content-Type, or None when the part has no such header."""
        raw = self.headers.get("content-type")
        return None if raw is None else parse_content_type(raw)


@dataclass(frozen=True, slots=True)
class PartData:
    """Some bytes of the current part's body (never empty)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    """The current part's body is complete."""


PartEvent = PartStart | PartData | PartEnd


class _State(enum.Enum):
    PREAMBLE = enum.auto()
    AFTER_BOUNDARY = enum.auto()
    HEADERS = enum.auto()
    BODY = enum.auto()
    EPILOGUE = enum.auto()


def _decode_header(line: bytes) -> str:
    # Headers should be ASCII; accept UTF-8 and fall back to latin-1 so decoding never fails.
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return line.decode("latin-1")


class MultipartReader:
    """Sans-IO reader: ``feed()`` body bytes, get ``PartStart``/``PartData``/``PartEnd`` events.

    Any MultipartError is final: later calls raise it again.
    """

    def __init__(
        self,
        boundary: str,
        *,
        max_header_bytes: int = 16384,
        max_preamble_bytes: int = 16384,
    ) -> None:
        try:
            raw = boundary.encode("latin-1")
        except UnicodeEncodeError:
            raw = boundary.encode("utf-8")
        if not raw or len(raw) > _MAX_BOUNDARY_BYTES or b"\r" in raw or b"\n" in raw:
            raise MultipartError(
                "The multipart boundary is empty, longer than 256 bytes or contains a line break."
            )
        self._dash_boundary = b"--" + raw
        # The delimiter searched for inside the stream; a CR just before it is stripped too.
        self._delimiter = b"\n" + self._dash_boundary
        self._max_header_bytes = max_header_bytes
        self._max_preamble_bytes = max_preamble_bytes
        self._buf = bytearray()
        self._state = _State.PREAMBLE
        # True while "--boundary" (without a line break before it) may start the buffer.
        self._at_line_start = True
        self._preamble_bytes = 0
        self._padding_bytes = 0
        self._header_bytes = 0
        self._headers: dict[str, str] = {}
        self._last_header: str | None = None
        self._closed = False
        self._error: MultipartError | None = None

    @property
    def finished(self) -> bool:
        """True once the closing delimiter ``--boundary--`` has been seen."""
        return self._state is _State.EPILOGUE

    @property
    def buffered(self) -> int:
        """Bytes held back because they might begin a delimiter (or a header line)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[PartEvent]:
        """Consume the next chunk of the body and return the events it completes."""
        if self._error is not None:
            raise MultipartError(self._error.reason)
        if self._closed:
            raise MultipartError("Data was fed to the multipart reader after close().")
        if self._state is _State.EPILOGUE:
            return []
        self._buf += data
        events: list[PartEvent] = []
        try:
            while self._step(events):
                pass
        except MultipartError as exc:
            self._error = exc
            self._buf.clear()
            exc.events = events
            raise
        return events

    def close(self) -> list[PartEvent]:
        """Signal the end of the body; raises MultipartError if it was truncated."""
        if self._error is not None:
            raise MultipartError(self._error.reason)
        self._closed = True
        if self._state is _State.EPILOGUE:
            return []
        if self._state is _State.PREAMBLE:
            reason = "The multipart body ended before its first boundary delimiter."
        else:
            reason = "The multipart body ended before its closing boundary delimiter."
        self._error = MultipartError(reason)
        self._buf.clear()
        raise self._error

    # --- state machine ----------------------------------------------------------------------

    def _step(self, events: list[PartEvent]) -> bool:
        """Advance once; return True if another step may make progress."""
        state = self._state
        if state is _State.BODY:
            return self._step_body(events)
        if state is _State.HEADERS:
            return self._step_headers(events)
        if state is _State.AFTER_BOUNDARY:
            return self._step_after_boundary()
        if state is _State.PREAMBLE:
            return self._step_preamble()
        self._buf.clear()  # epilogue: dropped
        return False

    def _find_delimiter(self) -> tuple[int, int] | None:
        """(end of content, end of delimiter) of the first delimiter in the buffer, or None."""
        buf = self._buf
        if self._at_line_start:
            if buf.startswith(self._dash_boundary):
                self._at_line_start = False
                return 0, len(self._dash_boundary)
            if self._dash_boundary.startswith(buf):
                return None  # could still become "--boundary"; wait for more
            self._at_line_start = False
        i = buf.find(self._delimiter)
        if i < 0:
            return None
        start = i - 1 if i > 0 and buf[i - 1] == _CR else i
        return start, i + len(self._delimiter)

    def _safe_end(self) -> int:
        """How many leading bytes certainly belong to no delimiter (after a failed search)."""
        buf = self._buf
        if self._at_line_start:
            return 0  # the whole buffer is a proper prefix of "--boundary"
        n = len(buf)
        end = n
        # The delimiter's only LF is its first byte, so only the last LF can start a partial one.
        nl = buf.rfind(b"\n", max(0, n - len(self._delimiter) + 1))
        if nl >= 0 and self._delimiter.startswith(buf[nl:]):
            end = nl
        if end > 0 and buf[end - 1] == _CR:
            end -= 1  # a CR right before a (possible) delimiter belongs to the delimiter
        return end

    def _step_preamble(self) -> bool:
        found = self._find_delimiter()
        if found is None:
            end = self._safe_end()
            self._count_preamble(end)
            del self._buf[:end]
            return False
        start, stop = found
        self._count_preamble(start)
        del self._buf[:stop]
        self._enter_after_boundary()
        return True

    def _count_preamble(self, n: int) -> None:
        self._preamble_bytes += n
        if self._preamble_bytes > self._max_preamble_bytes:
            raise MultipartError(
                f"The multipart preamble is larger than {self._max_preamble_bytes} bytes."
            )

    def _enter_after_boundary(self) -> None:
        self._state = _State.AFTER_BOUNDARY
        self._padding_bytes = 0

    def _step_after_boundary(self) -> bool:
        buf = self._buf
        if self._padding_bytes == 0 and buf[:1] == b"-":
            if len(buf) < 2:
                return False
            if buf[1] != ord("-"):
                raise MultipartError("A boundary delimiter is followed by unexpected characters.")
            self._state = _State.EPILOGUE
            buf.clear()
            return False
        i = 0
        while i < len(buf) and buf[i] in _PADDING:
            i += 1
        if i:
            self._padding_bytes += i
            del buf[:i]
            if self._padding_bytes > _MAX_PADDING_BYTES:
                raise MultipartError("A boundary delimiter is followed by too much white space.")
        if not buf:
            return False
        if buf[0] == _LF:
            del buf[:1]
        elif buf[0] == _CR:
            if len(buf) < 2:
                return False
            if buf[1] != _LF:
                raise MultipartError("A boundary delimiter is followed by unexpected characters.")
            del buf[:2]
        else:
            raise MultipartError("A boundary delimiter is followed by unexpected characters.")
        self._state = _State.HEADERS
        self._header_bytes = 0
        self._headers = {}
        self._last_header = None
        return True

    def _step_headers(self, events: list[PartEvent]) -> bool:
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            self._check_header_size(len(buf))
            return False
        self._check_header_size(nl + 1)
        self._header_bytes += nl + 1
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip(_PADDING):
            # End of the header block; a white-space-only line is tolerated (dsm-and-stack 1.5).
            events.append(PartStart(MappingProxyType(self._headers)))
            self._state = _State.BODY
            self._at_line_start = True
            return True
        text = _decode_header(line)
        if line[0] in _PADDING:
            if self._last_header is None:
                raise MultipartError("A part's header block starts with a continuation line.")
            folded = self._headers[self._last_header] + " " + text.strip()
            self._headers[self._last_header] = folded.strip()
            return True
        name, colon, value = text.partition(":")
        name = name.strip().lower()
        if not colon or not name or any(c.isspace() for c in name):
            raise MultipartError("A part header line is not of the form 'Name: value'.")
        self._headers[name] = value.strip()
        self._last_header = name
        return True

    def _check_header_size(self, more: int) -> None:
        if self._header_bytes + more > self._max_header_bytes:
            raise MultipartError(
                f"A part's header block is larger than {self._max_header_bytes} bytes."
            )

    def _step_body(self, events: list[PartEvent]) -> bool:
        buf = self._buf
        found = self._find_delimiter()
        if found is None:
            end = self._safe_end()
            if end:
                # One copy via a temporary view (freed at once under CPython, so the del works).
                events.append(PartData(bytes(memoryview(buf)[:end])))
                del buf[:end]
            return False
        start, stop = found
        if start:
            events.append(PartData(bytes(memoryview(buf)[:start])))
        events.append(PartEnd())
        del buf[:stop]
        self._enter_after_boundary()
        return True
