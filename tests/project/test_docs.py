"""The README and docs/ stay true: their example blocks run as written, their module tables name
the tree, their links lead somewhere, and the README stays a short door (issue 15 point 6;
design.md: no drifting README)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from test_module_graph import core_imports

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(path: Path, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading (``###`` stay inside)."""
    text = _text(path)
    assert f"\n## {heading}" in text, f"{path.name} lost its section {heading!r}"
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_core_embedding_example_runs(spec: Path) -> None:
    (code,) = _python_blocks(_section(DOCS / "architecture.md", "The core contract"))
    exec(compile(code, "docs/architecture.md", "exec"), {"SPEC": spec})


def test_readme_names_the_ci_test_command() -> None:
    ci = _text(ROOT / ".ci" / "run").strip().splitlines()
    last = [line for line in ci if line.strip() and not line.startswith(("#", "set ", "cd "))][-1]
    assert last.strip() in _text(README)


def test_readme_is_a_short_door() -> None:
    """What it is, the two commands, a first scan, where to go next; the rest is in docs/."""
    lines = _text(README).splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    for doc in sorted(DOCS.glob("*.md")):
        assert f"docs/{doc.name}" in _text(README), f"README does not point to docs/{doc.name}"


def test_layout_lists_every_core_module_once() -> None:
    """The dsc_core table names each module of the tree, one line each, bottom layer first."""
    section = _section(DOCS / "architecture.md", "Layout")
    section = section.split("`bindings/dsc_bindings/` (import name", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+\.py)` \|", section, re.M)
    on_disk = sorted(p.name for p in (ROOT / "dsc_core").glob("*.py"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    # "bottom layer first": each module imports only modules listed before it.
    position = {
        ("dsc_core." + name.removesuffix(".py")).removesuffix(".__init__"): i
        for i, name in enumerate(listed)
    }
    for module, imported in core_imports().items():
        for other in imported:
            assert position[other] < position[module], f"{module} imports {other}, listed later"


def test_layout_lists_every_bindings_module_once_under_its_subpackage() -> None:
    """The dsc_bindings tables name each module of bindings/dsc_bindings, no more, each module
    of a subpackage under that subpackage's heading."""
    section = _section(DOCS / "architecture.md", "Layout")
    listed: list[str] = []
    for part in re.split(r"^### ", section, flags=re.M)[1:]:
        heading, body = part.split("\n", 1)
        folder = re.match(r"`([a-z_]+)/`", heading)
        for path in re.findall(r"^\| `dsc_bindings/([a-z0-9_/]+\.py)` \|", body, re.M):
            assert path.startswith(f"{folder.group(1)}/") if folder else "/" not in path, path
            listed.append(path)
    package = ROOT / "bindings" / "dsc_bindings"
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))


def test_adding_an_operation_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example, as written: its operation, registered the way step 3 does (in a
    registry for this test only), answers through the in-process transport, and its test
    passes."""
    import dsc_core.server
    from dsc_core.registry import OPERATIONS, Registry

    declaration, test = _python_blocks(_section(DOCS / "contributing.md", "Adding an operation"))
    namespace: dict[str, object] = {}
    exec(compile(declaration, "docs/contributing.md", "exec"), namespace)
    monkeypatch.setattr(
        dsc_core.server, "OPERATIONS", Registry([*OPERATIONS, namespace["OPERATION"]])
    )
    exec(compile(test, "docs/contributing.md", "exec"), namespace)
    run = namespace["test_get_active_job_count"]
    assert callable(run)
    run()


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize(
    "page", [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_relative_links_lead_to_a_file_and_heading(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(page)):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL: not ours to check offline
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in _anchors(linked), f"{page.name}: link to {target}: no such heading"


def test_rulings_index_covers_every_spec_ruling_and_leads_to_ours() -> None:
    index = _section(DOCS / "rulings.md", "Index")
    numbers = [int(n) for n in re.findall(r"^\| R(\d+) ", index, re.M)]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 15
    rulings = _anchors(DOCS / "rulings.md") - {"index", "rulings-of-our-own"}
    linked = set(re.findall(r"\]\(#([^)]+)\)", index))
    assert linked == rulings, "every ruling of our own is in the index, and only those"


def test_the_engines_example_is_a_configuration_the_server_reads(tmp_path: Path) -> None:
    """docs/operating.md's [store]/[spool] example (issue 17) loads as written."""
    from dsc_bindings.settings import load_settings

    section = _section(DOCS / "operating.md", "Job store on PostgreSQL and S3")
    [block] = re.findall(r"```toml\n(.*?)```", section, re.S)
    config = tmp_path / "dsc.toml"
    config.write_text(block)
    storage = load_settings(config, data_dir=tmp_path / "data").storage
    assert (storage.store_kind, storage.spool_kind) == ("postgresql", "s3")
    assert storage.dsn.startswith("postgresql://dsc@db1.contoso.com/dsc")
    assert storage.password_file == Path("/etc/dsc/db.secret")
    assert storage.pool_timeout_seconds == 5.0
    assert storage.s3 is not None
    assert (storage.s3.bucket, storage.s3.part_size, storage.s3.max_part_buffers) == (
        "dsc-spool",
        8 << 20,
        16,
    )


def test_the_cluster_example_is_a_configuration_the_server_reads(tmp_path: Path) -> None:
    """docs/operating.md's [cluster] example (issue 18) loads as written."""
    from dsc_bindings.settings import load_settings
    from dsc_bindings.store.instances import ClusterSettings

    section = _section(DOCS / "operating.md", "Several instances")
    block, behind_a_balancer = re.findall(r"```toml\n(.*?)```", section, re.S)
    config = tmp_path / "dsc.toml"
    config.write_text(block)
    cluster = load_settings(config, data_dir=tmp_path / "data").cluster
    assert cluster == ClusterSettings("dsc-a", 5.0, 30.0, 86400.0)
    # The instance's part of "Three instances behind HAProxy".
    config.write_text(behind_a_balancer)
    settings = load_settings(config, data_dir=tmp_path / "data")
    assert settings.listen.monitor == ("0.0.0.0", 9362)
    assert settings.cluster.instance_name == "dsc-a"


def test_the_haproxy_example_is_valid() -> None:
    """``haproxy -c`` on docs/operating.md's HAProxy block as written (the failover tests run
    it with their own addresses: tests/cluster_support.py)."""
    from cluster_support import HAPROXY, haproxy_block

    if not os.access(HAPROXY, os.X_OK):
        pytest.skip(f"no HAProxy at {HAPROXY}; .ci/run installs Debian's haproxy")
    # The stats socket's folder (/run/haproxy) exists only where the package made it.
    block = haproxy_block().replace("/run/haproxy/dsc.sock", "/tmp/dsc-docs-check.sock")
    done = subprocess.run(
        [HAPROXY, "-c", "-f", "/dev/stdin"], input=block, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


NGINX = "/usr/sbin/nginx"


def test_the_nginx_example_is_valid(tmp_path: Path) -> None:
    """``nginx -t`` on docs/operating.md's nginx.conf: the stream (TLS passthrough) block and
    the http block (TLS at nginx, for the ASGI app) together, certificates made by trustme."""
    import trustme

    if not os.access(NGINX, os.X_OK) or not Path(STREAM_MODULE).exists():
        pytest.skip(
            f"no {NGINX} with {STREAM_MODULE}; .ci/run installs Debian's nginx and "
            "libnginx-mod-stream"
        )
    section = _section(DOCS / "operating.md", "Several instances")
    stream, http = re.findall(r"```nginx\n(.*?)```", section, re.S)
    ca = trustme.CA()
    server = ca.issue_cert("dsc.example")
    paths = {
        "/etc/dsc/server.pem": tmp_path / "server.pem",
        "/etc/dsc/server.key": tmp_path / "server.key",
        "/etc/dsc/scanners-ca.pem": tmp_path / "ca.pem",
    }
    server.cert_chain_pems[0].write_to_path(str(paths["/etc/dsc/server.pem"]))
    server.private_key_pem.write_to_path(str(paths["/etc/dsc/server.key"]))
    ca.cert_pem.write_to_path(str(paths["/etc/dsc/scanners-ca.pem"]))
    config = stream + http
    for old, new in paths.items():
        assert old in config, old
        config = config.replace(old, str(new))
    # Where nginx -t writes its pid and logs: the test's folder, not /var.
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n" + config)
    done = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test is successful" in done.stderr, done.stderr


STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
