"""The exchange: one HTTP request read, dispatched to its operation, and answered.

Feed the body in chunks of any size, then end it.  The exchange reads a plain SOAP body, or an
MTOM ``multipart/related`` one (R8) whose root part is read as soon as it is complete: when the
operation declares ``begin_upload`` (SendImage), its attachment then streams to the store as
commands while the body is still arriving.  Any fault, at any point, becomes the fault reply of
R4; a store failure reported by the binding becomes the fault of R4 step 9 and undoes the
operation's change.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import datetime
from typing import Any

from . import faults, names, soap
from .commands import AbortDocument, AppendDocument, BeginDocument, Command
from .content_type import parse_content_type
from .directory import DirectoryAnswers, Lookups
from .errors import UsageError
from .mime import MultipartError, MultipartReader, PartData, PartEnd, PartStart
from .operation import Operation, OpResult, Request, Upload
from .registry import Registry
from .state import ServerState
from .transfer_encoding import PartDecoder, TransferEncodingError, decoder_for
from .transport import Outcome, Reply, RequestInfo
from .users import identity, require_scan_admin
from .xmlread import Element, check_tree, parse_xml
from .xmlwrite import SPLICE_MARKER, SPLICE_NS, SPLICE_ONLY, splice_payload

SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"
#: SOAP 1.1 HTTP binding (SOAP 1.1 §6.1.1): the media type of a SOAP/1.1 VersionMismatch.
SOAP11_CONTENT_TYPE = "text/xml; charset=utf-8"

#: Clients send the same few Content-Type values; the parsed value is immutable (profiled:
#: parsing was about 4 us of each small request).
_content_type = functools.lru_cache(maxsize=256)(parse_content_type)


class Exchange:
    """One HTTP request: feed the body in chunks of any size, then end it.

    States: feeding -> ended -> (optionally) store_failed.  Misuse raises :class:`UsageError`.
    """

    def __init__(self, state: ServerState, operations: Registry, info: RequestInfo) -> None:
        self.state = state
        self.operations = operations
        self.info = info
        self._limits = state.config.limits
        self._buffer = bytearray()
        self._overflow = False
        self._fault: faults.SoapFault | None = None
        self._ended = False
        self._result: OpResult | None = None
        self._envelope: soap.Envelope | None = None
        #: Addressing headers of an envelope refused before it was read (RelatesTo, R4).
        self._salvaged: soap.Addressing | None = None
        self._reply_id = ""
        self._multipart: MultipartReader | None = None
        self._part = 0  # index of the current MIME part (1 = root)
        #: The current part's Content-Transfer-Encoding decoder (None: identity), for the root
        #: part and the image (docs/rulings.md "Transfer-encoded MIME parts").
        self._decoder: PartDecoder | None = None
        #: The operation's arguments, when read early for its upload (a 1-tuple: None is a
        #: valid argument value).
        self._early_args: tuple[Any] | None = None
        self._upload: Upload | None = None
        self._in_upload = False
        #: False once the binding said it could not read the shared job rows (rows_unread).
        self._rows_current = True
        #: Jobs whose shared rows the binding cannot read (rows_unreadable): a newer server's,
        #: and those no server reads.
        self._unreadable: frozenset[str] = frozenset()
        self._corrupt: frozenset[str] = frozenset()
        ctype = _content_type(info.content_type or "")
        if ctype.media_type == "multipart/related":
            boundary = ctype.param("boundary")
            if not boundary:
                self._fault = faults.malformed("The multipart request has no boundary.")
            else:
                try:
                    self._multipart = MultipartReader(
                        boundary,
                        max_header_bytes=self._limits.max_part_header_bytes,
                        max_preamble_bytes=self._limits.max_part_header_bytes,
                    )
                except MultipartError as exc:  # a boundary the reader refuses (R4 step 1)
                    self._fault = faults.malformed(f"The MIME body is malformed: {exc.reason}")

    # --- feeding ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Command]:
        if self._ended:
            raise UsageError("feed() after end()")
        if not data:
            return []
        if self._multipart is None:
            if self._fault is None:
                self._keep(data)
            return []
        if self._fault is not None and not self._in_upload:
            return []
        try:
            events = self._multipart.feed(data)
        except MultipartError as exc:
            # Parts completed before the error count, as they would with smaller chunks.
            commands = self._on_parts(exc.events)
            return commands + self._fail(
                faults.malformed(f"The MIME body is malformed: {exc.reason}")
            )
        return self._on_parts(events)

    def _keep(self, data: bytes) -> None:
        if self._overflow:
            return
        if len(self._buffer) + len(data) > self._limits.max_envelope_bytes:
            # R12: stop buffering at once; the fault is given at end().
            self._overflow = True
            self._buffer.clear()
            return
        self._buffer += data

    def _on_parts(self, events: list[PartStart | PartData | PartEnd]) -> list[Command]:
        commands: list[Command] = []
        try:
            for event in events:
                if isinstance(event, PartStart):
                    self._part += 1
                    self._decoder = None
                    up = self._upload
                    if self._part == 1:
                        self._decoder = _decoder(event)
                    elif up is not None and not up.begun and event.content_id == up.href:
                        self._decoder = _decoder(event)
                        up.begun = True
                        self._in_upload = True
                        commands.append(BeginDocument(up.token, up.document_id, up.format))
                elif isinstance(event, PartData):
                    if self._part == 1 or self._in_upload:
                        data = event.data
                        if self._decoder is not None:
                            data = self._decoder.feed(data)
                        commands += self._part_bytes(data)
                elif isinstance(event, PartEnd):
                    if self._decoder is not None and (self._part == 1 or self._in_upload):
                        commands += self._part_bytes(self._decoder.close())
                        self._decoder = None
                    if self._part == 1:
                        self._root_part_done()
                    elif self._in_upload and self._upload is not None:
                        self._upload.complete = True
                        self._in_upload = False
        except TransferEncodingError as exc:
            # RFC 2045 section 6 / DPWS R0036: never acknowledge and file something else.
            part = "root part" if self._part == 1 else "image part"
            return commands + self._fail(
                faults.malformed(f"The MIME {part} cannot be decoded: {exc.reason}")
            )
        return commands

    def _part_bytes(self, data: bytes) -> list[Command]:
        """Decoded bytes of the root part (kept) or of the image (streamed to the store)."""
        if not data:
            return []
        if self._part == 1:
            self._keep(data)
            return []
        up = self._upload
        if not self._in_upload or up is None:
            return []
        up.size += len(data)
        if up.size > self._limits.max_image_bytes:
            return self._fail(
                faults.malformed(
                    f"The image exceeds the limit of {self._limits.max_image_bytes} "
                    "bytes (setting max_image_bytes).",
                    http_status=413,
                )
            )
        return [AppendDocument(up.token, up.document_id, data)]

    def _root_part_done(self) -> None:
        """The root part is complete: read the envelope now, so that an operation with an upload
        (SendImage) streams its attachment straight to the store (R8)."""
        try:
            self._envelope = envelope = self._read()
            operation = self.operations.get(envelope.addressing.action or "")
            if (
                operation is None
                or operation.begin_upload is None
                or self._refused_while_stopped(operation)  # _dispatch refuses it (R4 step 8)
            ):
                return
            request = self._request(envelope, operation)
            args = operation.read(request)
            self._early_args = (args,)
            self._upload = operation.begin_upload(request, args)
        except faults.SoapFault as fault:
            self._fault = fault

    def _fail(self, fault: faults.SoapFault) -> list[Command]:
        """Refuse the request; an upload in progress is dropped (no debris)."""
        commands: list[Command] = []
        if self._fault is None:
            self._fault = fault
        up = self._upload
        if up is not None:
            # Received completely or not, a refused image was never finished: drop it.
            if up.begun:
                commands.append(AbortDocument(up.token, up.document_id))
            self.state.jobs.let_go(up.key)
            self._upload = None
        self._in_upload = False
        return commands

    # --- ending ---------------------------------------------------------------------------------

    @property
    def operation(self) -> str:
        """The name of the requested operation (the last segment of its wsa:Action, e.g.
        ``CreatePostScanJob``) once the envelope was read, ``unknown`` for an action no
        operation declares, and "" before or without a readable action: for the binding's log
        and metrics, whose labels must stay a bounded set."""
        addressing = self._envelope.addressing if self._envelope else self._salvaged
        action = addressing.action if addressing is not None else None
        if not action:
            return ""
        if self.operations.get(action) is None:
            return "unknown"
        return action.rsplit("/", 1)[-1]

    @property
    def streamed(self) -> bool:
        """An MTOM body (R8): the exchange may emit document commands while it is fed, so a
        binding that refreshes its job table does so before the first ``feed``."""
        return self._multipart is not None

    def current_jobs_needed(self) -> bool:
        """Whether the answer depends on current job rows (``Operation.listing`` is not set):
        a binding whose job table caches rows shared with other servers refreshes it first.
        Call after the body is fed and before :meth:`end`.  True for a streamed body and for
        an action no operation declares (the safe side); False for a request refused anyway
        (its fault is kept for ``end``, as in :meth:`lookups`)."""
        if self._ended:
            raise UsageError("current_jobs_needed() after end()")
        if self._multipart is not None:
            return True
        if self._fault is not None:
            return False
        if self._envelope is None:
            try:
                self._envelope = self._read()
            except faults.SoapFault as fault:
                self._fault = fault  # end() answers it, as it would have without this call
                return False
        operation = self.operations.get(self._envelope.addressing.action or "")
        return operation is None or not operation.listing

    def rows_unread(self) -> None:
        """The binding could not read the job rows other servers share with this one (issue
        18: the database away, or slower than the wait) before this request: a job the table
        does not hold may exist there, so such a job is answered ServerErrorTemporaryError (R4
        step 9: the store could not carry out the request now), not ClientErrorJobTokenNotFound,
        which a scanner takes as final.  Call before the first ``feed`` of a streamed body,
        else before :meth:`end`."""
        self._rows_current = False

    def rows_unreadable(
        self, tokens: frozenset[str], corrupt: frozenset[str] = frozenset()
    ) -> None:
        """The shared rows of the jobs ``tokens`` exist but the binding cannot read them (a
        newer server's records during a rolling upgrade, issue 18): such a job is answered
        ServerErrorTemporaryError, as for :meth:`rows_unread` (the scanner asks again, and an
        instance that reads it answers), not ClientErrorJobTokenNotFound.  The rows of
        ``corrupt`` no server reads: a retry cannot succeed until an operator moves them
        aside, so R4 step 9 answers ServerErrorInternalError (temporary, a scanner would ask
        forever).  Call it when :meth:`rows_unread` would be called."""
        self._unreadable = tokens
        self._corrupt = corrupt

    def lookups(self) -> Lookups:
        """What the request needs from the user directory (R14, directory.py): call it after
        the body is fed and before :meth:`end`, and pass the answers to ``end``.  Empty unless
        ``ServerConfig.directory``, and for a request that is refused anyway."""
        if self._ended:
            raise UsageError("lookups() after end()")
        if not self.state.config.directory or self._fault is not None:
            return Lookups()
        if self._envelope is None:
            if self._multipart is not None:
                return Lookups()  # no root part: end() gives the fault
            try:
                self._envelope = self._read()
            except faults.SoapFault as fault:
                self._fault = fault  # end() answers it, as it would have without this call
                return Lookups()
        operation = self.operations.get(self._envelope.addressing.action or "")
        if operation is None:
            return Lookups()
        needs = Lookups()
        if operation.lookups is not None:
            needs = operation.lookups(Request(self.state, self._envelope, self.info))
        who = identity(self.state.config, self.info)
        # MS-BDSRR operations need an administrator (R10); so do subscriptions to its events
        # (R13), and a WS-Eventing request does not say which service it is for until it is
        # read, so eventing asks too (cached, and a directory that is down faults only where
        # the answer is used).
        wants_admin = operation.admin_only or operation.service == names.WSE
        if wants_admin and who and who not in self.state.config.scan_admins:
            needs = replace(needs, admin=who)
        return needs

    def end(
        self, now: datetime | None = None, *, directory: DirectoryAnswers | None = None
    ) -> Outcome:
        """The body is complete.  ``now`` is when (default: ``RequestInfo.now``, the start): the
        operation takes effect then, so that an image that took long to arrive is activity at
        its end, not at its start (R6 timeout).  ``directory``: the answers to :meth:`lookups`
        (R14), which the operation finds in ``RequestInfo.directory``."""
        if self._ended:
            raise UsageError("end() called twice")
        if now is not None or directory is not None:
            info = self.info
            # Built directly: dataclasses.replace was ~2 us of each request.  RequestInfo
            # still refuses a naive time.
            self.info = RequestInfo(
                info.now if now is None else now,
                info.content_type,
                info.identity,
                info.path,
                info.client_address,
                info.directory if directory is None else directory,
                info.datagram,
            )
        self._ended = True
        self._reply_id = self.state.message_id()
        early: list[Command] = []
        if self._multipart is not None and self._fault is None:
            try:
                early += self._on_parts(self._multipart.close())
            except MultipartError as exc:
                early += self._fail(faults.malformed(f"The MIME body is malformed: {exc.reason}"))
            if self._fault is None and self._envelope is None:
                early += self._fail(faults.malformed("The multipart request has no root part."))
        if self._fault is not None:
            return self._fault_outcome(self._fault, early + self._fail(self._fault))
        try:
            envelope = self._envelope or self._read()
            self._envelope = envelope
            result = self._dispatch(envelope)
        except faults.SoapFault as fault:
            return self._fault_outcome(fault, early + self._fail(fault))
        self._result = result
        payload = result.payload
        if result.splice is not None and not result.headers and _only_splice(payload):
            body = _spliced_reply(envelope.addressing, result, self._reply_id)
        else:
            if payload is SPLICE_ONLY:
                payload = splice_payload()  # the shared one never goes into a tree
            body = soap.reply_envelope(
                envelope.addressing,
                result.action,
                self._reply_id,
                payload,
                result.nsmap,
                result.headers,
            )
            if result.splice is not None:
                body = body.replace(SPLICE_MARKER, b"".join(result.splice), 1)
        return Outcome(Reply(200, SOAP_CONTENT_TYPE, body), tuple(early + result.commands))

    def _read(self) -> soap.Envelope:
        if self._overflow:
            raise faults.malformed(
                f"The SOAP envelope exceeds the limit of {self._limits.max_envelope_bytes} bytes."
            )
        root = parse_xml(bytes(self._buffer), self._limits)
        self._buffer.clear()
        try:
            check_tree(root, self._limits)
            return soap.read_envelope(root)
        except faults.SoapFault:
            self._salvaged = soap.salvage_addressing(root)
            raise

    def _dispatch(self, envelope: soap.Envelope) -> OpResult:
        action = envelope.addressing.action
        if not action:
            raise faults.action_required(envelope.addressing.wsa_ns)
        operation = self.operations.get(action)
        if operation is None:
            raise faults.action_not_supported(envelope.addressing.wsa_ns, action)
        if not self.info.datagram:  # DPWS R0031 is about HTTP requests
            soap.check_reply_endpoint(envelope.addressing)
        if self._refused_while_stopped(operation):
            # R4 step 8: repository Stopped
            raise faults.operation_failed(operation.service, "the server is shutting down")
        request = self._request(envelope, operation)
        if self._early_args is not None:
            (args,) = self._early_args  # read when the root part arrived, for the upload
        else:
            args = operation.read(request)
        return operation.handle(request, args)

    def _request(self, envelope: soap.Envelope, operation: Operation[Any]) -> Request:
        """What the operation sees; an MS-BDSRR operation first needs a scan administrator
        (R4 step 5, R10)."""
        if operation.admin_only:
            require_scan_admin(self.state.config, self.info)
        return Request(
            self.state,
            envelope,
            self.info,
            self._upload,
            self._rows_current,
            self._unreadable,
            self._corrupt,
        )

    def _refused_while_stopped(self, operation: Operation[Any]) -> bool:
        return self.state.stopped and operation.repository_service

    def _fault_outcome(self, fault: faults.SoapFault, commands: list[Command]) -> Outcome:
        addressing = (
            self._envelope.addressing if self._envelope else self._salvaged or soap.Addressing()
        )
        body = soap.fault_envelope(fault, addressing, self._reply_id)
        subcode = fault.subcode[1] if fault.subcode else "-"
        return Outcome(
            Reply(
                faults.wire_status(fault, self.state.config.fault_http_status),
                SOAP11_CONTENT_TYPE if fault.soap11 else SOAP_CONTENT_TYPE,
                body,
            ),
            tuple(commands),
            f"{fault.code}/{subcode}: {fault.reason}",
            subcode,
        )

    def store_failed(self, *, temporary: bool, fault: faults.SoapFault | None = None) -> Outcome:
        """A command of this exchange failed: undo its change and answer with the fault of
        R4 step 9 instead (ServerErrorTemporaryError when a retry may succeed), or with
        ``fault`` when the store refused the change for a rule of the core's own (a quota
        counted across instances: dsp.creation_refused)."""
        if not self._ended:
            # A chunk could not be written while feeding: refuse the request now.
            fault = faults.store_failed(names.DSP, temporary=temporary)
            self._ended = True
            self._reply_id = self.state.message_id()
            return self._fault_outcome(fault, self._fail(fault))
        commands: list[Command] = []
        result, self._result = self._result, None
        if result is not None and result.undo is not None:
            commands += result.undo()
        up = self._upload
        if up is not None and up.begun:
            commands.append(AbortDocument(up.token, up.document_id))
            self.state.jobs.let_go(up.key)
        operation = (
            self.operations.get(self._envelope.addressing.action or "") if self._envelope else None
        )
        ns = operation.service if operation and operation.repository_service else names.DSC
        if fault is None:
            fault = faults.store_failed(ns, temporary=temporary)
        return self._fault_outcome(fault, commands)

    def abort(self) -> list[Command]:
        """The connection was lost before end(): drop any upload in progress."""
        if self._ended:
            return []
        self._ended = True
        return self._fail(faults.malformed("The request was not received completely."))


def _decoder(start: PartStart) -> PartDecoder | None:
    """The part's transfer decoder (None: identity); raises TransferEncodingError for an
    encoding we do not decode, which refuses the request."""
    return decoder_for(start.headers.get("content-transfer-encoding"))


# --- replies whose whole Body child is spliced bytes ----------------------------------------------

#: Placeholders for the two values that differ between such replies (R4: a fresh MessageID, and
#: RelatesTo the request's); neither needs escaping, so each appears verbatim in the template.
_MESSAGE_ID = "urn:dsc:template:message-id"
_RELATES_TO = "urn:dsc:template:relates-to"
_SPLICE_TAG = f"{{{SPLICE_NS}}}here"
#: (wsa namespace, action, nsmap, with RelatesTo) -> the template's bytes around the values.
_templates: dict[tuple[str, str, tuple[tuple[str, str], ...], bool], tuple[bytes, ...]] = {}
_MAX_TEMPLATES = 64


def _only_splice(payload: Element | None) -> bool:
    return payload is SPLICE_ONLY or (
        payload is not None and payload.tag == _SPLICE_TAG and len(payload) == 0
    )


def _spliced_reply(addressing: soap.Addressing, result: OpResult, reply_id: str) -> bytes:
    """The bytes :func:`soap.reply_envelope` gives for a payload that is only a splice point,
    followed by the splice, from a template serialized once per (namespace, action, nsmap):
    only the MessageID and RelatesTo change (profiled: building and serializing the envelope
    was about 10 us of each GetRepositoryElements)."""
    relates = addressing.message_id or None
    key = (addressing.wsa_ns, result.action, tuple(result.nsmap.items()), relates is not None)
    parts = _templates.get(key)
    if parts is None:
        template = soap.reply_envelope(
            replace(addressing, message_id=_RELATES_TO if relates else None),
            result.action,
            _MESSAGE_ID,
            splice_payload(),
            result.nsmap,
        )
        head, _, rest = template.partition(_MESSAGE_ID.encode())
        if relates:
            middle, _, rest = rest.partition(_RELATES_TO.encode())
            before_body, _, tail = rest.partition(SPLICE_MARKER)
            parts = (head, middle, before_body, tail)
        else:
            before_body, _, tail = rest.partition(SPLICE_MARKER)
            parts = (head, before_body, tail)
        if len(_templates) >= _MAX_TEMPLATES:
            _templates.clear()
        _templates[key] = parts
    assert result.splice is not None
    if relates is not None:
        head, middle, before_body, tail = parts
        return b"".join(
            (
                head,
                soap.text_bytes(reply_id),
                middle,
                soap.text_bytes(relates),
                before_body,
                *result.splice,
                tail,
            )
        )
    head, before_body, tail = parts
    return b"".join((head, soap.text_bytes(reply_id), before_body, *result.splice, tail))
