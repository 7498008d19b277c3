"""Conformance over real sockets (issue 16, the points ``tests/test_conformance.py`` does not
cover): transfer-encoded image parts, WS-Discovery scopes and the HTTP status of faults, each
against a real ``dsc serve`` on both HTTP bindings."""

from __future__ import annotations

import base64
import binascii
import random
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import FileShareInstructions
from e2e_support import DEFAULT_SID, ServerProcess, Soap, started_servers
from test_conformance import check_fault_detail, check_message

A = names.Action

BINDINGS = ["async", "blocking"]
IMAGE = b"\x89PNG\r\n\x1a\n" + random.Random(16).randbytes(300_000)


def _encoded_image_body(
    client: Soap, token: str, encoding: str, encoded: bytes
) -> tuple[str, bytes]:
    body = client.image_body(token, 1, "png", [encoded])
    head = body.head
    # The image part's header (the second one): say how its content is encoded.
    at = head.rindex(b"Content-Transfer-Encoding: binary")
    head = head[:at] + f"Content-Transfer-Encoding: {encoding}".encode() + head[at + 33 :]
    return body.content_type, head + encoded + body.tail


def _qp(data: bytes) -> bytes:
    return binascii.b2a_qp(data, istext=False)


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize(
    ("encoding", "encode"),
    [("base64", base64.encodebytes), ("quoted-printable", _qp)],
)
def test_a_transfer_encoded_image_is_filed_decoded(
    binding: str, encoding: str, encode: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    with started_servers() as start:
        server = start(ServerProcess(tmp_path / "data", binding=binding))
        client = Soap(server.url)
        token = client.create([FileShareInstructions((r"\\FileSrv\Scans",))], root_name="enc")
        ctype, body = _encoded_image_body(client, token, encoding, encode(IMAGE))
        status, _ctype, reply = client.post(body, ctype)
        assert status == 200, reply[:600]
        client.end(token)
        assert client.wait_ended(token).state == "Completed"
        folder = server.data / "shares" / "filesrv" / "scans" / DEFAULT_SID
        (filed,) = folder.iterdir()
        assert filed.read_bytes() == IMAGE


@pytest.mark.parametrize("binding", BINDINGS)
def test_an_image_in_an_unknown_encoding_is_refused_and_not_filed(
    binding: str, tmp_path: Path
) -> None:
    with started_servers() as start:
        server = start(ServerProcess(tmp_path / "data", binding=binding))
        client = Soap(server.url)
        token = client.create([FileShareInstructions((r"\\FileSrv\Scans",))])
        for encoding, encoded in (
            ("x-gzip", IMAGE),
            ("base64", base64.encodebytes(IMAGE)[:-10] + b"*\n"),
        ):
            ctype, body = _encoded_image_body(client, token, encoding, encoded)
            status, _ctype, reply = client.post(body, ctype)
            assert status == 400, reply[:600]
            with pytest.raises(dc.ClientFault) as fault:
                dc.parse_response(reply, status)
            assert fault.value.code.endswith("Sender")
            assert "image part cannot be decoded" in fault.value.reason
        assert client.dsp_documents(token) == []
        client.dsp_cancel(token)
        assert not (server.data / "shares").exists() or not any(
            p.is_file() for p in (server.data / "shares").rglob("*")
        )


# --- WS-Discovery scopes (issue 16 point 4) -----------------------------------------------------

SCOPE = "http://contoso.com/scanners/floor2"


def _probe(scopes: str, match_by: str | None = None) -> bytes:
    attribute = f' MatchBy="{match_by}"' if match_by else ""
    body = etree.fromstring(
        f'<wsd:Probe xmlns:wsd="{names.WSD}" xmlns:wsdp="{names.WSDP}"><wsd:Types>wsdp:Device'
        f"</wsd:Types><wsd:Scopes{attribute}>{scopes}</wsd:Scopes></wsd:Probe>"
    )
    return dc.envelope(names.Action.PROBE, body, message_id=f"urn:uuid:{uuid.uuid4()}")


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dsc.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("binding", BINDINGS)
def test_probe_scopes_over_udp_and_http(binding: str, tmp_path: Path) -> None:
    config = _config(tmp_path, f'[server]\nscopes = ["{SCOPE}", "urn:dsc:test"]\n')
    with started_servers() as start:
        server = start(ServerProcess(tmp_path / "data", binding=binding, config=config))
        assert "no UDP discovery" not in server.log, server.log
        device = Soap(server.url)  # the device address (R11)

        def over_udp(probe: bytes) -> bytes | None:
            """The answer to ``probe``, or None: none (WS-Discovery: no match, no answer).  A
            matching Probe follows it: the server answers datagrams one at a time, in order,
            so an answer to the follower first means none to ``probe`` (nothing waits for an
            answer not to come; the limiter's burst of 10 holds this test's 8 datagrams)."""
            follower = _probe("http://CONTOSO.com/scanners")
            follower_id = etree.fromstring(follower).findtext(f".//{{{names.WSA}}}MessageID")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(10)
                for datagram in (probe, follower):
                    sock.sendto(datagram, ("127.0.0.1", server.port))
                first = sock.recvfrom(65535)[0]
                if etree.fromstring(first).findtext(f".//{{{names.WSA}}}RelatesTo") == follower_id:
                    return None
                sock.recvfrom(65535)  # the follower's answer
                return first

        for scopes, match_by, matches in (
            ("http://CONTOSO.com/scanners", None, True),
            (SCOPE, names.WSD + "/strcmp0", True),
            ("http://contoso.com/printers", None, False),
            (f"{SCOPE} urn:dsc:other", names.WSD + "/strcmp0", False),
        ):
            probe = _probe(scopes, match_by)
            status, _ctype, reply = device.post(probe)
            assert status == 200, reply[:500]
            check_message("ProbeMatches (HTTP)", reply)
            root = etree.fromstring(reply)
            found = root.findall(f".//{{{names.WSD}}}ProbeMatch")
            assert bool(found) is matches, (scopes, reply[:800])
            datagram = over_udp(probe)
            assert (datagram is not None) is matches, scopes
            if matches:
                assert datagram is not None
                check_message("ProbeMatches (UDP)", datagram)
                for answer in (root, etree.fromstring(datagram)):
                    advertised = answer.findtext(f".//{{{names.WSD}}}Scopes") or ""
                    assert advertised.split() == [SCOPE, "urn:dsc:test"]

        ldap = _probe("ldap:///ou=scanners", names.WSD + "/ldap")
        status, _ctype, reply = device.post(ldap)
        assert status == 400
        root = check_message("MatchingRuleNotSupported", reply)
        check_fault_detail("MatchingRuleNotSupported", root)
        assert (root.findtext(f".//{{{names.SOAP}}}Subcode/{{{names.SOAP}}}Value") or "").endswith(
            ":MatchingRuleNotSupported"
        )
        assert over_udp(ldap) is None


# --- HTTP status of faults (issue 16, "HTTP status of faults and WCF") --------------------------


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize(("setting", "sender_status"), [(None, 400), ("soap12", 400), ("500", 500)])
def test_fault_http_status_setting(
    binding: str, setting: str | None, sender_status: int, tmp_path: Path
) -> None:
    text = "" if setting is None else f'[server]\nfault_http_status = "{setting}"\n'
    with started_servers() as start:
        server = start(
            ServerProcess(tmp_path / "data", binding=binding, config=_config(tmp_path, text))
        )
        client = Soap(server.url)
        unknown = "00000000-0000-0000-0000-000000000000"
        for ns, action in ((names.DSC, A.DSC_CANCEL), (names.DSP, A.DSP_CANCEL)):
            status, ctype, reply = client.post(
                client.envelope(action, dc.token_request(ns, "CancelPostScanJobRequest", unknown))
            )
            assert (status, ctype.split(";")[0]) == (sender_status, "application/soap+xml")
            root = check_message("ClientErrorJobTokenNotFound", reply)
            assert root.find(f".//{{{names.SOAP}}}Fault") is not None
        status, _ctype, reply = client.post(b"<not-xml")  # R4 step 1, env:Sender too
        assert status == sender_status
        # A fault that is not env:Sender keeps its 500 in both modes (MustUnderstand, R4 step 3).
        must = client.envelope(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
        must = must.replace(
            b"</soap:Header>",
            b'<x:Mystery xmlns:x="urn:test" soap:mustUnderstand="true"/></soap:Header>',
        )
        status, _ctype, reply = client.post(must)
        assert status == 500, reply[:400]
