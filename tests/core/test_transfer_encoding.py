"""A MIME part's Content-Transfer-Encoding (issue 16 point 3; RFC 2045 section 6; DPWS
R0036/R0037): base64 and quoted-printable image parts are decoded while they stream, any other
non-identity encoding is refused with an env:Sender fault, and nothing else is ever filed."""

from __future__ import annotations

import base64
import binascii
import random
import tracemalloc

import pytest

from core_support import (
    Act,
    client,
    create_job,
    envelope,
    mtom_body,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import RequestInfo
from dsc_core.commands import AppendDocument
from dsc_core.transfer_encoding import (
    Base64Decoder,
    QuotedPrintableDecoder,
    TransferEncodingError,
    decoder_for,
)
from helpers import parse, text

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4 + b"  \r\n=\t\n"


def _qp(data: bytes) -> bytes:
    """Quoted-printable for binary data: CR and LF escaped (RFC 2045 section 6.7 rule 4)."""
    return binascii.b2a_qp(data, istext=False)


def _feed_split(decoder: Base64Decoder | QuotedPrintableDecoder, data: bytes, at: int) -> bytes:
    return decoder.feed(data[:at]) + decoder.feed(data[at:]) + decoder.close()


def test_base64_decodes_under_every_split() -> None:
    encoded = base64.encodebytes(IMAGE)  # 76-character lines, LF line ends
    encoded_crlf = encoded.replace(b"\n", b"\r\n")
    for data in (encoded, encoded_crlf, base64.b64encode(IMAGE)):
        for at in range(0, len(data) + 1, 7):
            assert _feed_split(Base64Decoder(), data, at) == IMAGE
    for tail in (b"", b"A", b"AB"):  # each padding length
        data = base64.b64encode(IMAGE + tail)
        for at in range(len(data) - 6, len(data) + 1):
            assert _feed_split(Base64Decoder(), data, at) == IMAGE + tail


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"QUJD!EVG", "not valid"),  # a character outside the alphabet is not skipped
        (b"QQ==QUJD", "after its final '=' padding"),
        (b"QUJDRA", "cut short"),
        (b"Q===", "not valid"),
    ],
)
def test_base64_refuses_what_it_cannot_decode_exactly(data: bytes, why: str) -> None:
    for at in range(len(data) + 1):
        with pytest.raises(TransferEncodingError, match=why):
            _feed_split(Base64Decoder(), data, at)


def test_quoted_printable_decodes_under_every_split() -> None:
    encoded = _qp(IMAGE)  # escapes, soft line breaks (=CRLF)
    assert b"=\r\n" in encoded and b"=0D" in encoded
    lf = encoded.replace(b"=\r\n", b"=\n")
    for data in (encoded, lf):
        for at in range(len(data) + 1):
            assert _feed_split(QuotedPrintableDecoder(), data, at) == IMAGE
    # RFC 2045 section 6.7: trailing white space of a line is transport padding, also after a
    # soft line break's "="; hard line breaks stay as they are.
    padded = b"a b  \r\nc=3D=  \r\nd \t\ne \t"
    for at in range(len(padded) + 1):
        assert _feed_split(QuotedPrintableDecoder(), padded, at) == b"a b\r\nc=d\ne"


@pytest.mark.parametrize("data", [b"a=ZZ", b"a=\xff1", b"abc=", b"abc=4"])
def test_quoted_printable_refuses_a_broken_escape(data: bytes) -> None:
    for at in range(len(data) + 1):
        with pytest.raises(TransferEncodingError):
            _feed_split(QuotedPrintableDecoder(), data, at)


def test_which_encodings_are_decoded_and_which_are_refused() -> None:
    for identity in (None, "7bit", " 8BIT ", "Binary"):
        assert decoder_for(identity) is None
    assert isinstance(decoder_for("BASE64"), Base64Decoder)
    assert isinstance(decoder_for("Quoted-Printable"), QuotedPrintableDecoder)
    for other in ("x-uuencode", "gzip", ""):
        with pytest.raises(TransferEncodingError, match="not supported"):
            decoder_for(other)


def test_decoders_hold_back_only_a_few_bytes() -> None:
    """R8: memory flat in the image size; what is fed comes out at once, but for a partial
    base64 quantum (3 characters at most) or a QP line's undecided tail (here 3 at most)."""
    image = random.Random(16).randbytes(2 * 1024 * 1024)
    step = 65_536 + 13
    for decoder, data in (
        (Base64Decoder(), base64.encodebytes(image)),
        (QuotedPrintableDecoder(), _qp(image)),
    ):
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        # How much each prefix decodes to, less 3 characters (computed before measuring).
        floor, fed = [], 0
        for piece in pieces:
            fed += len(piece)
            prefix = data[: max(0, fed - 3)]
            if isinstance(decoder, Base64Decoder):
                floor.append(len(prefix.translate(None, b"\r\n")) // 4 * 3)
            else:
                floor.append(len(binascii.a2b_qp(prefix.rstrip(b"="))))
        out = 0
        tracemalloc.start()
        try:
            for piece, least in zip(pieces, floor, strict=True):
                out += len(decoder.feed(piece))
                assert out >= least - 1
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out += len(decoder.close())
        assert out == len(image)
        assert peak < 6 * step  # a few chunk-sized copies, not the image


# --- through the exchange: what the store receives ------------------------------------------


def _encoded_send_image(
    t: InProcessTransport, token: str, image: bytes, encoding: str, encoded: bytes
) -> tuple[int, bytes]:
    cid = "img@x"
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", cid))
    ctype, body = mtom_body(root, cid, encoded)
    marker = f"Content-Transfer-Encoding: binary\r\nContent-ID: <{cid}>".encode()
    assert body.count(marker) == 1
    body = body.replace(
        marker, f"Content-Transfer-Encoding: {encoding}\r\nContent-ID: <{cid}>".encode()
    )
    reply = t.post(body, content_type=ctype, chunk_size=997)
    return reply.status, reply.body


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("base64", base64.encodebytes),
        ("BASE64", base64.b64encode),
        ("quoted-printable", _qp),
        ("8bit", bytes),
    ],
)
def test_an_encoded_image_is_filed_decoded(encoding: str, encode: object) -> None:
    t = InProcessTransport()
    token = create_job(t)
    status, reply = _encoded_send_image(t, token, IMAGE, encoding, encode(IMAGE))  # type: ignore[operator]
    assert status == 200, reply
    assert t.store.documents[(token, 1)] == IMAGE


@pytest.mark.parametrize(
    ("encoding", "encoded", "why"),
    [
        ("x-uuencode", b"begin 644 x\n", "not supported"),
        ("base64", b"iVBORw0KGgo!!!!", "base64 content is not valid"),
        ("base64", b"iVBORw0KGgoAAA", "cut short"),
        ("quoted-printable", b"abc=Q1", "neither an '=XX' escape"),
    ],
)
def test_an_image_that_cannot_be_decoded_is_refused_and_not_filed(
    encoding: str, encoded: bytes, why: str
) -> None:
    t = InProcessTransport()
    token = create_job(t)
    status, reply = _encoded_send_image(t, token, IMAGE, encoding, encoded)
    assert status == 400
    root = parse(reply)
    assert text(root, "//soap:Code/soap:Value").endswith("Sender")
    reason = text(root, "//soap:Reason/soap:Text")
    assert "image part" in reason and why in reason, reason
    assert (token, 1) not in t.store.documents and not t.store.open_documents
    # Nothing was acknowledged: the same DocumentId can be sent again, binary.
    status, reply = _encoded_send_image(t, token, IMAGE, "binary", IMAGE)
    assert status == 200, reply
    assert t.store.documents[(token, 1)] == IMAGE


def test_a_base64_root_part_is_decoded_too() -> None:
    t = InProcessTransport()
    token = create_job(t)
    cid = "img@x"
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", cid))
    ctype, body = mtom_body(root, cid, IMAGE)
    body = body.replace(root, base64.encodebytes(root), 1).replace(
        b"Content-Transfer-Encoding: binary", b"Content-Transfer-Encoding: base64", 1
    )
    reply = t.post(body, content_type=ctype, chunk_size=101)
    assert reply.status == 200, reply.body
    assert t.store.documents[(token, 1)] == IMAGE


def test_decoded_image_streams_as_it_arrives() -> None:
    """The exchange hands the store decoded bytes feed by feed (R8), never the whole image."""
    t = InProcessTransport()
    token = create_job(t)
    image = random.Random(3).randbytes(512 * 1024)
    cid = "img@x"
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", cid))
    ctype, body = mtom_body(root, cid, base64.encodebytes(image))
    body = body.replace(
        f"Content-Transfer-Encoding: binary\r\nContent-ID: <{cid}>".encode(),
        f"Content-Transfer-Encoding: base64\r\nContent-ID: <{cid}>".encode(),
    )
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=ctype))
    step = 32 * 1024
    appended = 0
    for start in range(0, len(body), step):
        commands = exchange.feed(body[start : start + step])
        t._run(commands)
        sizes = [len(c.data) for c in commands if isinstance(c, AppendDocument)]
        assert all(size <= step for size in sizes)
        appended += sum(sizes)
    t._run(exchange.end().commands)
    assert appended == len(image)
    assert t.store.documents[(token, 1)] == image
