"""psp:PostScanInstructions and the three filter instruction schemas (R6, R9; PostScan.xsd,
bdsrr-fsf.xsd, bdsrr-emlf.xsd, bdsrr-spf.xsd).

The outer structure (ContinueOnError?, DocumentRootName, FiltersToProcess with Filter+ each with a
Dialect) is an argument of CreatePostScanJob: getting it wrong is InvalidArgs.  What is inside one
filter's psp:Instructions is that filter's business: a dialect the repository does not offer, or
instructions that do not parse, cancel that filter with reason InvalidArgs (R6).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names
from .args import Args, Item
from .model import (
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Instructions,
    SharePointInstructions,
)
from .xmlread import Element, children, parse_bool, simple_text, split


@dataclass(frozen=True, slots=True)
class PostScanInstructions:
    continue_on_error: bool
    document_root_name: str
    filters: tuple[FilterStatus, ...]

    @property
    def any_usable(self) -> bool:
        return any(f.state is FilterState.PENDING for f in self.filters)


def read_post_scan_instructions(
    el: Element, args: Args, offered: tuple[str, ...]
) -> PostScanInstructions:
    found = args.sequence(
        el,
        names.PSP,
        (
            Item("ContinueOnError", 0),
            Item("DocumentRootName"),
            Item("FiltersToProcess"),
        ),
        allow_other=True,
    )
    continue_on_error = (
        args.boolean(found["ContinueOnError"][0]) if found["ContinueOnError"] else False
    )
    # String255 with whiteSpace="preserve"; R3 trims only non-string simple values.
    root_name = args.text(found["DocumentRootName"][0], trim=False)
    filter_list = args.sequence(
        found["FiltersToProcess"][0], names.PSP, (Item("Filter", 1, 2**31),), allow_other=True
    )["Filter"]
    filters = []
    for filter_el in filter_list:
        parts = args.sequence(
            filter_el, names.PSP, (Item("Dialect"), Item("Instructions")), allow_other=True
        )
        dialect = names.canonical_uri(args.text(parts["Dialect"][0], max_length=2048))
        if not dialect:
            raise args.invalid(names.PSP, "Dialect")
        filters.append(_filter_status(dialect, parts["Instructions"][0], offered))
    return PostScanInstructions(continue_on_error, root_name.strip() or "Scan", tuple(filters))


def _filter_status(
    dialect: str, instructions_el: Element, offered: tuple[str, ...]
) -> FilterStatus:
    parsed: Instructions | None = None
    if dialect in offered:
        try:
            parsed = parse_filter_instructions(dialect, instructions_el)
        except ValueError:
            parsed = None
    if parsed is None:
        return FilterStatus(dialect, FilterState.CANCELED, (FilterStateReason.INVALID_ARGS,))
    return FilterStatus(dialect, FilterState.PENDING, (), parsed)


def parse_filter_instructions(dialect: str, instructions_el: Element) -> Instructions:
    """Parse psp:Instructions of a known dialect; ValueError if they do not parse."""
    configs = [c for c in children(instructions_el)]
    if len(configs) != 1:
        raise ValueError("psp:Instructions must hold exactly one filter configuration")
    config = configs[0]
    ns, local = split(config.tag)
    if dialect == names.FSF and (ns, local) == (names.FSF, "FileShareConfig"):
        shares = _texts(_child(config, names.FSF, "FileShares"), names.FSF, "ShareUNC", 255)
        if not shares:
            raise ValueError("no ShareUNC")
        return FileShareInstructions(tuple(shares))
    if dialect == names.EMLF and (ns, local) == (names.EMLF, "EmailConfig"):
        to_user_el = _child(config, names.EMLF, "SendToScanUser")
        to_user = parse_bool(simple_text(to_user_el)) if to_user_el is not None else False
        addresses_el = _child(config, names.EMLF, "SendToAddresses")
        addresses = _texts(addresses_el, names.EMLF, "EmailAddress", 255)
        can_add = False
        if addresses_el is not None:
            raw = addresses_el.get(f"{{{names.EMLF}}}CanAddAddresses")
            can_add = parse_bool(raw.strip()) if raw is not None else False
        if not to_user and not addresses:
            raise ValueError("no recipient")
        return EmailInstructions(to_user, tuple(addresses), can_add)
    if dialect == names.SPF and (ns, local) == (names.SPF, "SharePointConfig"):
        my_site_el = _child(config, names.SPF, "SaveToMySite")
        my_site = parse_bool(simple_text(my_site_el)) if my_site_el is not None else False
        urls = _texts(
            _child(config, names.SPF, "SaveToSharePointSites"),
            names.SPF,
            "SaveToSharePointSiteURL",
            2048,
        )
        if not urls and not my_site:
            raise ValueError("no SharePoint site")
        return SharePointInstructions(my_site, tuple(urls))
    raise ValueError("instructions do not match the dialect")


def _child(el: Element, ns: str, local: str) -> Element | None:
    for child in children(el):
        if split(child.tag) == (ns, local):
            return child
    return None


def _texts(parent: Element | None, ns: str, local: str, max_length: int) -> list[str]:
    if parent is None:
        return []
    values = []
    for child in children(parent):
        if split(child.tag) == (ns, local):
            value = simple_text(child)
            if not value or len(value) > max_length:
                raise ValueError(f"invalid {local}")
            values.append(value)
    return values
