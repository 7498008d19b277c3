"""SOAP 1.2 envelopes with WS-Addressing: reading requests (R4 steps 1-4) and writing replies.

WS-Addressing 2004/08 is the default; a request in WS-Addressing 1.0 is answered in 1.0 (R2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lxml import etree

from . import faults, names
from .fast_init import fast_init
from .xmlread import Element, children, split, trimmed

_TRUE = ("true", "1")
_OUR_ROLES = (None, names.SOAP + "/role/next", names.SOAP + "/role/ultimateReceiver")
_UNDERSTOOD_WSA = frozenset(
    {"To", "Action", "MessageID", "ReplyTo", "FaultTo", "From", "RelatesTo"}
)


@fast_init
@dataclass(frozen=True, slots=True)
class Addressing:
    """The message information headers of a request."""

    wsa_ns: str = names.WSA
    action: str | None = None
    message_id: str | None = None
    to: str | None = None
    #: wse:Identifier reference parameter (R7: addresses the subscription manager).
    identifier: str | None = None
    #: The wsa:Address of wsa:ReplyTo, None without one (DPWS R0031).
    reply_to: str | None = None
    #: The first of Action, MessageID, To, ReplyTo, FaultTo given more than once (docs/rulings.md,
    #: "Duplicated addressing headers": refused at R4 step 4).
    duplicated: str | None = None

    @property
    def anonymous(self) -> str:
        return names.ANONYMOUS10 if self.wsa_ns == names.WSA10 else names.ANONYMOUS

    @property
    def fault_action(self) -> str:
        return names.FAULT_ACTION10 if self.wsa_ns == names.WSA10 else names.FAULT_ACTION


@fast_init
@dataclass(frozen=True, slots=True)
class Envelope:
    root: Element
    body: Element
    addressing: Addressing
    headers: tuple[Element, ...] = field(default=())

    @property
    def payload(self) -> Element | None:
        """The first element of the Body (the operation's request element)."""
        return next(children(self.body), None)


def read_envelope(root: Element) -> Envelope:
    """Check the envelope in R4 order and read its addressing headers."""
    ns, local = split(root.tag)
    if local != "Envelope":
        raise faults.malformed("The message is not a SOAP Envelope.")
    if ns != names.SOAP:
        raise faults.version_mismatch(ns)  # step 2: another (or no) envelope namespace
    header: Element | None = None
    body: Element | None = None
    for child in children(root):
        cns, clocal = split(child.tag)
        if cns == names.SOAP and clocal == "Header" and header is None and body is None:
            header = child
        elif cns == names.SOAP and clocal == "Body" and body is None:
            body = child
        else:
            raise faults.malformed("The SOAP Envelope holds an unexpected element.")
    if body is None:
        raise faults.malformed("The SOAP Envelope has no Body.")
    headers = tuple(children(header)) if header is not None else ()
    _check_must_understand(headers)
    return Envelope(root, body, _read_addressing(headers), headers)


def salvage_addressing(root: Element) -> Addressing | None:
    """The addressing headers of an envelope refused at R4 steps 1-3 after it parsed (a limit,
    a processing instruction, no Body, another SOAP version, mustUnderstand), so that the fault
    still carries ``wsa:RelatesTo`` (R4: every fault answering a request with a MessageID)."""
    ns, local = split(root.tag)
    if local != "Envelope":  # of any SOAP version: a VersionMismatch relates to it too
        return None
    first = next(children(root), None)
    if first is None or split(first.tag) != (ns, "Header"):
        return None
    return _read_addressing(tuple(children(first)))


def _understood(el: Element) -> bool:
    ns, local = split(el.tag)
    if ns in (names.WSA, names.WSA10):
        return local in _UNDERSTOOD_WSA
    return ns == names.WSE and local == "Identifier"


_MUST_UNDERSTAND = f"{{{names.SOAP}}}mustUnderstand"
_ROLE = f"{{{names.SOAP}}}role"


def _check_must_understand(headers: Iterable[Element]) -> None:
    missing: list[tuple[str, str]] = []
    for el in headers:
        flag = el.get(_MUST_UNDERSTAND)
        if flag is None:
            continue  # the usual header: nothing to check
        flag = trimmed(flag)
        role = el.get(_ROLE)
        role = trimmed(role) if role is not None else None
        if flag in _TRUE and role in _OUR_ROLES and not _understood(el):
            ns, local = split(el.tag)
            missing.append((ns or "", local))
    if missing:
        raise faults.must_understand(tuple(missing))


_ADDRESSING_LOCALS = frozenset({"Action", "MessageID", "To"})
#: Headers WS-Addressing 2004/08 §3 allows at most once in a request.
_AT_MOST_ONCE = frozenset({"Action", "MessageID", "To", "ReplyTo", "FaultTo"})


def _read_addressing(headers: tuple[Element, ...]) -> Addressing:
    # One pass: the first of each header per WS-Addressing version, then the version (R2: a
    # request with any WS-Addressing 1.0 header is answered in 1.0).  Written for the hot path
    # (issue 20, callgrind: ~48k instructions for 4 headers before): the version seen in the
    # loop, the values looked up directly, Addressing built positionally (a keyword call to
    # a class builds a dict).
    found: dict[tuple[str, str], str] = {}
    identifier = None
    duplicated = None
    wsa10 = False
    for el in headers:
        ns, local = split(el.tag)
        if ns == names.WSA or ns == names.WSA10:
            if ns == names.WSA10:
                wsa10 = True
            key = (ns, local)
            if key in found:
                if local in _AT_MOST_ONCE and duplicated is None:
                    duplicated = local
            elif local in _ADDRESSING_LOCALS:
                found[key] = trimmed(el.text)
            elif local == "ReplyTo":
                found[key] = _address_of(el)
            else:  # another header: it still says which version the request speaks (R2)
                found[key] = ""
        elif ns == names.WSE and local == "Identifier" and identifier is None:
            identifier = trimmed(el.text)
    wsa_ns = names.WSA10 if wsa10 else names.WSA
    action = found.get((wsa_ns, "Action"))
    return Addressing(
        wsa_ns,
        names.canonical_uri(action) if action else None,
        found.get((wsa_ns, "MessageID")) or None,
        found.get((wsa_ns, "To")) or None,
        identifier,
        found.get((wsa_ns, "ReplyTo")),
        duplicated,
    )


def _address_of(epr: Element) -> str:
    for child in children(epr):
        if split(child.tag)[1] == "Address":
            return trimmed(child.text)
    return ""


def check_reply_endpoint(addressing: Addressing) -> None:
    """R4 step 4, after the Action: a duplicated header (docs/rulings.md), and DPWS R0031: the
    reply to an HTTP request goes back on its connection, so a [reply endpoint] that is not
    anonymous is refused rather than ignored."""
    if addressing.duplicated is not None:
        raise faults.invalid_header(
            addressing.wsa_ns,
            f"wsa:{addressing.duplicated}",
            f"the request has more than one wsa:{addressing.duplicated} header",
        )
    if addressing.reply_to is not None and addressing.reply_to not in (
        names.ANONYMOUS,
        names.ANONYMOUS10,
    ):
        raise faults.invalid_header(
            addressing.wsa_ns,
            "wsa:ReplyTo",
            f"replies are sent only on the HTTP connection (anonymous), not to "
            f"{addressing.reply_to[:200]}",
        )


# --- Writing ---------------------------------------------------------------------------------


def text_bytes(value: str) -> bytes:
    """``value`` as :func:`serialize` writes it as element text (UTF-8; &, <, > and CR
    escaped): the bytes a reply's template or size stands in for."""
    if "&" in value or "<" in value or ">" in value or "\r" in value:
        value = (
            value.replace("&", "&amp;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
            .replace("\r", "&#13;")
        )
    return value.encode("utf-8")


def serialize(root: Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="utf-8")


def new_envelope(
    wsa_ns: str, nsmap: dict[str, str] | None = None
) -> tuple[Element, Element, Element]:
    """An empty envelope: (root, header, body).  ``nsmap`` declares extra prefixes at the root
    so that QName values written in the body can use them (R3)."""
    full: dict[str, str] = {"soap": names.SOAP, "wsa": wsa_ns}
    for prefix, uri in (nsmap or {}).items():
        full.setdefault(prefix, uri)
    root = etree.Element(f"{{{names.SOAP}}}Envelope", nsmap=full)
    header = etree.SubElement(root, f"{{{names.SOAP}}}Header")
    body = etree.SubElement(root, f"{{{names.SOAP}}}Body")
    return root, header, body


def add_reply_headers(
    header: Element, addressing: Addressing, action: str, message_id: str
) -> None:
    """R4: To anonymous, Action, a fresh MessageID and RelatesTo the request's MessageID."""
    wsa = addressing.wsa_ns
    etree.SubElement(header, f"{{{wsa}}}To").text = addressing.anonymous
    etree.SubElement(header, f"{{{wsa}}}Action").text = action
    etree.SubElement(header, f"{{{wsa}}}MessageID").text = message_id
    if addressing.message_id:
        etree.SubElement(header, f"{{{wsa}}}RelatesTo").text = addressing.message_id


def reply_envelope(
    addressing: Addressing,
    action: str,
    message_id: str,
    payload: Element | None,
    nsmap: dict[str, str] | None = None,
    headers: tuple[Element, ...] = (),
) -> bytes:
    """A reply: the R4 addressing headers, then ``headers``; ``payload`` None is an empty
    Body."""
    root, header, body = new_envelope(addressing.wsa_ns, nsmap)
    add_reply_headers(header, addressing, action, message_id)
    for block in headers:
        header.append(block)
    if payload is not None:
        body.append(payload)
    return serialize(root)


def fault_envelope(fault: faults.SoapFault, addressing: Addressing, message_id: str) -> bytes:
    if fault.soap11:
        return _soap11_version_mismatch(fault, addressing, message_id)
    nsmap: dict[str, str] = {}
    if fault.subcode is not None:
        nsmap[_prefix_for(fault.subcode[0])] = fault.subcode[0]
    detail_ns = _detail_namespaces(fault.detail, addressing.wsa_ns)
    for ns in detail_ns:
        nsmap.setdefault(_prefix_for(ns), ns)
    for i, (ns, _local) in enumerate(fault.not_understood):
        nsmap.setdefault(f"nu{i}", ns)
    root, header, body = new_envelope(addressing.wsa_ns, nsmap)
    add_reply_headers(header, addressing, addressing.fault_action, message_id)
    if fault.code == faults.VERSION_MISMATCH:
        _upgrade(header, "soap")
    for i, (ns, local) in enumerate(fault.not_understood):
        nu = etree.SubElement(header, f"{{{names.SOAP}}}NotUnderstood")
        nu.set("qname", f"{_find_prefix(root, ns, f'nu{i}')}:{local}")
    fault_el = etree.SubElement(body, f"{{{names.SOAP}}}Fault")
    code = etree.SubElement(fault_el, f"{{{names.SOAP}}}Code")
    etree.SubElement(code, f"{{{names.SOAP}}}Value").text = f"soap:{fault.code}"
    if fault.subcode is not None:
        sub = etree.SubElement(code, f"{{{names.SOAP}}}Subcode")
        prefix = _find_prefix(root, fault.subcode[0], _prefix_for(fault.subcode[0]))
        etree.SubElement(sub, f"{{{names.SOAP}}}Value").text = f"{prefix}:{fault.subcode[1]}"
    reason = etree.SubElement(fault_el, f"{{{names.SOAP}}}Reason")
    text = etree.SubElement(reason, f"{{{names.SOAP}}}Text")
    text.set(f"{{{names.XML}}}lang", "en")
    text.text = fault.reason
    if fault.detail is not None:
        # SOAP 1.2 Part 1 §5.4.5: the Detail holds elements only, never text.
        detail = etree.SubElement(fault_el, f"{{{names.SOAP}}}Detail")
        _detail_element(detail, fault.detail, addressing.wsa_ns)
    return serialize(root)


def _detail_namespaces(detail: faults.Detail | None, wsa_ns: str) -> list[str]:
    found: list[str] = []
    while detail is not None:
        ns = wsa_ns if detail.element[0] == names.WSA else detail.element[0]
        if ns and ns not in found:
            found.append(ns)
        detail = detail.child
    return found


def _detail_element(parent: Element, detail: faults.Detail, wsa_ns: str) -> None:
    ns, local = detail.element
    if ns == names.WSA:
        ns = wsa_ns  # R2: the request's WS-Addressing version
    el = etree.SubElement(parent, f"{{{ns}}}{local}" if ns else local)
    if detail.child is not None:
        _detail_element(el, detail.child, wsa_ns)
    elif detail.text is not None:
        el.text = detail.text


def _upgrade(header: Element, prefix: str) -> None:
    """SOAP 1.2 Part 1 §5.4.7: the Upgrade header lists the envelope versions we support."""
    upgrade = etree.SubElement(header, f"{{{names.SOAP}}}Upgrade")
    supported = etree.SubElement(upgrade, f"{{{names.SOAP}}}SupportedEnvelope")
    supported.set("qname", f"{prefix}:Envelope")


def _soap11_version_mismatch(
    fault: faults.SoapFault, addressing: Addressing, message_id: str
) -> bytes:
    """SOAP 1.2 Part 1 Appendix A: a SOAP/1.1 sender gets a SOAP/1.1 fault message
    (``faultcode`` VersionMismatch in the 1.1 namespace, ``faultstring``) that carries the 1.2
    Upgrade header, so that it can read the answer and learn which version to speak (R2)."""
    env11 = names.SOAP11
    root = etree.Element(
        f"{{{env11}}}Envelope",
        nsmap={"env": env11, "soap": names.SOAP, "wsa": addressing.wsa_ns},
    )
    header = etree.SubElement(root, f"{{{env11}}}Header")
    _upgrade(header, "soap")
    add_reply_headers(header, addressing, addressing.fault_action, message_id)
    body = etree.SubElement(root, f"{{{env11}}}Body")
    fault_el = etree.SubElement(body, f"{{{env11}}}Fault")
    # SOAP 1.1 §4.4: faultcode and faultstring are unqualified.
    etree.SubElement(fault_el, "faultcode").text = "env:VersionMismatch"
    etree.SubElement(fault_el, "faultstring").text = fault.reason
    return serialize(root)


def _prefix_for(ns: str) -> str:
    for prefix, uri in names.PREFIXES.items():
        if uri == ns:
            return prefix
    if ns == names.WSA10:
        return "wsa"
    return "ns"


def _find_prefix(root: Element, ns: str, default: str) -> str:
    for prefix, uri in root.nsmap.items():
        if uri == ns and prefix:
            return prefix
    return default
