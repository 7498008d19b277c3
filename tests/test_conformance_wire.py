"""Conformance over real sockets (issue 16, the points ``tests/test_conformance.py`` does not
cover): transfer-encoded image parts, WS-Discovery scopes and the HTTP status of faults, each
against a real ``dsc serve`` on both HTTP bindings."""

from __future__ import annotations

import base64
import binascii
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from dsc_core import client as dc
from dsc_core.model import FileShareInstructions
from e2e_support import DEFAULT_SID, ServerProcess, Soap, started_servers

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
