"""ServiceRequest's writes of an upload: the piece just handed over is written while the next
one is read (one batch of the exchange in flight), in order, and a failed write is answered
with R4 step 9's fault at the next step."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.runtime.service import ScanService
from dsc_bindings.runtime.ticket import Wait, settle
from dsc_bindings.serve import compose
from dsc_bindings.store.sqlite import StoreError
from dsc_core import ServerConfig, names
from dsc_core import client as C
from dsc_core.model import FileShareInstructions

SID = "S-1-5-21-1001"


@pytest.fixture
def service(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = ServerConfig(user_directory={SID: "alice@corp.example"})
    service = compose(config, tmp_path / "data", FilterSettings.embedded_default(tmp_path)).service
    service.start()
    yield service
    service.shutdown(5.0)


def _token(service: ScanService) -> str:
    body = C.envelope(
        names.Action.DSP_CREATE,
        C.create_post_scan_job(
            user_identifier=SID,
            psp_identifier="PSP-1",
            instructions=[FileShareInstructions((r"\\srv\scans",))],
        ),
        message_id="urn:uuid:1",
    )
    reply = service.handle(body, content_type=C.SOAP_XML)
    token = C.text_of(C.parse_response(reply.body).payload, names.DSP, "JobToken")
    assert token
    return token


def _pieces(token: str, image: bytes) -> tuple[str, list[bytes]]:
    root = C.envelope(
        names.Action.DSP_SEND_IMAGE,
        C.send_image_request(token, 1, "png", "i@x"),
        message_id="urn:uuid:2",
    )
    mtom = C.mtom(root, "i@x", [image], boundary="b-test")
    body = b"".join(mtom.chunks())
    size = 64 * 1024
    return mtom.content_type, [body[i : i + size] for i in range(0, len(body), size)]


def test_the_next_piece_is_taken_while_the_last_one_is_written(service: ScanService) -> None:
    token = _token(service)
    store = service._store
    assert store is not None
    real_apply = store.apply
    gate = threading.Event()
    order: list[int] = []

    def apply(command: object) -> None:
        if type(command).__name__ == "AppendDocument":
            gate.wait(10)
            order.append(len(command.data))  # type: ignore[attr-defined]
        real_apply(command)  # type: ignore[arg-type]

    store.apply = apply  # type: ignore[method-assign]
    image = os.urandom(400_000)
    ctype, pieces = _pieces(token, image)
    request = service.open_request(ctype, None, "/ScanServer")
    # The first piece (the root part and the image's first bytes) is handed over and being
    # written, held by the gate: the caller was not kept waiting for it...
    assert request.feed(pieces[0]) is None
    # ...but the next piece waits for that write: one batch in flight, in order.
    second = request.feed(pieces[1])
    assert isinstance(second, Wait) and not second.ticket.done
    gate.set()
    assert settle(second) is None
    for piece in pieces[2:]:
        settle(request.feed(piece))
    reply = settle(request.finish())
    assert reply.status == 200, reply.body  # type: ignore[attr-defined]
    assert (service.data_dir / "spool" / token / "1").read_bytes() == image  # in order
    assert sum(order) == len(image)


def test_a_failed_write_is_answered_at_the_next_step(service: ScanService) -> None:
    token = _token(service)
    store = service._store
    assert store is not None
    real_apply = store.apply

    def apply(command: object) -> None:
        if type(command).__name__ == "AppendDocument":
            raise StoreError("disk full (injected)", temporary=True)
        real_apply(command)  # type: ignore[arg-type]

    store.apply = apply  # type: ignore[method-assign]
    ctype, pieces = _pieces(token, os.urandom(300_000))
    request = service.open_request(ctype, None, "/ScanServer")
    for piece in pieces:
        settle(request.feed(piece))
    reply = settle(request.finish())
    assert reply.status == 500 and b"ServerErrorTemporaryError" in reply.body  # type: ignore[attr-defined]
    assert not list((service.data_dir / "spool").rglob("*.part"))
