"""Hardened XML parsing and the R3 rules for reading simple values.

The parser never resolves entities, never loads a DTD, never touches the network, and the bytes it
sees are already bounded by ``Limits.max_envelope_bytes``; after parsing, a DTD, an entity
reference or a processing instruction anywhere is refused (R4 step 1), and so is a tree deeper or
larger than the limits (R12).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator

from lxml import etree

from . import faults, names
from .config import Limits

Element = etree._Element

_XML_WS = " \t\r\n"


#: The one parser, reused (making one per request was about 1 us of each).  lxml keeps a lock
#: in a parser's context: a thread that parses while another does waits for it.
_PARSER = etree.XMLParser(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    remove_blank_text=False,
    remove_comments=True,
    collect_ids=False,
)


def parse_document(data: bytes, limits: Limits) -> Element:
    """Parse one envelope; any problem is an ``env:Sender`` fault without subcode (R4 step 1)."""
    root = parse_xml(data, limits)
    check_tree(root, limits)
    return root


def parse_xml(data: bytes, limits: Limits) -> Element:
    """The well-formedness half of :func:`parse_document`: size, DTD, syntax.  The tree is not
    yet checked for processing instructions, entities, depth or size (:func:`check_tree`)."""
    if len(data) > limits.max_envelope_bytes:
        raise faults.malformed(
            f"The SOAP envelope exceeds the limit of {limits.max_envelope_bytes} bytes."
        )
    if not data.strip():
        raise faults.malformed("The request has no SOAP envelope.")
    # A DTD is refused before parsing: even an unused internal subset may declare entities.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise faults.malformed("A DTD or entity declaration is not allowed.")
    try:
        root = etree.fromstring(data, _PARSER)
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise faults.malformed("The message is not well-formed XML.") from exc
    if root is None:
        raise faults.malformed("The message is not well-formed XML.")
    if root.getroottree().docinfo.internalDTD is not None:
        # The byte check above misses a DTD in another encoding (UTF-16, UTF-32).
        raise faults.malformed("A DTD or entity declaration is not allowed.")
    return root


def check_tree(root: Element, limits: Limits) -> None:
    """Refuse processing instructions, entity references, and trees over the element or depth
    limits (R12), with the fault the full walk (:func:`_walk_tree`) names."""
    # Fast path for the usual small envelope (profiled: the walk was 25 us of a 12-element
    # request): a tree of no more nodes than either limit can be neither too deep nor too large,
    # so counting its nodes up to that bound and looking for a PI or entity settles it, both
    # in lxml's C iteration (a loop in Python over the nodes was ~4 us of each request).
    small = min(limits.max_xml_depth, limits.max_xml_elements)
    if (
        len(list(itertools.islice(root.iter(), small + 1))) <= small
        and next(root.iter(etree.ProcessingInstruction, etree.Entity), None) is None
        and root.getprevious() is None
        and root.getnext() is None
    ):
        return
    _walk_tree(root, limits)


def _walk_tree(root: Element, limits: Limits) -> None:
    count = 0
    # Iterative walk with explicit depth so that a deep tree cannot exhaust the Python stack.
    stack: list[tuple[Element, int]] = [(root, 1)]
    # Processing instructions before or after the root element are siblings of it.
    for sibling in list(root.itersiblings(preceding=True)) + list(root.itersiblings()):
        if isinstance(sibling, etree._ProcessingInstruction):
            raise faults.malformed("A processing instruction is not allowed.")
    while stack:
        node, depth = stack.pop()
        if isinstance(node, etree._ProcessingInstruction):
            raise faults.malformed("A processing instruction is not allowed.")
        if isinstance(node, etree._Entity):
            raise faults.malformed("An entity reference is not allowed.")
        if not isinstance(node.tag, str):
            continue
        count += 1
        if count > limits.max_xml_elements:
            raise faults.malformed(f"The message has more than {limits.max_xml_elements} elements.")
        if depth > limits.max_xml_depth:
            raise faults.malformed(
                f"The message is nested deeper than {limits.max_xml_depth} levels."
            )
        for child in node:
            stack.append((child, depth + 1))


# --- Element helpers ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2048)  # a request reads ~20 tags, nearly always the same ones
def split(tag: object) -> tuple[str | None, str]:
    """(namespace, local) of an element tag, with R2's https spelling folded."""
    if not isinstance(tag, str):
        return (None, "")
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return (names.canonical_ns(ns), local)
    return (None, tag)


def children(el: Element) -> Iterator[Element]:
    """Child elements only (comments were removed by the parser, PIs are refused); filtered
    in lxml's C iteration (a generator here was ~0.4 us per call, 17 calls a request)."""
    return el.iterchildren(etree.Element)


def has_children(el: Element) -> bool:
    return len(el) > 0 and any(True for _ in children(el))


def trimmed(text: str | None) -> str:
    """R3: XML white space (space, tab, CR, LF) trimmed at both ends."""
    return (text or "").strip(_XML_WS)


def simple_text(el: Element) -> str:
    """The text of a simple-valued element, trimmed; None if it has element content."""
    if has_children(el):
        raise ValueError("element content where a simple value was expected")
    return trimmed(el.text)


_QNAME = re.compile(r"^(?:([A-Za-z_][\w.\-]*):)?([A-Za-z_][\w.\-]*)$")


def resolve_qname(el: Element, value: str) -> tuple[str, str]:
    """R3: a QName is its (namespace, local name); an unbound prefix is a ValueError."""
    match = _QNAME.match(value)
    if match is None:
        raise ValueError(f"not a QName: {value!r}")
    prefix, local = match.group(1), match.group(2)
    tag = el.tag
    if prefix is not None and prefix == el.prefix and isinstance(tag, str) and tag[:1] == "{":
        # The usual case (dsc:Name holding "dsc:..."): the element's own prefix is bound to
        # its own namespace, without building ``nsmap`` (profiled: ~10 us a call).
        ns: str | None = tag[1 : tag.index("}")]
    else:
        ns = el.nsmap.get(prefix)
    if ns is None:
        if prefix is not None:
            raise ValueError(f"unbound prefix {prefix!r}")
        ns = ""
    return (names.canonical_ns(ns) or "", local)


def parse_bool(value: str) -> bool:
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ValueError(f"not an xs:boolean: {value!r}")


_INT = re.compile(r"^[+-]?[0-9]+$")


def parse_int(value: str, *, minimum: int) -> int:
    if not _INT.match(value):
        raise ValueError(f"not an integer: {value!r}")
    number = int(value)
    if number < minimum or number > 2**31 - 1:  # xs:int
        raise ValueError(f"integer out of range: {number}")
    return number
