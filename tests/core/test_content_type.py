"""Tests for the tolerant Content-Type parser (R8; dsm-and-stack.md sections 1.5 and 3)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsc_core.content_type import ContentType, parse_content_type

# The outer header value of the hardware-docs SendImage example, folded exactly as quoted.
EXAMPLE_OUTER = (
    "Multipart/Related;\n"
    "        boundary=e1ac1c8d-11be-4313-999f-a8b0857d5360-3c31c1fe-39ef-4c34-8efd-918cf79f6;\n"
    '        type="application/xop+xml";\n'
    '        start="<xml@example.org>";\n'
    '        start-info="application/soap+xml"'
)
# The root part's Content-Type: two parameters separated only by a folded line break.
EXAMPLE_ROOT = (
    "application/xop+xml; type=application/soap+xml\n"
    "                                   charset=UTF-8"
)


def test_example_outer_header() -> None:
    ct = parse_content_type(EXAMPLE_OUTER)
    assert ct.media_type == "multipart/related"
    assert dict(ct.params) == {
        "boundary": "e1ac1c8d-11be-4313-999f-a8b0857d5360-3c31c1fe-39ef-4c34-8efd-918cf79f6",
        "type": "application/xop+xml",
        "start": "<xml@example.org>",
        "start-info": "application/soap+xml",
    }


@pytest.mark.parametrize("fold", ["\n", "\r\n"])
def test_example_root_part_header(fold: str) -> None:
    ct = parse_content_type(EXAMPLE_ROOT.replace("\n", fold))
    assert ct.media_type == "application/xop+xml"
    assert ct.param("type") == "application/soap+xml"
    assert ct.param("charset") == "UTF-8"
    assert ct.param("CharSet") == "UTF-8"
    assert ct.param("boundary") is None


def test_same_root_header_after_mime_header_unfolding() -> None:
    # The MIME reader hands over the value already unfolded (joined with one space).
    ct = parse_content_type("application/xop+xml; type=application/soap+xml charset=UTF-8")
    assert ct.params == {"type": "application/soap+xml", "charset": "UTF-8"}


@pytest.mark.parametrize(
    ("value", "media_type", "params"),
    [
        ("text/plain", "text/plain", {}),
        ("  TEXT/Plain  ", "text/plain", {}),
        ("application/octet-stream;", "application/octet-stream", {}),
        ("a/b;;; ;", "a/b", {}),
        ("a/b;x=1;", "a/b", {"x": "1"}),
        ("a/b; X=1; x=2", "a/b", {"x": "1"}),  # first occurrence wins
        ("a/b; x = 1 ;y= 2", "a/b", {"x": "1", "y": "2"}),
        ('a/b; x="q\\"u\\\\o;t e"', "a/b", {"x": 'q"u\\o;t e'}),
        ('a/b; x="unterminated; y=2', "a/b", {"x": "unterminated; y=2"}),
        ('a/b; x=""', "a/b", {"x": ""}),
        ("a/b; x=", "a/b", {"x": ""}),
        ("a/b; lonely; x=1", "a/b", {"x": "1"}),
        ('a/b; "junk" x=1', "a/b", {"x": "1"}),
        ("a/b; =junk x=1", "a/b", {"x": "1"}),
        ("a/b;\r\n\tx=1;\r\n\ty=2", "a/b", {"x": "1", "y": "2"}),
        ("boundary=abc", "", {"boundary": "abc"}),
        ("; boundary=abc", "", {"boundary": "abc"}),
        ("garbage", "", {}),
        ("text / plain", "", {}),
        ("", "", {}),
        ("\r\n", "", {}),
        ('"', "", {}),
        ("=", "", {}),
    ],
)
def test_tolerant_parsing(value: str, media_type: str, params: dict[str, str]) -> None:
    ct = parse_content_type(value)
    assert ct.media_type == media_type
    assert dict(ct.params) == params


def test_result_is_immutable() -> None:
    ct = parse_content_type("a/b; x=1")
    assert isinstance(ct, ContentType)
    with pytest.raises(TypeError):
        ct.params["x"] = "2"  # type: ignore[index]
    assert ct == ContentType("a/b", {"x": "1"})


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_never_raises(value: str) -> None:
    ct = parse_content_type(value)
    assert ct.media_type == ct.media_type.lower()
    assert all(name == name.lower() for name in ct.params)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='=;"\\ \t\r\n/abAB-'))
def test_never_raises_on_punctuation_soup(value: str) -> None:
    parse_content_type(value)


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-+.", min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(_token, st.text(st.characters(blacklist_categories=("Cs", "Cc"))), max_size=5),
    st.sampled_from(["; ", ";", " ", "\r\n ", ";\n\t"]),
)
def test_quoted_parameters_roundtrip(params: dict[str, str], separator: str) -> None:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    value = "Multipart/Related" + "".join(
        separator + name.upper() + "=" + quote(v) for name, v in params.items()
    )
    ct = parse_content_type(value)
    assert ct.media_type == "multipart/related"
    assert dict(ct.params) == params
