"""``[directory]`` in the configuration file (dsc_bindings.settings, R14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsc_bindings.directory.scan_processes import SCHEMA_FILES
from dsc_bindings.settings import ConfigError, load_settings

BASE = """
[directory]
url = "ldaps://dc1.contoso.com"
bind_user = "svc-scan@contoso.com"
base_dn = "DC=contoso,DC=com"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dsc.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_without_a_directory_section_nothing_changes(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[users]\nscan_admins = ['a']\n"))
    assert settings.directory is None and settings.server.directory is False


def test_directory_section_is_read(tmp_path: Path) -> None:
    (tmp_path / "ldap.secret").write_text("s3cret\n", encoding="utf-8")
    text = BASE + (
        'password_file = "ldap.secret"\nca_file = "ca.pem"\nadmin_group = "Scan Admins"\n'
        "cache_seconds = 60\nconnect_timeout = 2\ntimeout = 4\n"
    )
    settings = load_settings(write(tmp_path, text))
    d = settings.directory
    assert d is not None and settings.server.directory is True
    assert (d.url, d.bind_user, d.password, d.base_dn) == (
        "ldaps://dc1.contoso.com",
        "svc-scan@contoso.com",
        "s3cret",
        "DC=contoso,DC=com",
    )
    assert d.ca_file == tmp_path / "ca.pem"  # relative to the configuration file
    assert (d.admin_group, d.cache_seconds, d.connect_timeout, d.timeout) == (
        "Scan Admins",
        60.0,
        2.0,
        4.0,
    )
    assert d.domain == "contoso.com" and d.psp_dn == "CN=PSPs,CN=System,DC=contoso,DC=com"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[directory]\nurl = 'ldap://dc'\n", "needs bind_user, base_dn, password"),
        (BASE + "password = 'x'\nport = 389\n", "unknown key(s) in [directory]: port"),
        (BASE.replace("ldaps://", "http://") + "password = 'x'\n", "url must be ldap://"),
        (BASE + "password = 'x'\ntimeout = 0\n", "timeout must be positive"),
        (BASE + "password_file = 'missing.secret'\n", "cannot read password_file"),
        (
            BASE + "password = 'x'\nschema_dir = 'nowhere'\n",
            "schema_dir " + "{dir}/nowhere lacks PostScan.xsd, WDPScan.xsd, bdsrr-fsf.xsd",
        ),
    ],
)
def test_directory_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert message.format(dir=tmp_path) in str(raised.value)


def test_schema_dir_is_read_relative_to_the_file(tmp_path: Path) -> None:
    """The scan process schemas come from [directory] schema_dir, never looked for (issue 15)."""
    folder = tmp_path / "schemas"
    folder.mkdir()
    for name in SCHEMA_FILES:
        (folder / name).write_text("<xs:schema/>", encoding="utf-8")
    settings = load_settings(write(tmp_path, BASE + "password = 'x'\nschema_dir = 'schemas'\n"))
    assert settings.directory is not None and settings.directory.schema_dir == folder
    without = load_settings(write(tmp_path, BASE + "password = 'x'\n"))
    assert without.directory is not None and without.directory.schema_dir is None
