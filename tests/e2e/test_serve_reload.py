"""SIGHUP reloads the configuration file of a running `dsc serve` (R7: the change is announced
with RepositoryElementsChangeEvent); a broken file keeps the running configuration."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from lxml import etree

from dsc_core import client as dc
from dsc_core import names
from e2e_support import ServerProcess, Soap
from waiting import wait_for


def friendly_name(soap: Soap) -> str:
    get = etree.Element(f"{{{names.SOAP}}}Dummy")  # WS-Transfer Get has an empty body
    body = dc.envelope(names.Action.TRANSFER_GET, get, message_id="urn:uuid:77")
    body = body.replace(b"<soap:Dummy/>", b"")
    status, _, reply = soap.post(body)
    response = dc.parse_response(reply, status)
    found = response.payload.find(f".//{{{names.WSDP}}}FriendlyName")
    assert found is not None and found.text
    return found.text


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_sighup_reloads_the_configuration(tmp_path: Path, binding: str) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text('[server]\nfriendly_name = "Floor 1"\n', encoding="utf-8")
    server = ServerProcess(tmp_path / "data", binding=binding, config=config).start()
    try:
        soap = Soap(server.url)
        assert friendly_name(soap) == "Floor 1"
        config.write_text('[server]\nfriendly_name = "Floor 2"\n', encoding="utf-8")
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: "configuration reloaded" in server.log, what="reload logged")
        assert friendly_name(soap) == "Floor 2"
        config.write_text("[server\n", encoding="utf-8")  # broken: keep what runs
        server.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        wait_for(lambda: "configuration not reloaded" in server.log, what="error logged")
        assert friendly_name(soap) == "Floor 2"
    finally:
        server.stop_cleanly()
