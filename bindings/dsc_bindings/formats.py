"""Which WS-Scan document format (dsm-and-stack §1.4) a file is sent as, and whether its content
agrees: ``dsc scan`` picks the format from the file name, and warns when the first bytes say
otherwise (a server files it under the wrong extension, and a reader cannot open it)."""

from __future__ import annotations

from pathlib import Path

from dsc_core.model import DOCUMENT_FORMATS

__all__ = ["FORMATS_BY_EXTENSION", "VALID_FORMATS", "format_for", "sniff"]

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
