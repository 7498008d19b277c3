"""``dsc process ...`` (scan processes in the directory, as the Scan Management console kept
them) and the directory half of ``dsc scan --process NAME`` (a DSM device: bind as the user,
read the process, send its instructions)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lxml import etree

from dsc_bindings.console.confirm import add_yes_option, can_confirm, confirm
from dsc_bindings.console.output import Column, print_pairs, print_table
from dsc_bindings.console.support import EXIT_OK, EXIT_USAGE, CliError
from dsc_bindings.directory.ldap import Directory, DirectoryError, DirectorySettings, sid_to_text
from dsc_bindings.directory.scan_processes import (
    COLORS,
    FORMATS,
    ProcessStore,
    ScanProcess,
    ScanSettings,
    ValidationError,
    post_scan_instructions,
)
from dsc_bindings.exposure import is_local_only, url_hostname

PASSWORD_ENV = "DSC_PASSWORD"


def _settings(args: argparse.Namespace) -> tuple[DirectorySettings, str]:
    """``[directory]`` of --config, and this server's advertised base URL (the default target)."""
    from dsc_bindings.settings import ConfigError, load_settings

    if args.config is None:
        raise CliError(
            "give --config FILE: its [directory] section says which directory", EXIT_USAGE
        )
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc
    if settings.directory is None:
        raise CliError(
            f"{args.config} has no [directory] section (see docs/directory.md)", EXIT_USAGE
        )
    return settings.directory, settings.server.base_url


def _scan_server(args: argparse.Namespace, base_url: str) -> str:
    """The psp:ScanRepository to publish: ``--scan-server``, else the host of this server's
    advertised base URL (``[server] public_url``).  Devices reach the server by this name
    (dsm-and-stack.md: "the FQDN of the DSM scan server"), so a loopback or wildcard one is
    refused (issue 14): published, it sends every device's scans to the device itself."""
    if args.scan_server is not None:
        if is_local_only(args.scan_server):
            raise CliError(
                f"--scan-server {args.scan_server} is not an address devices can reach: give "
                "the scan server's DNS name (e.g. scan.example.com)",
                EXIT_USAGE,
            )
        return str(args.scan_server)
    host = url_hostname(base_url)
    if is_local_only(host):
        raise CliError(
            f"this server's public name is unknown ({args.config} advertises {base_url}, "
            'which devices cannot reach): set [server] public_url = "https://scan.example.com:5362" '
            "in it, or give --scan-server NAME",
            EXIT_USAGE,
        )
    return host


def _password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.password_file}: {exc.strerror}", EXIT_USAGE) from exc
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if sys.stdin.isatty():
        return getpass.getpass(f"password of {args.as_user}: ")
    raise CliError(
        f"no password for {args.as_user}: use --password-file or ${PASSWORD_ENV}", EXIT_USAGE
    )


@contextmanager
def _store(
    args: argparse.Namespace, loaded: tuple[DirectorySettings, str] | None = None
) -> Iterator[tuple[ProcessStore, str]]:
    settings, base_url = loaded or _settings(args)
    directory = Directory(settings)
    as_user = getattr(args, "as_user", None)
    try:
        conn = directory.connect(as_user, _password(args) if as_user else None)
    except DirectoryError as exc:
        raise CliError(f"directory: {exc}") from exc
    try:
        yield ProcessStore(directory, conn), base_url
    except (DirectoryError, ValidationError) as exc:
        raise CliError(str(exc)) from exc
    finally:
        conn.unbind()
        directory.close()


# --- dsc process list | show | add | edit | rm -------------------------------------------------


def _destinations(p: ScanProcess) -> list[str]:
    out = [f"share {s}" for s in p.shares]
    out += [f"sharepoint {s}" for s in p.sharepoint_sites]
    out += [f"email {a}" for a in p.emails]
    if p.email_scan_user:
        out.append("email the scan user")
    return out


def _settings_text(p: ScanProcess) -> str:
    s = p.settings
    return f"{s.format} {s.resolution} dpi {s.color} {'duplex' if s.duplex else 'simplex'}"


def cmd_list(args: argparse.Namespace) -> int:
    with _store(args) as (store, _):
        processes = store.all()
    if args.json:
        print(json.dumps([p.as_dict() for p in processes], indent=2))
        return EXIT_OK
    if not processes:
        print("(no scan processes)")
        return EXIT_OK
    columns = [
        Column("NAME", keep=True),
        Column("DESTINATIONS"),
        Column("SCAN"),
        Column("SERVER"),
        Column("ALLOWED", keep=True),
        Column("IDENTIFIER", wide_only=True),
    ]
    rows = [
        [
            p.name,
            ", ".join(_destinations(p)) or "(none)",
            _settings_text(p),
            p.scan_repository,
            ", ".join(p.allow) or "everyone",
            p.identifier,
        ]
        for p in processes
    ]
    print_table(columns, rows, wide=args.wide)
    return EXIT_OK


def _get(store: ProcessStore, name: str) -> ScanProcess:
    process = store.get(name)
    if process is None:
        raise CliError(f"no scan process named {name!r} (see `dsc process list`)")
    return process


def _print(process: ScanProcess) -> None:
    pairs = [
        ("Name", process.name),
        ("Identifier", process.identifier),
        ("Scan server", process.scan_repository),
        ("Scan", _settings_text(process)),
        ("Document name", process.document_root_name),
        ("Continue on error", "yes" if process.continue_on_error else "no"),
        ("Allowed", ", ".join(process.allow) or "everyone (authenticated users)"),
    ]
    pairs += [("Destination", d) for d in _destinations(process) or ["(none)"]]
    print_pairs(pairs)


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args) as (store, _):
        process = _get(store, args.name)
        if args.xml:
            text = process.stored or process.psp_string()
            print(etree.tostring(etree.fromstring(text.encode()), pretty_print=True).decode())
            return EXIT_OK
    if args.json:
        print(json.dumps(process.as_dict(), indent=2))
    else:
        _print(process)
    return EXIT_OK


def _apply_options(process: ScanProcess, args: argparse.Namespace) -> ScanProcess:
    """Options given replace what they name; destinations are replaced as a whole when any
    destination option is given."""
    changes: dict[str, Any] = {}
    if args.share or args.sharepoint or args.email or args.email_scan_user is not None:
        changes.update(
            shares=tuple(args.share or ()),
            sharepoint_sites=tuple(args.sharepoint or ()),
            emails=tuple(args.email or ()),
            email_scan_user=bool(args.email_scan_user),
        )
    if args.continue_on_error is not None:
        changes["continue_on_error"] = args.continue_on_error
    if args.root_name is not None:
        changes["document_root_name"] = args.root_name
    if args.scan_server is not None:
        changes["scan_repository"] = _scan_server(args, "")
    if args.allow is not None:
        changes["allow"] = tuple(args.allow)
    if args.allow_everyone:
        changes["allow"] = ()
    s = process.settings
    changes["settings"] = ScanSettings(
        format=args.format or s.format,
        resolution=args.resolution or s.resolution,
        color=args.color or s.color,
        duplex=s.duplex if args.duplex is None else args.duplex,
    )
    new = replace(process, **changes)
    if not new.has_destination:
        raise CliError(
            "a scan process needs a destination: --share, --sharepoint, --email or "
            "--email-scan-user",
            EXIT_USAGE,
        )
    return new


def cmd_add(args: argparse.Namespace) -> int:
    loaded = _settings(args)
    host = _scan_server(args, loaded[1])  # before binding: nothing to undo when it is refused
    with _store(args, loaded) as (store, _):
        try:
            identifier = str(uuid.UUID(args.id)).upper() if args.id else str(uuid.uuid4()).upper()
        except ValueError as exc:
            raise CliError(f"--id must be a GUID, not {args.id!r}", EXIT_USAGE) from exc
        process = _apply_options(
            ScanProcess(args.name, identifier, scan_repository=host, document_root_name="Scan"),
            args,
        )
        store.add(process)
    _say(args, f"scan process {process.name!r} added ({process.identifier})", process)
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    with _store(args) as (store, _):
        old = _get(store, args.name)
        new = _apply_options(old, args)
        store.update(old, new, allow_changed=new.allow != old.allow)
    _say(args, f"scan process {new.name!r} changed", new)
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    can_confirm(args.yes, "dsc process rm")
    with _store(args) as (store, _):
        process = _get(store, args.name)
        confirm(
            f"Remove the scan process {process.name!r} ({process.identifier}) from the "
            "directory? Devices stop offering it.",
            args.yes,
        )
        store.remove(process)
    _say(args, f"scan process {process.name!r} removed", process)
    return EXIT_OK


def _say(args: argparse.Namespace, text: str, process: ScanProcess) -> None:
    if args.json:
        print(json.dumps(process.as_dict(), indent=2))
    else:
        print(text)


# --- dsc scan --process --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceScan:
    """What a DSM device sends after reading a process as the user."""

    user_sid: str
    process: ScanProcess
    instructions: etree._Element
    server_url: str


def device_scan(args: argparse.Namespace) -> DeviceScan:
    """Bind as the user (``--as``; default: the configured account), find the user's SID and
    the process the user can see, and say where to send it."""
    settings, _ = _settings(args)
    directory = Directory(settings)
    as_user = args.as_user or settings.bind_user
    try:
        conn = directory.connect(as_user, _password(args) if args.as_user else settings.password)
    except DirectoryError as exc:
        raise CliError(f"directory: {exc}") from exc
    try:
        attribute = "userPrincipalName" if "@" in as_user else "sAMAccountName"
        from ldap3.utils.conv import escape_filter_chars

        conn.search(
            settings.base_dn,
            f"({attribute}={escape_filter_chars(as_user)})",
            attributes=["objectSid"],
        )
        found = [r for r in conn.response or [] if r.get("type") == "searchResEntry"]
        if not found:
            raise CliError(f"{as_user} is not in the directory under {settings.base_dn}")
        sid = sid_to_text(found[0]["raw_attributes"]["objectSid"][0])
        store = ProcessStore(directory, conn)
        process = store.get(args.process)
        if process is None:
            raise CliError(f"{as_user} sees no scan process named {args.process!r}")
        instructions = post_scan_instructions(process.stored or process.psp_string())
    except (DirectoryError, ValidationError) as exc:
        raise CliError(f"scan process {args.process!r}: {exc}") from exc
    finally:
        conn.unbind()
        directory.close()
    server = args.server or f"http://{process.scan_repository}:5362/ScanServer"
    return DeviceScan(sid, process, instructions, server)


# --- argument parsing --------------------------------------------------------------------------


def directory_options(p: argparse.ArgumentParser, *, as_help: str) -> None:
    p.add_argument("--config", type=Path, help="configuration file with a [directory] section")
    p.add_argument("--as", dest="as_user", metavar="USER", help=as_help)
    p.add_argument(
        "--password-file",
        type=Path,
        help=f"password of --as USER (default: ${PASSWORD_ENV}, else asked)",
    )


def _process_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("destinations (given together, they replace the old ones)")
    g.add_argument("--share", action="append", metavar="UNC", help=r"file share \\host\share\path")
    g.add_argument("--sharepoint", action="append", metavar="URL", help="SharePoint site URL")
    g.add_argument("--email", action="append", metavar="ADDRESS", help="e-mail address")
    g.add_argument(
        "--email-scan-user",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="e-mail the scanning user (the directory's mail)",
    )
    g = p.add_argument_group("processing and scan settings")
    g.add_argument(
        "--continue-on-error",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the other destinations when one fails",
    )
    g.add_argument("--root-name", help="document file name root (default Scan)")
    g.add_argument("--format", choices=FORMATS, help="document format (default pdf-a)")
    g.add_argument("--resolution", type=int, metavar="DPI", help="resolution (default 300)")
    g.add_argument("--color", choices=COLORS, help="colour mode (default RGB24)")
    g.add_argument(
        "--duplex", action=argparse.BooleanOptionalAction, default=None, help="both sides"
    )
    g.add_argument(
        "--scan-server",
        metavar="NAME",
        help="the scan server devices send to, a DNS name (default: the host of [server] "
        "public_url; a loopback name is refused)",
    )
    g = p.add_argument_group("who may use it")
    g.add_argument(
        "--allow",
        action="append",
        metavar="GROUP",
        help="only members of GROUP see the process (repeatable); default: every user",
    )
    if p.prog.endswith("edit"):
        g.add_argument(
            "--allow-everyone", action="store_true", help="remove the --allow restriction"
        )
    else:
        p.set_defaults(allow_everyone=False)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "process",
        help="scan processes in the directory (list, show, add, edit, rm)",
        description="Manage the scan processes that devices read from Active Directory "
        "(msImaging-PostScanProcess objects under CN=PSPs,CN=System). Reads [directory] "
        "from --config.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    as_help = "bind as this user (UPN) instead of the configured account"
    specs: list[tuple[str, Callable[[argparse.Namespace], int], str, bool]] = [
        ("list", cmd_list, "list the scan processes", False),
        ("show", cmd_show, "one scan process in detail", True),
        ("add", cmd_add, "publish a new scan process", True),
        ("edit", cmd_edit, "change a scan process", True),
        ("rm", cmd_rm, "remove a scan process (asks first; --yes for scripts)", True),
    ]
    for name, func, text, named in specs:
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        directory_options(a, as_help=as_help)
        a.add_argument("--json", action="store_true", help="print JSON for scripts")
        if named:
            a.add_argument("name", metavar="NAME", help="the process's display name")
        if name in ("add", "edit"):
            _process_options(a)
        if name == "add":
            a.add_argument("--id", help="PSP identifier (GUID; default: a new one)")
        if name == "show":
            a.add_argument("--xml", action="store_true", help="print the PSPString XML")
        if name == "list":
            a.add_argument("--wide", action="store_true", help="print every cell whole")
        if name == "rm":
            add_yes_option(a)
        a.set_defaults(func=func)
