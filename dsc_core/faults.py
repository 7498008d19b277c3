"""SOAP faults of R4, as data.  Raising :class:`SoapFault` inside an operation is how a rule
refuses a request; the exchange turns it into the fault envelope and its HTTP status.

Reason texts are the exact strings of the fault tables: bdsrr-messages §6.2 for ``dsc:``
(no final period, except ClientErrorJobTokenNotFound), dsm-and-stack §2.2 for ``dsp:`` (with a
final period), dsm-and-stack §4 for ``wsa:`` and §6 for ``wse:``.
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
    """Fault detail: either a text (a QName or URI, the template's "[Detail]") or one element
    ``{ns}local`` holding ``text`` (R4 step 7: ``<dsc:JobToken>TOKEN</dsc:JobToken>``)."""

    text: str
    element: tuple[str, str] | None = None


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
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.detail = detail
        self.not_understood = not_understood
        if http_status is None:
            # SOAP 1.2 HTTP binding: Sender faults are 400, every other fault 500 (R4).
            http_status = 400 if code == SENDER else 500
        self.http_status = http_status

    def __repr__(self) -> str:
        sub = f"{self.subcode[1]}" if self.subcode else "-"
        return f"SoapFault({self.code}/{sub}: {self.reason!r})"


# --- R4 step 1: not well-formed, DTD, PI, limits, no Envelope/Body ---------------------------


def malformed(reason: str, *, http_status: int = 400) -> SoapFault:
    return SoapFault(SENDER, None, reason, http_status=http_status)


# --- Steps 2 and 3 ----------------------------------------------------------------------------


def version_mismatch() -> SoapFault:
    return SoapFault(
        VERSION_MISMATCH,
        None,
        "The SOAP envelope version is not supported; this server speaks SOAP 1.2.",
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
        (wsa_ns, "MessageInformationHeaderRequired"),
        "A required message information header, To, MessageID, or Action, is not present.",
        Detail("wsa:Action"),
    )


def action_not_supported(wsa_ns: str, action: str) -> SoapFault:
    # bdsrr 3.1.4.1.1 reason, exactly (no final period).
    return SoapFault(
        SENDER,
        (wsa_ns, "ActionNotSupported"),
        "The [action] cannot be processed at the receiver",
        Detail(action),
    )


# --- Steps 5-9: the protocol faults, per hosted-service namespace ----------------------------

_REASONS = {
    names.DSC: {
        "InvalidArgs": "At least one input argument is invalid",
        "OperationFailed": "Scan repository service cannot perform the requested operation",
        "ServerErrorTemporaryError": "The service had an unexpected error",
        "ServerErrorInternalError": "The service had an unexpected error",
        "ClientErrorJobTokenNotFound": "A PostScan job identified by the specified dsc:JobToken argument could not be found.",
        # Not described by the spec (bdsrr open question 6); our wording, see README rulings.
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
    ns: str, subcode: str, detail: Detail | None = None, *, http_status: int | None = None
) -> SoapFault:
    return SoapFault(
        _CODES[subcode], (ns, subcode), _REASONS[ns][subcode], detail, http_status=http_status
    )


def invalid_args(ns: str, argument: str) -> SoapFault:
    """R4 step 6: Detail names the argument (a QName such as ``dsc:JobToken``)."""
    return protocol(ns, "InvalidArgs", Detail(argument))


def job_not_found(ns: str, token: str) -> SoapFault:
    return protocol(ns, "ClientErrorJobTokenNotFound", Detail(token, (ns, "JobToken")))


def operation_failed(ns: str) -> SoapFault:
    return protocol(ns, "OperationFailed")


def not_scan_admin() -> SoapFault:
    return protocol(names.DSC, "ClientErrorCurrentUserNotScanAdmin")


def store_failed(ns: str, *, temporary: bool) -> SoapFault:
    return protocol(ns, "ServerErrorTemporaryError" if temporary else "ServerErrorInternalError")


# --- WS-Eventing (dsm-and-stack §6 table; R7) ------------------------------------------------

_WSE_FAULTS = {
    "DeliveryModeRequestedUnavailable": (SENDER, "The requested delivery mode is not supported."),
    "InvalidExpirationTime": (SENDER, "The expiration time requested is invalid."),
    "FilteringRequestedUnavailable": (SENDER, "The requested filter dialect is not supported."),
    "EventSourceUnableToProcess": (RECEIVER, "The event source cannot process the subscription."),
    "UnableToRenew": (RECEIVER, "The subscription cannot be renewed."),
    "InvalidMessage": (SENDER, "The message is not valid and cannot be processed."),
}


def eventing(subcode: str, detail: Detail | None = None) -> SoapFault:
    code, reason = _WSE_FAULTS[subcode]
    return SoapFault(code, (names.WSE, subcode), reason, detail)


def filter_action_not_supported(action: str) -> SoapFault:
    return SoapFault(
        SENDER,
        (names.WSDP, "FilterActionNotSupported"),
        "An action in the filter is not supported by this event source.",
        Detail(action),
    )
