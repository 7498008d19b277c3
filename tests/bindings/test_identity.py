"""The installation identity in the data directory (R13 on R1/R11): generated at the first
start, kept across restarts, settable in the configuration; two data directories are two
devices; each start counts (the AppSequence InstanceId)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dsc_bindings.runtime.installation import IDENTITY_FILE, load_installation, record_start
from dsc_bindings.settings import load_settings


def test_generated_once_and_kept(tmp_path: Path) -> None:
    first = load_installation(tmp_path)
    again = load_installation(tmp_path)
    assert first == again
    assert len({first.device_uuid, first.dsp_service_uuid, first.dsc_service_uuid}) == 3
    for value in (first.device_uuid, first.dsp_service_uuid, first.dsc_service_uuid):
        uuid.UUID(value)
    assert first.starts == 0
    assert record_start(tmp_path).starts == 1
    assert record_start(tmp_path).starts == 2
    assert load_installation(tmp_path).device_uuid == first.device_uuid


def test_two_data_directories_are_two_devices(tmp_path: Path) -> None:
    one = load_settings(data_dir=tmp_path / "one").with_installation_identity().server
    two = load_settings(data_dir=tmp_path / "two").with_installation_identity().server
    assert one.device_uuid != two.device_uuid
    assert one.dsp_service_uuid != two.dsp_service_uuid
    same = load_settings(data_dir=tmp_path / "one").with_installation_identity().server
    assert same.device_uuid == one.device_uuid and same.dsc_url == one.dsc_url


def test_the_configuration_wins(tmp_path: Path) -> None:
    chosen = str(uuid.uuid4())
    config = tmp_path / "dsc.toml"
    config.write_text(f'[server]\ndevice_uuid = "{chosen}"\n', encoding="utf-8")
    server = load_settings(config, data_dir=tmp_path / "d").with_installation_identity().server
    stored = load_installation(tmp_path / "d")
    assert server.device_uuid == chosen
    assert server.dsp_service_uuid == stored.dsp_service_uuid  # the others still generated


def test_a_broken_file_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({"device_uuid": "nope"}), encoding="utf-8")
    with pytest.raises(ValueError, match="identity file"):
        load_installation(tmp_path)
