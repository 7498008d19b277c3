"""The TOML configuration: defaults, every section, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsc_bindings.settings import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dsc.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.listen.host, settings.listen.port, settings.listen.binding) == (
        "127.0.0.1",
        5362,
        "async",
    )
    assert settings.data_dir == Path("var")
    assert not settings.listen.tls and settings.server_ssl_context() is None
    assert not settings.server.require_client_certificates
    assert settings.server.base_url == "http://127.0.0.1:5362"
    # The device book is bounded by default (issue 14 section 4).
    assert (settings.devices.max_devices, settings.devices.retention_days) == (10_000, 365)
    assert (
        settings.filters.map_unc(r"\\Host\Share\a\b")
        == Path("var") / "shares" / "host" / "share" / "a" / "b"
    )


def test_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        r"""
[server]
host = "0.0.0.0"
port = 6000
data = "state"
binding = "blocking"
public_url = "https://scan.contoso.com:6000/"
friendly_name = "Floor 3 scans"
[limits]
max_image_bytes = 1024
head_timeout = 5.0
[jobs]
timeout_seconds = 30
history_size = 7
processing_slots = 3
[users]
scan_admins = ["admin@contoso.com"]
[users.directory]
"S-1-5-21-1" = "alice@contoso.com"
[users.email]
"alice@contoso.com" = "alice.smith@contoso.com"
[processes]
"P-1" = "Scan to share"
[shares]
'\\contoso\scans' = "/srv/scans"
[smtp]
host = "mail.contoso.com"
port = 587
starttls = true
from = "scans@contoso.com"
allowed_domains = ["contoso.com"]
[sharepoint]
username = "svc"
password = "pw"
sites = ["https://sp.contoso.com/sites/scans", { url = "http://intra/s", allow_http = true }]
[eventing]
default_seconds = 60
max_seconds = 120
[devices]
max_devices = 50
retention_days = 30
""",
    )
    s = load_settings(path)
    assert (s.listen.host, s.listen.port, s.listen.binding) == ("0.0.0.0", 6000, "blocking")
    assert s.data_dir == tmp_path / "state"  # relative to the file
    cfg = s.server
    assert cfg.base_url == "https://scan.contoso.com:6000"
    assert cfg.friendly_name == "Floor 3 scans"
    assert cfg.limits.max_image_bytes == 1024 and cfg.limits.head_timeout == 5.0
    assert cfg.limits.max_envelope_bytes == 64 * 1024  # untouched limits keep R12 defaults
    assert (cfg.job_timeout_seconds, cfg.history_size) == (30.0, 7)
    assert s.processing_slots == 3
    assert cfg.scan_admins == frozenset({"admin@contoso.com"})
    assert cfg.user_directory["S-1-5-21-1"] == "alice@contoso.com"
    assert cfg.process_names["P-1"] == "Scan to share"
    assert (cfg.subscription_default_seconds, cfg.subscription_max_seconds) == (60.0, 120.0)
    f = s.filters
    assert f.map_unc(r"\\contoso\scans\x") == Path("/srv/scans/x")
    assert f.map_unc(r"\\other\share") is None  # outside the configured roots (R9)
    assert (f.smtp_host, f.smtp_port, f.smtp_starttls, f.mail_from) == (
        "mail.contoso.com",
        587,
        True,
        "scans@contoso.com",
    )
    assert f.address_of("alice@contoso.com") == "alice.smith@contoso.com"
    assert (f.sharepoint_username, f.sharepoint_password) == ("svc", "pw")
    assert [(p.url, p.allow_http) for p in f.sharepoint_sites] == [
        ("https://sp.contoso.com/sites/scans", False),
        ("http://intra/s", True),
    ]
    assert f.mail_domains == ("contoso.com",)
    assert (s.devices.max_devices, s.devices.retention_days) == (50, 30)


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 6000\nhost = "0.0.0.0"\n')
    s = load_settings(path, port=7000, data_dir=tmp_path / "d", binding="blocking")
    assert (s.listen.host, s.listen.port, s.listen.binding) == ("0.0.0.0", 7000, "blocking")
    assert s.data_dir == tmp_path / "d"


@pytest.mark.parametrize(
    "text, message",
    [
        ("[serverr]\n", "unknown section(s): serverr"),
        ("[limits]\nmax_image_byte = 5\n", "unknown key(s) in [limits]: max_image_byte"),
        ('[server]\nbinding = "fast"\n', "binding must be 'async' or 'blocking'"),
        ("[server\n", "is not valid TOML"),
        ("[shares]\n'not-unc' = \"/x\"\n", "[shares]"),
        ('[sharepoint]\nsites = ["http://intra/s"]\n', "allow_http = true"),
        ('[sharepoint]\nsites = "https://a/b"\n', "[sharepoint] sites must be a list"),
        ('[sharepoint]\nsites = [{ url = "https://a", allow = 1 }]\n', "a site table has"),
        ('[sharepoint]\nsites = ["ftp://a/b"]\n', "is not http or https"),
        ('[smtp]\nallowed_domains = "contoso.com"\n', "allowed_domains must be a list"),
        ('[smtp]\nallowed_domains = ["a@b"]\n', "is not a domain name"),
    ],
)
def test_errors_say_what_to_change(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[limits]\nmax_image_bytes = "abc"\n',
            "[limits]: Limits.max_image_bytes must be a positive int, got 'abc'",
        ),
        ("[limits]\nhead_timeout = 0\n", "Limits.head_timeout must be a positive number"),
        ("[jobs]\ntimeout_seconds = -5\n", "[jobs] timeout_seconds must be a positive number"),
        ('[jobs]\nhistory_size = "lots"\n', "[jobs] history_size must be a whole number >= 0"),
        ("[processes]\nPSP-1 = 5\n", '[processes] "PSP-1" must be a non-empty string, got 5'),
        ('[server]\nfriendly_name = ""\n', "[server] friendly_name must be a non-empty string"),
        # Issue 8 point 7: every key's type and range, checked when the file is loaded.
        ("[server]\nport = 70000\n", "[server] port must be a whole number from 0 to 65535"),
        ('[server]\nport = "5362"\n', "[server] port must be a whole number from 0 to 65535"),
        ("[server]\nport = true\n", "[server] port must be a whole number"),
        ("[server]\nhost = 5\n", "[server] host must be a non-empty string, got 5"),
        ('[server]\nblocking_cpu = "one"\n', '[server] blocking_cpu must be "auto", "any"'),
        ("[server]\nblocking_cpu = -1\n", '[server] blocking_cpu must be "auto", "any"'),
        ('server = "x"\n', "server must be a table ([server] on a line of its own)"),
        ("[jobs]\nspool_retention_seconds = inf\n", "[jobs] spool_retention_seconds must be"),
        ("[jobs]\nhistory_size = 2.5\n", "[jobs] history_size must be a whole number"),
        ("[jobs]\nprocessing_slots = 0\n", "[jobs] processing_slots must be a whole number >= 1"),
        ("[smtp]\nport = 0\n", "[smtp] port must be a whole number from 1 to 65535, got 0"),
        ('[smtp]\nstarttls = "false"\n', "[smtp] starttls must be true or false"),
        ("[smtp]\ntimeout = 0\n", "[smtp] timeout must be a positive number of seconds"),
        ("[smtp]\npassword = 1234\n", "[smtp] password must be a string (in quotes), got '...'"),
        ("[sharepoint]\ntimeout = -1\n", "[sharepoint] timeout must be a positive number"),
        ('[sharepoint]\nca_file = "missing.pem"\n', "[sharepoint] ca_file"),
        ('[users]\nscan_admins = "admin"\n', "[users] scan_admins must be a list of strings"),
        ("[users.directory]\nS-1 = 1\n", '[users.directory] "S-1" must be a non-empty string'),
        ("[shares]\n'\\\\\\\\h\\\\s' = 1\n", "[shares]"),
        ("[limits]\nmax_connections = 0\n", "[limits]: Limits.max_connections must be"),
        ("[eventing]\ndefault_seconds = 100\nmax_seconds = 10\n", "more than max_seconds"),
        ('[tls]\nkey = "server.key"\n', "a TLS key (--tls-key or [tls] key) without a certificate"),
        ('[tls]\ncert = "nope.pem"\n', "TLS certificate"),
        ("[devices]\nmax_devices = 0\n", "[devices] max_devices must be a whole number >= 1"),
        ('[devices]\nmax_devices = "all"\n', "[devices] max_devices must be a whole number"),
        ("[devices]\nretention_days = 0\n", "[devices] retention_days must be a whole number"),
        ("[devices]\nretention_days = 1.5\n", "[devices] retention_days must be a whole number"),
        ("[devices]\nkeep = 1\n", "unknown key(s) in [devices]: keep"),
        ("[server]\nhealth_max_age_seconds = 0\n", "[server] health_max_age_seconds must be"),
        ("[store]\npool_timeout_seconds = -1\n", "[store] pool_timeout_seconds must be"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    """Checked at load, not on the first request: the message names the field and value."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert message in str(info.value)


def test_health_age_and_pool_timeout(tmp_path: Path) -> None:
    """Unset: None (observe.health's default) and 5 s; set: as written."""
    plain = load_settings(write(tmp_path, ""))
    assert (plain.health_max_age_seconds, plain.storage.pool_timeout_seconds) == (None, 5.0)
    assert plain.processing_slots == 2
    text = "[server]\nhealth_max_age_seconds = 0.5\n[store]\npool_timeout_seconds = 2\n"
    short = load_settings(write(tmp_path, text))
    assert (short.health_max_age_seconds, short.storage.pool_timeout_seconds) == (0.5, 2.0)


@pytest.mark.parametrize(
    ("text", "cpu"), [("", "auto"), ('blocking_cpu = "any"\n', None), ("blocking_cpu = 1\n", 1)]
)
def test_blocking_cpu(tmp_path: Path, text: str, cpu: object) -> None:
    assert load_settings(write(tmp_path, "[server]\n" + text)).listen.blocking_cpu == cpu


def test_client_ca_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client certificates"):
        load_settings(client_ca=tmp_path / "ca.pem")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_settings(tmp_path / "nope.toml")


def test_tls_with_client_certificates_requires_them(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    s = load_settings(cert=tmp_path / "server.pem", client_ca=tmp_path / "ca.pem")
    assert s.server.require_client_certificates
    assert s.server.base_url.startswith("https://")
    context = s.server_ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED


def test_command_line_key_without_cert_is_an_error(tmp_path: Path) -> None:
    """--tls-key alone used to start plain HTTP; whoever gave a key meant TLS."""
    key = tmp_path / "server.key"
    key.write_text("key")
    with pytest.raises(ConfigError, match="--tls-cert"):
        load_settings(key=key)


def test_command_line_port_out_of_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--port must be from 0 to 65535"):
        load_settings(port=65536)


def test_data_dir_checks(tmp_path: Path) -> None:
    from dsc_bindings.settings import prepare_data_dir

    fresh = tmp_path / "a" / "b"
    prepare_data_dir(fresh)
    assert fresh.is_dir() and list(fresh.iterdir()) == []  # the write probe leaves nothing
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="is a file, not a directory: move it away or choose"):
        prepare_data_dir(blocker)
    with pytest.raises(ConfigError, match="cannot create the data directory"):
        prepare_data_dir(blocker / "data")
    (fresh / "spool").write_text("oops")
    with pytest.raises(ConfigError, match="spool is a file, not a directory"):
        prepare_data_dir(fresh)


def test_smb_section(tmp_path: Path) -> None:
    secret = tmp_path / "smb.secret"
    secret.write_text("s3cret\n")
    conf = tmp_path / "c.toml"
    conf.write_text(
        f"""
[server]
data = "{tmp_path / "data"}"
[smb]
username = "svc-scan"
password_file = "{secret}"
domain = "CONTOSO"
servers = ["FS01.contoso.com"]
health_shares = ['\\\\fs01.contoso.com\\scans']
"""
    )
    smb = load_settings(conf).filters.smb
    assert smb is not None
    assert (smb.account, smb.password, smb.servers) == (
        "CONTOSO\\svc-scan",
        "s3cret",
        ("fs01.contoso.com",),
    )
    assert smb.require_encryption and smb.allows("fs01.CONTOSO.com") and not smb.allows("evil")
    # With [smb] and no [shares] no catch-all folder takes the SMB servers' paths.
    assert load_settings(conf).filters.map_unc(r"\\fs01.contoso.com\scans") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[smb]\nusername = "u"\nservers = ["h"]\n', "password (or password_file)"),
        ('[smb]\nusername = "u"\npassword = "p"\nservers = "h"\n', "list of host names"),
        ('[smb]\nusername = "u"\npassword = "p"\nservers = ["h"]\nfoo = 1\n', "foo"),
    ],
)
def test_smb_errors_say_what_to_change(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server]\ndata = "{tmp_path / "data"}"\n' + text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(conf)
