"""Users and authorization (R10): who made a request, the name a job records for its user, and
who may manage the repository."""

from __future__ import annotations

from . import faults, names
from .config import ServerConfig
from .directory import DirectoryAnswers
from .transport import RequestInfo


def identity(config: ServerConfig, info: RequestInfo) -> str:
    """The authenticated identity when client certificates are required, else ''."""
    if config.require_client_certificates:
        return info.identity or ""
    return ""


def directory_answers(info: RequestInfo, ns: str) -> DirectoryAnswers | None:
    """The directory's answers for this request (R14); a directory that could not be asked is
    the R4 step 9 fault ServerErrorTemporaryError of service ``ns``."""
    answers = info.directory
    if answers is not None and answers.unavailable:
        raise faults.store_failed(ns, temporary=True)
    return answers


def user_name(config: ServerConfig, info: RequestInfo, user_identifier: str) -> str:
    """JobOriginatingUserName: the certificate identity, else the SID; each mapped to its
    account by the directory (R14), else the SID by the configured table (unmapped: as is)."""
    key = user_identifier
    if config.require_client_certificates and info.identity:
        key = info.identity
    answers = directory_answers(info, names.DSP)
    if answers is not None and key in answers.users:
        return answers.users[key]
    if key != user_identifier:
        return key
    return config.user_directory.get(key, key)


def is_scan_admin(config: ServerConfig, info: RequestInfo) -> bool:
    """R10: everyone without client certificates (said in the log at start); with them, the
    configured identities and, with a directory, the members of its group (R14)."""
    if not config.require_client_certificates:
        return True
    identity_ = info.identity or ""
    # Without the directory first: a configured administrator needs no directory, even when
    # it is down (directory_answers raises the temporary fault then).
    return is_listed_admin(config, identity_, None) or is_listed_admin(
        config, identity_, directory_answers(info, names.DSC)
    )


def is_listed_admin(config: ServerConfig, identity_: str, answers: DirectoryAnswers | None) -> bool:
    """Whether ``identity_`` is named a scan administrator: in ``scan_admins``, or a member of
    the directory's admin group (R14, in ``answers``).  What R10 asks of a certificate's
    identity, and of a user signing in to the web console with a password."""
    if identity_ and identity_ in config.scan_admins:
        return True
    return answers is not None and bool(identity_) and identity_ in answers.admins


def require_scan_admin(config: ServerConfig, info: RequestInfo) -> None:
    """R4 step 5: MS-BDSRR needs a scan administrator when client certificates are required."""
    if not is_scan_admin(config, info):
        raise faults.not_scan_admin(info.identity)
