"""The UDP side of port 5362 (bdsrr §1.9, 3.2.3; R11): answer directed Probes with the core."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from dsc_bindings.discovery.probe_limit import ProbeLimiter
from dsc_bindings.runtime.service import ScanService
from dsc_core.discovery import answer_datagram

log = logging.getLogger("dsc.discovery")
MAX_DATAGRAM = 65_507


class UdpDiscovery:
    """A thread answering Probe datagrams; everything else is ignored (see dsc_core.discovery)."""

    def __init__(
        self,
        service: ScanService,
        host: str,
        port: int,
        limiter: ProbeLimiter | None = None,
        *,
        dropped: Callable[[], object] | None = None,
    ) -> None:
        self.service = service
        #: Replies per source address are rate-limited (.probe_limit, issue 14).
        self.limiter = limiter or ProbeLimiter()
        #: Counts a Probe dropped by the limiter (the composition root wires the metric:
        #: dsc_discovery_probes_dropped_total).
        self._dropped = dropped
        self.sock = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
        )
        self.sock.bind((host, port))
        self.sock.settimeout(0.5)
        self.port: int = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsc-udp-discovery", daemon=True)

    def start(self) -> int:
        self._thread.start()
        log.info("answering WS-Discovery Probe datagrams on UDP port %d", self.port)
        return self.port

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(MAX_DATAGRAM)
            except TimeoutError:
                continue
            except OSError:
                break
            if not self.limiter.allow(str(peer[0])):
                if self._dropped is not None:
                    self._dropped()
                continue
            try:
                answer = self.service.answer_datagram(data, answer_datagram)
                if answer is not None:
                    self.sock.sendto(answer, peer)
            except Exception:  # a bad datagram must never stop discovery
                log.exception("probe from %s failed", peer[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
