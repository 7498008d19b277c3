"""The health checks of a scan service: what a scan needs (issue 14, section 2), as
:class:`~.health.Probe` objects run off the loop by :class:`~.health.HealthMonitor`."""

from __future__ import annotations

import functools

from dsc_bindings.filters.smbfolder import share_problem
from dsc_bindings.observe.health import Probe, smtp_accepts, writable_directory
from dsc_bindings.runtime.service import ScanService

__all__ = ["health_probes"]


def health_probes(service: ScanService) -> list[Probe]:
    """The checks of :mod:`.health` for ``service``, with its current configuration."""
    store = service.store
    # Where the spool writes: its folder, or (S3) the data folder with its copies and parts.
    spool = store.local_dir if store is not None else service.data_dir / "spool"
    probes = [
        Probe(
            "store",
            lambda: store.quick_check() if store is not None else "the job store is not open",
        ),
        Probe("data", functools.partial(writable_directory, spool), subject=str(spool)),
    ]
    cluster = service.cluster
    if cluster is not None:
        # No I/O: the heartbeat thread's last result (runtime/cluster.py).
        probes.append(Probe("cluster", cluster.problem))
    for prefix, root in service.filter_settings.share_roots:
        probes.append(
            Probe(
                f"share {prefix}",
                functools.partial(writable_directory, root),
                subject=str(root),  # a hung network mount
            )
        )
    smb = service.filter_settings.smb
    if smb is not None:
        for unc in smb.health_shares:
            probes.append(
                Probe(f"smb {unc}", functools.partial(share_problem, smb, unc), subject=unc)
            )
    directory = service.directory
    if directory is not None:

        def bind() -> str | None:
            assert directory is not None
            try:
                directory.connect().unbind()
            except Exception as exc:  # DirectoryError, ldap3's own: named in the answer
                # Each line names the directory, also where the reason does not
                # (refused credentials).
                url, problem = directory.settings.url, str(exc)
                return problem if problem.startswith(url) else f"{url}: {problem}"
            return None

        probes.append(Probe("directory", bind, essential=False, subject=directory.settings.url))
    mail = service.filter_settings
    if mail.smtp_configured:
        probes.append(
            Probe(
                "smtp",
                functools.partial(
                    smtp_accepts, mail.smtp_host, mail.smtp_port, min(5.0, mail.smtp_timeout)
                ),
                essential=False,
                subject=f"relay {mail.smtp_host}:{mail.smtp_port}",
            )
        )
    return probes
