"""dsc_bindings.directory.ldap and dsc_bindings.directory.scan_processes against a real Samba AD DC (R14), and the
``dsc process`` command's round trips.  The DC is provisioned once per session (conftest)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from client_support import on_terminal
from dsc_bindings.directory.ldap import Directory, DirectoryError, DirectorySettings
from dsc_bindings.directory.scan_processes import ProcessStore, ScanProcess
from dsc_core import Lookups
from e2e_support import child_env, dsc_here
from samba_support import BASE_DN, DOMAIN, USERS, SambaDC


def dsc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dsc_bindings.console.main", *args]


def settings(dc: SambaDC, **changes: object) -> DirectorySettings:
    values: dict[str, object] = {
        "url": dc.url,
        "bind_user": f"Administrator@{DOMAIN}",
        "password": "Adm1n!Passw0rd",
        "base_dn": BASE_DN,
        "ca_file": dc.ca_pem,
        "admin_group": "scanadmins",
        "connect_timeout": 3.0,
        "timeout": 5.0,
    }
    values.update(changes)
    return DirectorySettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def directory(samba_dc: SambaDC) -> Directory:
    return Directory(settings(samba_dc))


@pytest.fixture
def config(samba_dc: SambaDC, tmp_path: Path) -> Path:
    path = tmp_path / "dsc.toml"
    path.write_text(
        '[server]\npublic_url = "http://scan.samdom.example.com:5362"\n' + samba_dc.config(path),
        encoding="utf-8",
    )
    return path


# --- users, administrators, processes ----------------------------------------------------------


def test_sid_resolves_to_account_and_mail(samba_dc: SambaDC, directory: Directory) -> None:
    sid = samba_dc.sid("alice")
    user = directory.user_by_sid(sid)
    assert user is not None
    assert user.account == f"alice@{DOMAIN}"  # sAMAccountName@<DNS domain> (R14)
    assert user.mail == USERS["alice"][1]
    assert user.sid == sid
    assert directory.mail_of(f"alice@{DOMAIN}") == USERS["alice"][1]
    # Unknown and malformed SIDs are nobody (the core then keeps the SID, R10).
    assert directory.user_by_sid(sid.rsplit("-", 1)[0] + "-99999") is None
    assert directory.user_by_sid("not-a-sid") is None


def test_certificate_identity_matches_the_upn(directory: Directory) -> None:
    user = directory.user_by_identity(f"bob@{DOMAIN}")
    assert user is not None and user.account == f"bob@{DOMAIN}"
    assert user.upn == f"bob@{DOMAIN}"
    plain = directory.user_by_identity("carol")  # no '@': sAMAccountName
    assert plain is not None and plain.account == f"carol@{DOMAIN}"
    assert directory.user_by_identity("mallory@samdom.example.com") is None


def test_admins_are_nested_members_of_the_group(samba_dc: SambaDC, directory: Directory) -> None:
    # alice is in itstaff, itstaff is in scanadmins: LDAP_MATCHING_RULE_IN_CHAIN finds her.
    assert directory.is_admin(f"alice@{DOMAIN}")
    assert not directory.is_admin(f"bob@{DOMAIN}")
    assert not directory.is_admin("nobody@samdom.example.com")
    answers = directory.answer(
        Lookups(sids=(samba_dc.sid("carol"),), identity=f"bob@{DOMAIN}", admin=f"alice@{DOMAIN}")
    )
    assert not answers.unavailable
    assert answers.users == {
        samba_dc.sid("carol"): f"carol@{DOMAIN}",
        f"bob@{DOMAIN}": f"bob@{DOMAIN}",
    }
    assert answers.admins == {f"alice@{DOMAIN}"}


def test_answers_are_cached_for_the_ttl(samba_dc: SambaDC) -> None:
    now = [1000.0]
    directory = Directory(settings(samba_dc, cache_seconds=60.0), clock=lambda: now[0])
    sid = samba_dc.sid("bob")
    assert directory.user_by_sid(sid) is not None
    calls: list[str] = []
    real_search = directory.search

    def counting(*args: object, **kw: object) -> object:
        calls.append(str(args[1]))
        return real_search(*args, **kw)  # type: ignore[arg-type]

    directory.search = counting  # type: ignore[method-assign]
    assert directory.user_by_sid(sid) is not None
    assert directory.mail_of(f"bob@{DOMAIN}") == USERS["bob"][1]  # filled by the SID lookup
    assert calls == []
    now[0] += 61
    assert directory.user_by_sid(sid) is not None
    assert len(calls) == 1


def test_display_name_by_either_identifier_encoding(
    samba_dc: SambaDC, directory: Directory
) -> None:
    conn = directory.connect()
    try:
        store = ProcessStore(directory, conn)
        guid = str(uuid.uuid4()).upper()
        store.add(ScanProcess("Bytes id", guid, "scan.example", shares=(r"\\h\s",)))
        # A process written by another tool with the identifier as GUID text.
        text_guid = str(uuid.uuid4()).upper()
        conn.add(
            f"CN=Text id,{directory.settings.psp_dn}",
            ["msImaging-PostScanProcess"],
            {
                "displayName": "Text id",
                "msImaging-PSPIdentifier": text_guid.encode(),
                "msImaging-PSPString": ScanProcess(
                    "Text id", text_guid, "scan.example", shares=(r"\\h\s",)
                ).psp_string(),
            },
        )
        assert directory.process_name(guid) == "Bytes id"
        assert directory.process_name(guid.lower()) == "Bytes id"
        assert directory.process_name(text_guid) == "Text id"
        assert directory.process_name(str(uuid.uuid4())) is None
        raw = conn.search(
            directory.settings.psp_dn,
            "(displayName=Bytes id)",
            attributes=["msImaging-PSPIdentifier"],
        )
        assert raw
        stored = conn.response[0]["raw_attributes"]["msImaging-PSPIdentifier"][0]
        assert stored == uuid.UUID(guid).bytes_le  # written as 16 bytes, Windows order (R14)
        assert store.get("Text id") is not None and store.get("Text id").identifier == text_guid  # type: ignore[union-attr]
        for name in ("Bytes id", "Text id"):
            store.remove(store.get(name))  # type: ignore[arg-type]
    finally:
        conn.unbind()


# --- dsc process ---------------------------------------------------------------------------------


def test_process_round_trip(config: Path) -> None:
    c = ("--config", str(config))
    added = dsc_here(
        "process",
        "add",
        "Invoices",
        *c,
        "--share",
        r"\\files\invoices",
        "--email",
        "ap@example.com",
        "--email-scan-user",
        "--format",
        "png",
        "--resolution",
        "200",
        "--color",
        "Grayscale8",
        "--duplex",
        "--root-name",
        "invoice",
    )
    assert added.code == 0, added
    assert "scan process 'Invoices' added" in added.out
    shown = dsc_here("process", "show", "Invoices", *c, "--json")
    assert shown.code == 0, shown
    process = shown.json()
    assert process["shares"] == [r"\\files\invoices"]
    assert process["emails"] == ["ap@example.com"] and process["email_scan_user"] is True
    assert (process["format"], process["resolution"], process["color"], process["duplex"]) == (
        "png",
        200,
        "Grayscale8",
        True,
    )
    assert process["document_root_name"] == "invoice"
    assert process["scan_repository"] == "scan.samdom.example.com"  # this server's public name
    assert process["allow"] == []
    uuid.UUID(process["identifier"])
    xml = dsc_here("process", "show", "Invoices", *c, "--xml")
    assert "<psp:PostScanProcess" in xml.out and "ADFDuplex" in xml.out, xml

    listed = dsc_here("process", "list", *c, "--wide")
    assert listed.code == 0, listed
    row = next(line for line in listed.out.splitlines() if line.startswith("Invoices"))
    assert r"share \\files\invoices" in row and "png 200 dpi Grayscale8 duplex" in row
    assert "everyone" in row

    edited = dsc_here(
        "process",
        "edit",
        "Invoices",
        *c,
        "--sharepoint",
        "https://sp.example.com/sites/ap",
        "--no-duplex",
        "--continue-on-error",
    )
    assert edited.code == 0, edited
    process2 = dsc_here("process", "show", "Invoices", *c, "--json").json()
    assert process2["shares"] == [] and process2["emails"] == []  # destinations replaced
    assert process2["sharepoint_sites"] == ["https://sp.example.com/sites/ap"]
    assert process2["duplex"] is False and process2["continue_on_error"] is True
    assert process2["format"] == "png" and process2["identifier"] == process["identifier"]

    twice = dsc_here("process", "add", "Invoices", *c, "--share", r"\\x\y")
    assert twice.code == 1 and "exists already" in twice.err, twice
    # On a terminal `rm` asks, and "no" keeps the process.
    code, said = on_terminal(dsc_command("process", "rm", "Invoices", *c), "n", child_env())
    assert code == 1, said
    assert "Remove the scan process 'Invoices' (" in said and "[y/N]" in said, said
    assert "not confirmed; nothing was changed" in said
    assert dsc_here("process", "show", "Invoices", *c).code == 0
    removed = dsc_here("process", "rm", "Invoices", *c, "--yes")
    assert removed.code == 0, removed
    gone = dsc_here("process", "show", "Invoices", *c)
    assert gone.code == 1 and "no scan process named 'Invoices'" in gone.err, gone
    assert "Invoices" not in dsc_here("process", "list", *c).out


def test_process_arguments_are_checked(config: Path) -> None:
    c = ("--config", str(config))
    nothing = dsc_here("process", "add", "Empty", *c)
    assert nothing.code == 2 and "needs a destination" in nothing.err, nothing
    bad_share = dsc_here("process", "add", "Bad", *c, "--share", "not a unc " + "x" * 300)
    assert bad_share.code == 1 and "do not match its schema" in bad_share.err, bad_share
    no_group = dsc_here(
        "process", "add", "Nogroup", *c, "--share", r"\\h\s", "--allow", "nosuchgroup"
    )
    assert no_group.code == 1 and "no group named 'nosuchgroup'" in no_group.err, no_group
    assert "Nogroup" not in dsc_here("process", "list", *c).out
    no_config = dsc_here("process", "list")
    assert no_config.code == 2 and "--config" in no_config.err


def test_restricted_process_is_invisible_outside_its_groups(config: Path) -> None:
    c = ("--config", str(config))
    added = dsc_here(
        "process", "add", "Payroll", *c, "--share", r"\\hr\payroll", "--allow", "itstaff"
    )
    assert added.code == 0, added
    try:
        shown = dsc_here("process", "show", "Payroll", *c, "--json").json()
        assert shown["allow"] == ["itstaff"]

        def as_user(name: str, *args: str) -> tuple[int, str, str]:
            pw = Path(config.parent / f"{name}.pw")
            pw.write_text(USERS[name][0])
            run = dsc_here(*args, *c, "--as", f"{name}@{DOMAIN}", "--password-file", str(pw))
            return run.code, run.out, run.err

        code, out, err = as_user("alice", "process", "list")  # alice is in itstaff
        assert code == 0 and "Payroll" in out, (out, err)
        code, out, err = as_user("bob", "process", "list")  # bob is not
        assert code == 0 and "Payroll" not in out, (out, err)
        code, out, err = as_user("bob", "process", "show", "Payroll")
        assert code == 1 and "no scan process named 'Payroll'" in err

        # Open it to everyone again, then bob sees it.
        assert dsc_here("process", "edit", "Payroll", *c, "--allow-everyone").code == 0
        code, out, err = as_user("bob", "process", "list", "--json")
        assert code == 0 and "Payroll" in [p["name"] for p in json.loads(out)], (out, err)
    finally:
        dsc_here("process", "rm", "Payroll", *c, "--yes")


def test_wrong_password_and_unreachable_directory_are_one_line(
    config: Path, tmp_path: Path
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("wrong")
    refused = dsc_here(
        "process",
        "list",
        "--config",
        str(config),
        "--as",
        f"bob@{DOMAIN}",
        "--password-file",
        str(pw),
    )
    assert refused.code == 1 and "refused the credentials" in refused.err, refused
    nowhere = tmp_path / "nowhere.toml"
    nowhere.write_text(
        config.read_text().replace("ldaps://", "ldaps://127.0.0.1:1#").replace("#", "", 0)
    )
    text = config.read_text()
    url_line = next(line for line in text.splitlines() if line.startswith("url"))
    nowhere.write_text(text.replace(url_line, 'url = "ldaps://127.0.0.1:9"'))
    down = dsc_here("process", "list", "--config", str(nowhere))
    assert down.code == 1 and down.err.startswith("dsc: directory: ldaps://127.0.0.1:9"), down
    assert "Traceback" not in down.err


def test_starttls_on_ldap_and_plain_ldap_refused_for_simple_binds(samba_dc: SambaDC) -> None:
    # ldap:// with ca_file: StartTLS, certificate checked against the CA.
    starttls = Directory(settings(samba_dc, url=f"ldap://{samba_dc.address}"))
    user = starttls.user_by_sid(samba_dc.sid("bob"))
    assert user is not None and user.account == f"bob@{DOMAIN}"
    # Plain ldap:// without a CA: the DC wants a protected connection for a password; the
    # message says what to change.
    plain = Directory(settings(samba_dc, url=f"ldap://{samba_dc.address}", ca_file=None))
    with pytest.raises(DirectoryError, match="use ldaps:// or give ca_file"):
        plain.connect()
    assert plain.answer(Lookups(sids=(samba_dc.sid("bob"),))).unavailable
    # A CA that did not sign the DC's certificate is refused, not ignored.
    other_ca = Directory(settings(samba_dc, ca_file=Path(certifi_like_ca(samba_dc))))
    with pytest.raises(DirectoryError):
        other_ca.connect()


def certifi_like_ca(dc: SambaDC) -> str:
    """A CA file of some other CA (trustme's), beside the DC's folder."""
    import trustme

    path = dc.folder / "other-ca.pem"
    if not path.exists():
        trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)
