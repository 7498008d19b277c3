"""Which WS-Scan document format (dsm-and-stack §1.4) a file is sent as, and whether its content
agrees: ``dsc scan`` picks the format from the file name, and warns when the first bytes say
otherwise (a server files it under the wrong extension, and a reader cannot open it)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from dsc_core.model import DOCUMENT_FORMATS

__all__ = ["FORMATS_BY_EXTENSION", "VALID_FORMATS", "format_for", "sniff", "tiff_format"]

#: File extension -> the format sent for it.
FORMATS_BY_EXTENSION = {
    ".png": "png",
    ".pdf": "pdf-a",
    ".jpg": "jfif",
    ".jpeg": "jfif",
    ".tif": "tiff-single-uncompressed",
    ".tiff": "tiff-single-uncompressed",
    ".xps": "xps",
    ".bmp": "dib",
    ".jp2": "jpeg2k",
    ".jbg": "jbig",
}

#: Every value ``--format`` accepts, sorted for the help and error texts.
VALID_FORMATS: tuple[str, ...] = tuple(sorted(DOCUMENT_FORMATS))

# (magic prefix, family, the format to suggest).  A family groups the formats one content type
# can be sent as (every tiff-* value is a TIFF; exif and jfif are both JPEG).
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG", "png"),
    (b"%PDF-", "PDF", "pdf-a"),
    (b"\xff\xd8\xff", "JPEG", "jfif"),
    (b"II*\x00", "TIFF", "tiff-single-uncompressed"),
    (b"MM\x00*", "TIFF", "tiff-single-uncompressed"),
    (b"BM", "BMP", "dib"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000", "jpeg2k"),
    (b"\xffO\xffQ", "JPEG 2000", "jpeg2k"),
    (b"PK\x03\x04", "XPS", "xps"),  # a ZIP package; XPS is the only ZIP format here
)


def family_of(fmt: str) -> str | None:
    """The content family a format value belongs to (None: no signature known, e.g. jbig)."""
    if fmt.startswith("tiff-"):
        return "TIFF"
    return {
        "png": "PNG",
        "pdf-a": "PDF",
        "jfif": "JPEG",
        "exif": "JPEG",
        "dib": "BMP",
        "jpeg2k": "JPEG 2000",
        "xps": "XPS",
    }.get(fmt)


def sniff(head: bytes) -> tuple[str, str] | None:
    """(family, suggested format) of content starting with ``head``; None when unknown."""
    for magic, family, fmt in _MAGIC:
        if head.startswith(magic):
            return family, fmt
    return None


#: TIFF Compression tag values (TIFF 6.0 §3, "Compression", tag 259; TechNote 2 for 7) -> the
#: WS-Scan format suffix (dsm-and-stack §1.4 lists these four TIFF codings).
_TIFF_CODINGS = {1: "uncompressed", 2: "g3mh", 3: "g3mh", 4: "g4", 7: "jpeg-tn2"}
_TIFF_COMPRESSION_TAG = 259
#: The largest IFD entry count read (a real IFD has a few dozen entries).
_TIFF_MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class TiffInfo:
    """What the first IFD of a TIFF says: its Compression value and whether more pages follow."""

    compression: int
    pages: str  # "single" or "multi"

    @property
    def format(self) -> str | None:
        """The WS-Scan format, or None when the coding has none (LZW, Deflate, PackBits...)."""
        coding = _TIFF_CODINGS.get(self.compression)
        return f"tiff-{self.pages}-{coding}" if coding else None


def read_tiff(path: Path) -> TiffInfo | None:
    """The first IFD's Compression tag (default 1: none, TIFF 6.0 §8) and whether a second IFD
    follows; None when the file is not a readable classic TIFF."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8 or head[:4] not in (b"II*\x00", b"MM\x00*"):
                return None
            order = "<" if head[:2] == b"II" else ">"
            (offset,) = struct.unpack(order + "I", head[4:])
            f.seek(offset)
            raw_count = f.read(2)
            if len(raw_count) < 2:
                return None
            (count,) = struct.unpack(order + "H", raw_count)
            if count > _TIFF_MAX_ENTRIES:
                return None
            entries = f.read(12 * count + 4)
            if len(entries) < 12 * count + 4:
                return None
    except OSError:
        return None
    compression = 1
    for i in range(count):
        tag, kind, _, value = struct.unpack(order + "HHI4s", entries[12 * i : 12 * i + 12])
        if tag == _TIFF_COMPRESSION_TAG:
            # SHORT (3) sits in the first two bytes of the value field; LONG (4) in all four.
            fmt = "H" if kind == 3 else "I"
            compression = struct.unpack(order + fmt, value[: struct.calcsize(fmt)])[0]
    (next_ifd,) = struct.unpack(order + "I", entries[12 * count :])
    return TiffInfo(compression, "multi" if next_ifd else "single")


def tiff_format(path: Path) -> tuple[str, str | None]:
    """The tiff-* format ``path``'s header says, and a warning when it cannot say one."""
    info = read_tiff(path)
    if info is None:
        return "tiff-single-uncompressed", (
            f"{path.name}: cannot read its TIFF header; sending it as tiff-single-uncompressed "
            "(choose with --format)"
        )
    fmt = info.format
    if fmt is None:
        return f"tiff-{info.pages}-uncompressed", (
            f"{path.name}: its TIFF compression ({info.compression}) has no WS-Scan format; "
            f"sending it as tiff-{info.pages}-uncompressed (choose with --format, or convert it "
            "to uncompressed, G4, G3 or JPEG)"
        )
    return fmt, None


def format_for(path: Path, given: str | None) -> tuple[str, str | None]:
    """The format to send ``path`` as, and a warning when its content disagrees (or None).

    ``given`` is ``--format`` (already checked against :data:`VALID_FORMATS`).  Without it the
    extension decides, then the content; a file recognised by neither is sent as pdf-a with a
    warning that says how to choose.
    """
    with path.open("rb") as f:
        head = f.read(16)
    found = sniff(head)
    fmt = given or FORMATS_BY_EXTENSION.get(path.suffix.lower())
    if found is not None and found[0] == "TIFF" and (fmt is None or fmt.startswith("tiff-")):
        # The Compression tag decides the tiff-* value (a .tif name says nothing about it).
        detected, warning = tiff_format(path)
        if given is None:
            return detected, warning
        if warning is None and given != detected:
            return given, f"{path.name}: sent as {given}, but its TIFF header says {detected}"
        return given, None
    if fmt is None:
        if found is not None:
            return found[1], None
        return "pdf-a", (
            f"{path.name}: cannot tell its format from the name or the content; sending it as "
            "pdf-a (choose with --format)"
        )
    family = family_of(fmt)
    if found is None:
        if family is None:
            return fmt, None
        return fmt, f"{path.name}: sent as {fmt}, but its content is not {family}"
    if family is not None and found[0] != family:
        return fmt, (
            f"{path.name}: sent as {fmt}, but its content looks like {found[0]} "
            f"(use --format {found[1]})"
        )
    return fmt, None
