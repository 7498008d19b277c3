"""The file share filter over SMB (issue 21) against Samba's own client, in one run.

    python3 bench/smb.py [--size-mb 400] [--runs 3] [--json results.json]

A real ``smbd`` (tests/smb_support.py: SMB 3, encryption and signing required, on a loopback
address; needs root and Debian's samba and smbclient) and one file of ``--size-mb`` pseudo-random
bytes.  Each run delivers the file with the filter (``fileshare.run``: temporary name, streamed
writes in ``chunk_size`` pieces, flush, hard link to the final name, journal) and then sends the
same bytes with ``smbclient put`` (C, encrypted too) to the same share.  Printed: seconds and MB/s
of each, the filter's throughput as a ratio of smbclient's (min/median/max over the runs), and
how much this process's peak RSS grew while the filter ran (flat in the file size: streamed).

Nothing here asserts a time; the numbers are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "bindings"),
    str(ROOT / "tests"),
    str(ROOT / "tests/bindings"),
]

from dsc_bindings.filters import FilterSettings, fileshare  # noqa: E402
from dsc_bindings.filters.smbsettings import SmbSettings  # noqa: E402
from dsc_core.model import Document, FileShareInstructions, FilterState  # noqa: E402
from smb_support import PASSWORD, USER, SmbServer, public_folder, unavailable_reason  # noqa: E402
from test_filters_support import make_job  # noqa: E402

MB = 1_000_000
MiB = 1024 * 1024


def make_file(path: Path, size: int) -> None:
    block = hashlib.shake_256(b"bench-smb").digest(MiB)
    with path.open("wb") as f:
        for index in range(0, size, MiB):
            n = min(MiB, size - index)
            f.write(index.to_bytes(8, "big") + block[8:n])


def filter_run(server: SmbServer, source: Path, run: int) -> tuple[float, int]:
    """Seconds to deliver ``source`` with the filter, and the peak RSS growth in KiB."""
    smb = SmbSettings(username=USER, password=PASSWORD, servers=(server.address,), port=server.port)
    settings = FilterSettings(smb=smb)
    size = source.stat().st_size
    job = make_job(FileShareInstructions((rf"\\{server.address}\scans\filter{run}",)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    outcome = fileshare.run(
        job, 0, [(Document(1, "png", size), source)], settings, threading.Event()
    )
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    smb.pool.close()
    if outcome.state is not FilterState.COMPLETED_SUCCESSFULLY:
        raise SystemExit(f"the filter failed: {outcome}")
    (delivered,) = (server.scans / f"filter{run}" / job.user_name).iterdir()
    if delivered.stat().st_size != size:
        raise SystemExit(f"{delivered} has {delivered.stat().st_size} bytes, not {size}")
    return seconds, grown


def smbclient_put(server: SmbServer, source: Path, run: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            "smbclient",
            f"//{server.address}/scans",
            "-p",
            str(server.port),
            "-U",
            f"{USER}%{PASSWORD}",
            "--client-protection=encrypt",
            "-c",
            f'put "{source}" "put{run}.png"',
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=400, help="file size in MB (default 400)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    why = unavailable_reason() or (None if shutil.which("smbclient") else "smbclient is missing")
    if why is not None:
        print(f"skipped: {why}")
        return 0
    size = args.size_mb * MB
    results: dict[str, Any] = {"size_bytes": size, "runs": []}
    with public_folder() as folder, tempfile.TemporaryDirectory() as spool:
        server = SmbServer.create(folder / "smbd")
        server.start()
        try:
            source = Path(spool) / "image.bin"
            make_file(source, size)
            for run in range(1, args.runs + 1):
                ours, grown = filter_run(server, source, run)
                theirs = smbclient_put(server, source, run)
                results["runs"].append(
                    {"filter_s": ours, "smbclient_s": theirs, "rss_growth_kib": grown}
                )
                print(
                    f"run {run}: filter {ours:.2f} s ({size / MB / ours:.0f} MB/s), "
                    f"smbclient put {theirs:.2f} s ({size / MB / theirs:.0f} MB/s), "
                    f"ratio {theirs / ours:.2f}x, peak RSS +{grown / 1024:.1f} MiB"
                )
                shutil.rmtree(server.scans / f"filter{run}")
                (server.scans / f"put{run}.png").unlink()
        finally:
            server.stop()
    ratios = sorted(r["smbclient_s"] / r["filter_s"] for r in results["runs"])
    results["ratio_min_median_max"] = [ratios[0], statistics.median(ratios), ratios[-1]]
    print(
        f"{args.size_mb} MB over SMB 3 (encrypted): filter throughput / smbclient put = "
        f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}x (min/median/max)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
