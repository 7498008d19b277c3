"""Client errors that used to mislead, against real ``dsc serve`` processes: cancelling a job that
already ended, https against a plain HTTP server and http against an HTTPS one, and a
non-administrator's refusal that names the identity the server saw and the settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e_support import ServerProcess, Soap, dsc, serving
from test_e2e_serve import Pki

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
#: The image limit of the TLS server: uploads on both sides of it cross many TLS records.
TLS_LIMIT = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path_factory.mktemp("plain") / "data")) as server:
        yield server


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Pki]]:
    root = tmp_path_factory.mktemp("secure")
    pki = Pki(root / "pki")
    config = root / "dsc.toml"
    config.write_text(
        f'[users]\nscan_admins = ["admin"]\n[limits]\nmax_image_bytes = {TLS_LIMIT}\n'
    )
    with serving(
        ServerProcess(
            root / "data",
            config=config,
            tls=(pki.server_cert, pki.server_key),
            client_ca=pki.ca_pem,
        )
    ) as server:
        yield server, pki


def test_cancelling_an_ended_job_says_it_ended(plain: ServerProcess, tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    page.write_bytes(PNG)
    token = dsc("scan", "--server", plain.url, "-q", "--json", str(page)).json()["token"]
    Soap(plain.url).wait_ended(token)
    run = dsc("cancel", token[:8], "--server", plain.url)
    assert run.code == 1, run
    assert run.err == (
        f"dsc: job {token} has already ended (Completed: PostScanJobCompletedSuccessfully); "
        "only an active job can be canceled\n"
    )
    # A token the server never knew is still the server's own answer.
    unknown = dsc("cancel", "0" * 8 + token[8:], "--server", plain.url)
    assert unknown.code == 1 and "ClientErrorJobTokenNotFound" in unknown.err, unknown


def test_https_against_a_plain_http_server(plain: ServerProcess) -> None:
    url = plain.url.replace("http:", "https:", 1)
    run = dsc("jobs", "--server", url)
    assert run.code == 1, run
    assert run.err == (
        f"dsc: the server at 127.0.0.1:{plain.port} answers plain HTTP, not HTTPS: use "
        f"--server {plain.url}\n"
    ), run.err
    assert "--ca" not in run.err


def test_http_against_an_https_server(secure: tuple[ServerProcess, Pki]) -> None:
    server, _ = secure
    url = server.url.replace("https:", "http:", 1)
    run = dsc("jobs", "--server", url)
    assert run.code == 1, run
    assert run.err.startswith(
        f"dsc: the server at 127.0.0.1:{server.port} speaks HTTPS, not plain HTTP: use "
        f"--server {server.url} (with --ca"
    ), run.err
    assert "is `dsc serve` running there?" not in run.err
    # A certificate the client does not trust is still a --ca matter.
    untrusted = dsc("jobs", "--server", server.url)
    assert untrusted.code == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.err, untrusted
    assert "check --ca" in untrusted.err


def test_a_non_administrator_is_told_who_the_server_saw(secure: tuple[ServerProcess, Pki]) -> None:
    server, pki = secure
    run = dsc(
        "jobs", "--server", server.url, "--ca", str(pki.ca_pem), "--cert", str(pki.users["bob"])
    )
    assert run.code == 1, run
    assert run.err == (
        "dsc: dsc:ClientErrorCurrentUserNotScanAdmin: The current user is not a scan "
        "administrator: the client's identity 'bob' is not in [users] scan_admins nor in "
        "[directory] admin_group.\n"
    ), run.err
    admin = dsc(
        "jobs", "--server", server.url, "--ca", str(pki.ca_pem), "--cert", str(pki.users["admin"])
    )
    assert admin.code == 0, admin


def test_uploads_over_tls_finish_or_show_the_refusal(
    secure: tuple[ServerProcess, Pki], tmp_path: Path
) -> None:
    """Over TLS 1.3 the socket turns readable after the handshake (session tickets): that is
    no early answer, and an upload of many records goes through; an oversized one gets the
    server's 413 read through TLS."""
    server, pki = secure
    tls = ("--server", server.url, "--ca", str(pki.ca_pem), "--cert", str(pki.users["alice"]))
    fits = tmp_path / "fits.png"
    fits.write_bytes(PNG[:8] + os.urandom(TLS_LIMIT - 4096))
    run = dsc("scan", *tls, "-q", "--json", str(fits), timeout=60)
    assert run.code == 0, run
    assert run.json()["images_received"] == 1
    big = tmp_path / "big.png"
    big.write_bytes(PNG[:8] + os.urandom(TLS_LIMIT + 2 * 1024 * 1024))
    refused = dsc("scan", *tls, str(big), timeout=60)
    assert refused.code == 1, refused
    last = refused.err.strip().splitlines()[-1]
    assert "the server answered before the upload ended: 413" in last, last
    assert "max_image_bytes" in last and last.endswith(" canceled"), last
