"""SOAP faults of R4, as data.  Raising :class:`SoapFault` inside an operation is how a rule
refuses a request; the exchange turns it into the fault envelope and its HTTP status.

Reason texts start with the strings of the fault tables: bdsrr-messages §6.2 for ``dsc:``
(no final period, except ClientErrorJobTokenNotFound), dsm-and-stack §2.2 for ``dsp:`` (with a
final period), dsm-and-stack §4 for ``wsa:`` and §6 for ``wse:``; where the server knows what
exactly was wrong, it follows (docs/rulings.md "Fault reason texts": SOAP 1.2 Part 1 §5.4.2 makes
the Reason a text for people, clients dispatch on the Subcode).  Where the table's text would
mislead (a limit reached is no "unexpected error"), the reason is the specific text alone.

Details are elements only (SOAP 1.2 Part 1 §5.4.5: the Detail's children are element
information items): the argument or header by name, the action in ``wsa:ProblemAction``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names

SENDER = "Sender"
RECEIVER = "Receiver"
VERSION_MISMATCH = "VersionMismatch"
MUST_UNDERSTAND = "MustUnderstand"


@dataclass(frozen=True, slots=True)
class Detail:
    """The one element in ``soap:Detail``: ``{ns}local`` holding ``text`` or the element
    ``child`` (R4 step 7: ``<dsc:JobToken>TOKEN</dsc:JobToken>``).  ``names.WSA`` stands for
    the request's WS-Addressing namespace (R2: 2004/08 or 1.0), filled in when written."""

    element: tuple[str, str]
    text: str | None = None
    child: Detail | None = None


def with_cause(table_text: str, cause: str) -> str:
    """The table's reason followed by what exactly was wrong (module docstring)."""
    return f"{table_text.rstrip('.')}: {cause}"


class SoapFault(Exception):
    """A fault answer.  ``subcode`` is (namespace, local name) or None (R4 step 1 has none)."""

    def __init__(
        self,
        code: str,
        subcode: tuple[str, str] | None,
        reason: str,
        detail: Detail | None = None,
        *,
        http_status: int | None = None,
        not_understood: tuple[tuple[str, str], ...] = (),
        soap11: bool = False,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.detail = detail
        self.not_understood = not_understood
        #: Answer as a SOAP/1.1 message (a VersionMismatch for a SOAP/1.1 request).
        self.soap11 = soap11
        if http_status is None:
            # SOAP 1.2 HTTP binding: Sender faults are 400, every other fault 500 (R4).
            http_status = 400 if code == SENDER else 500
        self.http_status = http_status

    def __repr__(self) -> str:
        sub = f"{self.subcode[1]}" if self.subcode else "-"
        return f"SoapFault({self.code}/{sub}: {self.reason!r})"


def wire_status(fault: SoapFault, fault_http_status: str) -> int:
    """The HTTP status the fault is sent with (docs/rulings.md "HTTP status of faults"):
    ``"soap12"`` keeps the SOAP 1.2 HTTP binding's 400 for env:Sender (Part 2 section
    7.5.1.2); ``"500"`` sends 500 instead, the only non-2xx status from which the .NET WCF
    HTTP client reads a SOAP fault.  A limit's own status (413) is kept either way."""
    if fault_http_status == "500" and fault.http_status == 400:
        return 500
    return fault.http_status


# --- R4 step 1: not well-formed, DTD, PI, limits, no Envelope/Body ---------------------------


def malformed(reason: str, *, http_status: int = 400) -> SoapFault:
    return SoapFault(SENDER, None, reason, http_status=http_status)


# --- Steps 2 and 3 ----------------------------------------------------------------------------


def version_mismatch(envelope_ns: str | None = None) -> SoapFault:
    """``envelope_ns``: the request's envelope namespace; a SOAP/1.1 one gets a SOAP/1.1
    fault message (SOAP 1.2 Part 1 Appendix A; R2 as amended)."""
    return SoapFault(
        VERSION_MISMATCH,
        None,
        "The SOAP envelope version is not supported; this server speaks SOAP 1.2.",
        soap11=envelope_ns == names.SOAP11,
    )


def must_understand(headers: tuple[tuple[str, str], ...]) -> SoapFault:
    return SoapFault(
        MUST_UNDERSTAND,
        None,
        "One or more mandatory SOAP header blocks not understood.",
        not_understood=headers,
    )


# --- Step 4: WS-Addressing (dsm-and-stack §4 table) -----------------------------------------


def action_required(wsa_ns: str) -> SoapFault:
    return SoapFault(
        SENDER,
        # The fault's name in each WS-Addressing version (2004/08 §5.2; 1.0 SOAP binding §6.4.4).
        (
            wsa_ns,
            "MessageAddressingHeaderRequired"
            if wsa_ns == names.WSA10
            else "MessageInformationHeaderRequired",
        ),
        with_cause(
            "A required message information header, To, MessageID, or Action, is not present.",
            "the request has no wsa:Action header",
        ),
        # WS-Addressing 1.0 SOAP binding §6.4.1 names the header in wsa:ProblemHeaderQName.
        Detail((names.WSA, "ProblemHeaderQName"), "wsa:Action"),
    )


def invalid_header(wsa_ns: str, header: str, cause: str) -> SoapFault:
    """wsa:InvalidMessageInformationHeader (WS-Addressing 2004/08 §5.1; DPWS R0031: a [reply
    endpoint] that is not anonymous; docs/rulings.md on duplicated headers)."""
    return SoapFault(
        SENDER,
        # 2004/08 §5.1; WS-Addressing 1.0 SOAP binding §6.4.1 calls it InvalidAddressingHeader.
        (
            wsa_ns,
            "InvalidAddressingHeader"
            if wsa_ns == names.WSA10
            else "InvalidMessageInformationHeader",
        ),
        with_cause("A message information header is not valid and cannot be processed.", cause),
        Detail((names.WSA, "ProblemHeaderQName"), header),
    )


def action_not_supported(wsa_ns: str, action: str) -> SoapFault:
    # bdsrr 3.1.4.1.1 reason (no final period), then the action.
    return SoapFault(
        SENDER,
        (wsa_ns, "ActionNotSupported"),
        with_cause(
            "The [action] cannot be processed at the receiver",
            f"this server has no operation {action}",
        ),
        # WS-Addressing 1.0 SOAP binding §6.4.2: the action in wsa:ProblemAction/wsa:Action.
        Detail((names.WSA, "ProblemAction"), child=Detail((names.WSA, "Action"), action)),
    )


# --- Steps 5-9: the protocol faults, per hosted-service namespace ----------------------------

_REASONS = {
    names.DSC: {
        "InvalidArgs": "At least one input argument is invalid",
        "OperationFailed": "Scan repository service cannot perform the requested operation",
        "ServerErrorTemporaryError": "The service had an unexpected error",
        "ServerErrorInternalError": "The service had an unexpected error",
        "ClientErrorJobTokenNotFound": "A PostScan job identified by the specified dsc:JobToken argument could not be found.",
        # Not described by the spec (bdsrr open question 6); our wording, see docs/rulings.md.
        "ClientErrorCurrentUserNotScanAdmin": "The current user is not a scan administrator",
    },
    names.DSP: {
        "InvalidArgs": "At least one input argument is invalid.",
        "OperationFailed": "The service cannot perform the requested operation.",
        "ServerErrorTemporaryError": "The service had an unexpected error.",
        "ServerErrorInternalError": "The service had an unexpected error.",
        # Vendor extension allowed by the hardware docs (R4 step 7).
        "ClientErrorJobTokenNotFound": "A PostScan job identified by the specified dsp:JobToken argument could not be found.",
    },
}

_CODES = {
    "InvalidArgs": SENDER,
    "OperationFailed": RECEIVER,
    "ServerErrorTemporaryError": RECEIVER,
    "ServerErrorInternalError": RECEIVER,
    "ClientErrorJobTokenNotFound": SENDER,
    "ClientErrorCurrentUserNotScanAdmin": SENDER,
}


def protocol(
    ns: str,
    subcode: str,
    detail: Detail | None = None,
    *,
    cause: str | None = None,
    reason: str | None = None,
    http_status: int | None = None,
) -> SoapFault:
    """``cause`` follows the table's text; ``reason`` replaces it (module docstring)."""
    text = reason or _REASONS[ns][subcode]
    if cause is not None and reason is None:
        text = with_cause(text, cause)
    return SoapFault(_CODES[subcode], (ns, subcode), text, detail, http_status=http_status)


def invalid_args(ns: str, argument: tuple[str, str], label: str) -> SoapFault:
    """R4 step 6: the Detail is the argument's element, empty (its value may be what is
    wrong, and may be long); ``label`` is its QName as text for the reason."""
    return protocol(
        ns,
        "InvalidArgs",
        Detail(argument),
        cause=f"{label} is missing, not allowed there, or not a valid value.",
    )


def job_not_found(ns: str, token: str) -> SoapFault:
    return protocol(ns, "ClientErrorJobTokenNotFound", Detail((ns, "JobToken"), token))


def operation_failed(ns: str, cause: str) -> SoapFault:
    """R4 step 8; ``cause`` says which state forbids the operation."""
    return protocol(ns, "OperationFailed", cause=cause)


def not_scan_admin(identity: str | None) -> SoapFault:
    """``identity``: the R10 identity the server saw (of the client certificate), named so that
    a refused administrator sees which name to add, and where (issue 14 §3)."""
    seen = f"the client's identity {identity!r}" if identity else "a client with no identity"
    return protocol(
        names.DSC,
        "ClientErrorCurrentUserNotScanAdmin",
        cause=f"{seen} is not in [users] scan_admins nor in [directory] admin_group.",
    )


def store_failed(ns: str, *, temporary: bool) -> SoapFault:
    if temporary:
        return protocol(
            ns,
            "ServerErrorTemporaryError",
            cause="the job store could not carry out the request now (busy, out of space, or "
            "the directory did not answer); retry later, and see the server log.",
        )
    return protocol(
        ns,
        "ServerErrorInternalError",
        cause="the job store failed to carry out the request; see the server log.",
    )


def upload_elsewhere(ns: str, document_id: int) -> SoapFault:
    """A SendImage of a DocumentId another instance is receiving (docs/rulings.md, "A duplicate
    in flight on another instance"): temporary, since that upload may die with its instance."""
    return protocol(
        ns,
        "ServerErrorTemporaryError",
        cause=f"another instance is receiving document {document_id} of this job; retry "
        "later: once it ends (or its instance's lease lapses) the image is taken or refused "
        "as a duplicate.",
    )


def limit_reached(ns: str, what: str, setting: str, value: float) -> SoapFault:
    """A limit of R12/R13 that a retry may pass once jobs move on (R4 step 9: temporary)."""
    return protocol(
        ns,
        "ServerErrorTemporaryError",
        reason=f"{what} (the limit is {value}, setting [limits] {setting}); "
        "retry when one of them has ended.",
    )


# --- WS-Eventing (dsm-and-stack §6 table; R7) ------------------------------------------------

_WSE_FAULTS = {
    "DeliveryModeRequestedUnavailable": (SENDER, "The requested delivery mode is not supported."),
    "InvalidExpirationTime": (SENDER, "The expiration time requested is invalid."),
    "FilteringRequestedUnavailable": (SENDER, "The requested filter dialect is not supported."),
    "EventSourceUnableToProcess": (RECEIVER, "The event source cannot process the subscription."),
    "UnableToRenew": (RECEIVER, "The subscription cannot be renewed."),
    "InvalidMessage": (SENDER, "The message is not valid and cannot be processed."),
}


def eventing(subcode: str, cause: str, detail: Detail | None = None) -> SoapFault:
    code, reason = _WSE_FAULTS[subcode]
    return SoapFault(code, (names.WSE, subcode), with_cause(reason, cause), detail)


def matching_rule_not_supported(supported: tuple[str, ...]) -> SoapFault:
    """WS-Discovery 2005/04 (section 5.1, fault table): a Probe's Scopes/@MatchBy that this
    device does not implement; the Detail lists the rules it does."""
    return SoapFault(
        SENDER,
        (names.WSD, "MatchingRuleNotSupported"),
        "The matching rule specified is not supported: this device matches scopes by "
        + ", ".join(supported)
        + ".",
        Detail((names.WSD, "SupportedMatchingRules"), " ".join(supported)),
    )


def filter_action_not_supported(action: str) -> SoapFault:
    return SoapFault(
        SENDER,
        (names.WSDP, "FilterActionNotSupported"),
        with_cause(
            "An action in the filter is not supported by this event source.",
            f"this service sends no event {action}",
        ),
        Detail((names.WSA, "Action"), action),
    )
