"""The seam to a user directory (Active Directory over LDAP, R10/R14), without any I/O.

The core cannot ask a directory anything.  Instead, an exchange says what its request needs
*before* it is answered, and the binding brings the answers::

    needs = exchange.lookups()           # after the body is fed; empty unless config.directory
    answers = directory.answer(needs)     # the binding: LDAP, cached, off the event loop
    outcome = exchange.end(now, directory=answers)   # -> RequestInfo.directory

An operation declares what it needs (``Operation.lookups``; an ``admin_only`` one needs its
identity's administrator status); ``users.py`` and the operations read the answers.

Three things come from the directory: the account (``name@domain``) of a WS-DSP UserIdentifier
SID or of a certificate identity (R10, R14), whether an identity is a scan administrator (R10:
members of one group, nested included), and the display name of a PSP_Identifier (R14).  A
directory that cannot be reached is answered with ``DirectoryAnswers(unavailable=True)``: the
operations that needed it give the R4 step 9 fault ServerErrorTemporaryError, the others go on.
Without answers (``directory=None``) the core uses the tables of :class:`ServerConfig` as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class Lookups:
    """What one request needs from the directory.  False when it needs nothing."""

    #: WS-DSP UserIdentifier SIDs to resolve to accounts (R10).
    sids: tuple[str, ...] = ()
    #: A TLS client certificate identity to match to an account (R10).
    identity: str | None = None
    #: An identity whose scan-administrator membership decides the request (R10, R13).
    admin: str | None = None
    #: PSP_Identifier values whose display names are wanted (R14).
    processes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sids or self.identity or self.admin or self.processes)


@dataclass(frozen=True, slots=True)
class DirectoryAnswers:
    """The directory's answers to :class:`Lookups`.  A key that is absent was not found."""

    #: SID or certificate identity -> ``name@domain``.
    users: Mapping[str, str] = field(default_factory=dict)
    #: Identities that are scan administrators.
    admins: frozenset[str] = frozenset()
    #: PSP_Identifier -> display name.
    process_names: Mapping[str, str] = field(default_factory=dict)
    #: The directory could not be asked: R4 step 9 (ServerErrorTemporaryError) where needed.
    unavailable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))
        object.__setattr__(self, "process_names", MappingProxyType(dict(self.process_names)))
