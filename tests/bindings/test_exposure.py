"""The deployment rules of issue 14 (exposure.py) on loaded settings: what the server advertises,
and when it refuses to listen.  The same rules on a real ``dsc serve`` are in
tests/test_deployment.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from dsc_bindings.exposure import (
    UnsafeExposure,
    bound_base_url,
    check_exposure,
    is_local_only,
    is_loopback,
)
from dsc_bindings.settings import Settings, load_settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    ca.issue_cert("scan.example.com").private_key_and_cert_chain_pem.write_to_path(
        str(folder / "server.pem")
    )
    return {"cert": folder / "server.pem", "client_ca": folder / "ca.pem"}


def settings(tmp_path: Path, server: str = "", **options: object) -> Settings:
    path = tmp_path / "dsc.toml"
    path.write_text("[server]\n" + server, encoding="utf-8")
    return load_settings(path, data_dir=tmp_path / "data", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "loopback", "local_only"),
    [
        ("127.0.0.1", True, True),
        ("127.4.5.6", True, True),
        ("::1", True, True),
        ("[::1]", True, True),
        ("localhost", True, True),
        ("LocalHost.", True, True),
        ("scan.localhost", True, True),
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.0.4.17", False, False),
        ("fe80::1", False, False),
        ("scan.example.com", False, False),
    ],
)
def test_loopback_and_local_only_addresses(host: str, loopback: bool, local_only: bool) -> None:
    assert is_loopback(host) is loopback
    assert is_local_only(host) is local_only


def test_base_url_is_public_url_else_the_bound_address(tmp_path: Path) -> None:
    assert bound_base_url("http", "10.0.4.17", 5362) == "http://10.0.4.17:5362"
    assert bound_base_url("https", "fd00::5", 5362) == "https://[fd00::5]:5362"  # RFC 3986
    assert bound_base_url("http", "0.0.0.0", 5362) == "http://127.0.0.1:5362"
    assert settings(tmp_path, 'host = "::1"\n').server.base_url == "http://[::1]:5362"
    given = settings(tmp_path, 'host = "0.0.0.0"\npublic_url = "https://scan.example.com:5362/"\n')
    assert given.server.base_url == "https://scan.example.com:5362"


def test_loopback_listeners_start_as_they_are(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        assert check_exposure(settings(tmp_path, f'host = "{host}"\n')) is None


def test_beyond_loopback_needs_a_public_url_tls_and_client_certificates(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    public = 'public_url = "https://scan.example.com:5362"\n'
    cases = [
        # (server table, options, the phrases the one-line refusal holds)
        ('host = "0.0.0.0"\n', {}, ["http://127.0.0.1:5362", "public_url", "plain HTTP"]),
        ('host = "::"\n', {}, ["public_url", "plain HTTP"]),
        ('host = "0.0.0.0"\n' + public, {}, ["plain HTTP"]),
        ('host = "0.0.0.0"\n' + public, {"cert": pki["cert"]}, ["every client is a scan admin"]),
        # A concrete address is advertised as it is: only the missing TLS is wrong.
        ('host = "10.0.4.17"\n', {}, ["plain HTTP"]),
        # A public_url that names this machine only is as wrong as none.
        ('host = "0.0.0.0"\npublic_url = "https://localhost:5362"\n', {}, ["localhost:5362"]),
    ]
    for server, options, phrases in cases:
        loaded = settings(tmp_path, server, **options)
        with pytest.raises(UnsafeExposure) as refused:
            check_exposure(loaded)
        message = str(refused.value)
        assert "\n" not in message and message.startswith("refusing to listen on "), message
        for phrase in phrases:
            assert phrase in message, (server, message)
        assert "allow_insecure = true" in message  # says how to override
        # The operator's explicit override: the server starts, with the same text as a warning.
        waived = settings(tmp_path, server + "allow_insecure = true\n", **options)
        warning = check_exposure(waived)
        assert warning is not None and warning.startswith("allow_insecure = true: listening on ")
        for phrase in phrases:
            assert phrase in warning, (server, warning)
    safe = settings(
        tmp_path, 'host = "0.0.0.0"\n' + public, cert=pki["cert"], client_ca=pki["client_ca"]
    )
    assert check_exposure(safe) is None


def test_allow_insecure_is_a_boolean(tmp_path: Path) -> None:
    from dsc_bindings.settings import ConfigError

    with pytest.raises(ConfigError, match="allow_insecure must be true or false"):
        settings(tmp_path, 'allow_insecure = "yes"\n')
