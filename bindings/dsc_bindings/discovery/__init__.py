"""UDP WS-Discovery: directed Probes answered by the core, rate-limited per source."""
