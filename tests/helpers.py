"""Helpers shared by the tests: reading replies, schema validation, spec examples."""

from __future__ import annotations

import re
from pathlib import Path

from lxml import etree

from dsc_core import names

NSMAP = {
    "soap": names.SOAP,
    "wsa": names.WSA,
    "dsc": names.DSC,
    "dsp": names.DSP,
    "wse": names.WSE,
    "wsdp": names.WSDP,
    "wsx": names.MEX,
    "wsd": names.WSD,
}


def parse(body: bytes) -> etree._Element:
    return etree.fromstring(body)


def xp(el: etree._Element, path: str) -> list[etree._Element]:
    return el.xpath(path, namespaces=NSMAP)  # type: ignore[no-any-return]


def text(el: etree._Element, path: str) -> str:
    found = xp(el, path)
    assert found, f"{path} not found"
    node = found[0]
    return (node if isinstance(node, str) else node.text or "").strip()


def payload(body: bytes) -> etree._Element:
    return xp(parse(body), "/soap:Envelope/soap:Body/*")[0]


def validate(schema: etree.XMLSchema, element: etree._Element) -> None:
    """Validate a Body payload against bdsrr.xsd (its operation elements are global)."""
    doc = etree.fromstring(etree.tostring(element))
    if not schema.validate(doc):
        raise AssertionError(f"schema: {schema.error_log}\n{etree.tostring(doc).decode()}")


def dsp_as_dsc(element: etree._Element) -> etree._Element:
    """WS-DSP uses the MS-BDSRR types in its own namespace: map it to validate (issue 2)."""
    data = etree.tostring(element).replace(names.DSP.encode(), names.DSC.encode())
    return etree.fromstring(data)


def hardware_examples(spec: Path) -> dict[str, str]:
    """The WS-DSP example messages of dsm-and-stack.md §1.5, by title ("SendImageRequest")."""
    text_ = (spec / "dsm-and-stack.md").read_text(encoding="utf-8")
    section = text_.split("### 1.5", 1)[1].split("### 1.6", 1)[0]
    found = {}
    for match in re.finditer(r"\n(\w+) Example[^\n]*:\n\n```xml\n(.*?)```", section, re.S):
        found[match.group(1)] = match.group(2)
    return found
