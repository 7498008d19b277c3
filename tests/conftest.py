"""Shared fixtures.  The specification folder is read through ``../shared/spec`` beside the
project (or ``$DSC_SPEC_DIR``); tests that need it skip with a clear reason where it is absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from lxml import etree

ROOT = Path(__file__).resolve().parent.parent


def spec_dir() -> Path | None:
    candidates = [os.environ.get("DSC_SPEC_DIR"), str(ROOT.parent / "shared" / "spec")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "RULINGS.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def spec() -> Path:
    found = spec_dir()
    if found is None:
        pytest.skip("specification folder not found: set DSC_SPEC_DIR or place shared/spec "
                    "beside the project")
    return found


@pytest.fixture(scope="session")
def bdsrr_schema(spec: Path, tmp_path_factory: pytest.TempPathFactory) -> etree.XMLSchema:
    """bdsrr.xsd with its imports; the test copy corrects the SendImangeFailed typo (R3)."""
    folder = tmp_path_factory.mktemp("xsd")
    for name in ("bdsrr.xsd", "PostScan.xsd", "WDPScan.xsd"):
        shutil.copy(spec / name, folder / name)
    xsd = folder / "bdsrr.xsd"
    xsd.write_text(xsd.read_text(encoding="utf-8").replace("SendImangeFailed", "SendImageFailed"),
                   encoding="utf-8")
    return etree.XMLSchema(etree.parse(str(xsd)))
