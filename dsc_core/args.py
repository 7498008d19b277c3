"""Reading operation arguments against the schema's content models (R4 step 6).

A schema ``xs:sequence`` is matched in order: a missing required element, an element the model
does not allow (an "extra" argument: one in the schema's own namespace, or without a namespace,
that the sequence does not name, or one out of order) and a value of the wrong type or over its
length all raise the service's InvalidArgs fault whose Detail names the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import faults, names
from .xmlread import Element, children, parse_bool, parse_int, resolve_qname, simple_text, split

_PREFIX_OF = {ns: prefix for prefix, ns in names.PREFIXES.items()}
_PREFIX_OF.update({names.FSF: "fsf", names.EMLF: "emlf", names.SPF: "spf", names.XOP: "xop"})


def label(ns: str | None, local: str) -> str:
    """A readable QName for fault details, with the conventional prefix."""
    prefix = _PREFIX_OF.get(ns or "")
    return f"{prefix}:{local}" if prefix else local


def request_element(
    body: Element, ns: str, *locals_: str, fault_ns: str | None = None
) -> tuple[Element, Args]:
    """The Body's single request element, one of ``locals_`` in ``ns`` (R4 step 6), and the
    reader for its arguments, whose InvalidArgs faults are the ``fault_ns`` service's (default
    ``ns``: dsp or dsc; a vendor element in ``names.EXT`` answers with its service's faults)."""
    args = Args(fault_ns or ns)
    body_children = list(children(body))
    if not body_children:
        raise args.invalid(ns, locals_[0])
    payload = body_children[0]
    if split(payload.tag) not in [(ns, local) for local in locals_]:
        raise args.invalid(*split(payload.tag))
    if len(body_children) > 1:
        raise args.invalid(*split(body_children[1].tag))
    return payload, args


@dataclass(frozen=True, slots=True)
class Item:
    """One ``xs:element`` of a sequence: its local name and occurrence bounds."""

    local: str
    min: int = 1
    max: int = 1


#: RequestedElements' content model (R5): one or more Name (built once: ~0.3 us each time).
_NAMES = (Item("Name", 1, 2**31),)


class Args:
    """Argument reader for one hosted service (``fault_ns`` is dsp or dsc)."""

    def __init__(self, fault_ns: str) -> None:
        self.fault_ns = fault_ns

    def invalid(self, ns: str | None, local: str) -> faults.SoapFault:
        return faults.invalid_args(self.fault_ns, (ns or "", local), label(ns, local))

    def sequence(
        self, parent: Element, ns: str, items: tuple[Item, ...], *, allow_other: bool
    ) -> dict[str, list[Element]]:
        """Match the children of ``parent`` to ``items`` (all in namespace ``ns``).

        ``allow_other`` is the trailing ``xs:any namespace="##other"`` of most types: elements
        of another (non-empty) namespace are skipped as vendor extensions.
        """
        found: dict[str, list[Element]] = {item.local: [] for item in items}
        position = 0
        for child in children(parent):
            child_ns, local = split(child.tag)
            if child_ns != ns:
                if allow_other and child_ns:
                    continue
                raise self.invalid(child_ns, local)
            while position < len(items) and items[position].local != local:
                position += 1
            if position == len(items):
                raise self.invalid(child_ns, local)  # unknown, or out of schema order
            item = items[position]
            found[local].append(child)
            if len(found[local]) > item.max:
                raise self.invalid(child_ns, local)
        for item in items:
            if len(found[item.local]) < item.min:
                raise self.invalid(ns, item.local)
        return found

    def empty(self, parent: Element, ns: str) -> None:
        """A request type whose content is only ``##other`` elements (GetActiveJobsRequest)."""
        self.sequence(parent, ns, (), allow_other=True)

    def text(self, el: Element, *, max_length: int | None = 255, trim: bool = True) -> str:
        ns, local = split(el.tag)
        try:
            value = simple_text(el)
        except ValueError:
            raise self.invalid(ns, local) from None
        if not trim:
            value = el.text or ""
        if max_length is not None and len(value) > max_length:
            raise self.invalid(ns, local)
        return value

    def token(self, el: Element) -> str:
        """A JobToken: String255 (whiteSpace preserve in the schema, but R3 trims tokens)."""
        value = self.text(el)
        if not value:
            raise self.invalid(*split(el.tag))
        return value

    def boolean(self, el: Element) -> bool:
        try:
            return parse_bool(self.text(el))
        except ValueError:
            raise self.invalid(*split(el.tag)) from None

    def integer(self, el: Element, *, minimum: int) -> int:
        try:
            return parse_int(self.text(el), minimum=minimum)
        except ValueError:
            raise self.invalid(*split(el.tag)) from None

    def requested_names(self, el: Element, ns: str, limit: int) -> list[tuple[str, str]]:
        """R5: the QNames of a RequestedElements, at most ``limit`` of them."""
        found = self.sequence(el, ns, _NAMES, allow_other=False)["Name"]
        if len(found) > limit:
            raise self.invalid(ns, "Name")
        return [self.qname(n) for n in found]

    def qname(self, el: Element) -> tuple[str, str]:
        """R3: resolved by namespace; an unbound prefix is an invalid argument."""
        try:
            return resolve_qname(el, self.text(el))
        except ValueError:
            raise self.invalid(*split(el.tag)) from None
