"""Users and authorization (R10): who made a request, the name a job records for its user, and
who may manage the repository."""

from __future__ import annotations

from . import faults
from .config import ServerConfig
from .transport import RequestInfo


def identity(config: ServerConfig, info: RequestInfo) -> str:
    """The authenticated identity when client certificates are required, else ''."""
    if config.require_client_certificates:
        return info.identity or ""
    return ""


def user_name(config: ServerConfig, info: RequestInfo, user_identifier: str) -> str:
    """JobOriginatingUserName: the certificate identity, else the SID mapped by the user
    directory (unmapped: the SID itself)."""
    if config.require_client_certificates and info.identity:
        return info.identity
    return config.user_directory.get(user_identifier, user_identifier)


def require_scan_admin(config: ServerConfig, info: RequestInfo) -> None:
    """R4 step 5: MS-BDSRR needs a scan administrator when client certificates are required;
    without them every client is one (said in the log at start)."""
    if config.require_client_certificates and (info.identity or "") not in config.scan_admins:
        raise faults.not_scan_admin()
