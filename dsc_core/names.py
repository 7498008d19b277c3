"""Namespace URIs and action URIs used on the wire (RULINGS R1, R2, R7; bdsrr-messages §3).

Every URI is the ``http://`` form; R2 accepts the ``https://`` spelling of a known namespace on
input, which :func:`canonical_ns` folds back.
"""

from __future__ import annotations

from typing import Final

SOAP: Final = "http://www.w3.org/2003/05/soap-envelope"
SOAP11: Final = "http://schemas.xmlsoap.org/soap/envelope/"
WSA: Final = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSA10: Final = "http://www.w3.org/2005/08/addressing"
WSE: Final = "http://schemas.xmlsoap.org/ws/2004/08/eventing"
WSDP: Final = "http://schemas.xmlsoap.org/ws/2006/02/devprof"
WSD: Final = "http://schemas.xmlsoap.org/ws/2005/04/discovery"
WXF: Final = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
MEX: Final = "http://schemas.xmlsoap.org/ws/2004/09/mex"
XOP: Final = "http://www.w3.org/2004/08/xop/include"
XML: Final = "http://www.w3.org/XML/1998/namespace"

DSP: Final = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/processing"
DSC: Final = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/configuration"
PSP: Final = "http://schemas.microsoft.com/windows/2008/02/imaging/postscan/psp"
WSCN: Final = "http://schemas.microsoft.com/windows/2006/08/wdp/scan"
FILTER: Final = "http://schemas.microsoft.com/windows/2007/10/imaging/postscan/filter"
FSF: Final = FILTER + "/fileshare"
EMLF: Final = FILTER + "/email"
SPF: Final = FILTER + "/sharepoint"

#: Our own namespace for vendor extensions (the schemas allow ##other elements, bdsrr §1.8).
EXT: Final = "urn:dsc-server:extensions"

ANONYMOUS: Final = WSA + "/role/anonymous"
ANONYMOUS10: Final = WSA10 + "/anonymous"
FAULT_ACTION: Final = WSA + "/fault"
FAULT_ACTION10: Final = WSA10 + "/fault"

DEVPROF_ACTION_DIALECT: Final = WSDP + "/Action"
#: The dialect WS-Eventing 2004/08 §3.1 implies for a wse:Filter without @Dialect.
XPATH10_DIALECT: Final = "http://www.w3.org/TR/1999/REC-xpath-19991116"
PUSH_MODE: Final = WSE + "/DeliveryModes/Push"

#: Prefixes used when writing.  Prefix choice is not significant (bdsrr §2.2.1).
PREFIXES: Final[dict[str, str]] = {
    "soap": SOAP,
    "wsa": WSA,
    "wse": WSE,
    "wsdp": WSDP,
    "wsd": WSD,
    "wsx": MEX,
    "dsp": DSP,
    "dsc": DSC,
    "psp": PSP,
    "ftr": FILTER,
}

_KNOWN = (
    SOAP,
    SOAP11,
    WSA,
    WSA10,
    WSE,
    WSDP,
    WSD,
    WXF,
    MEX,
    XOP,
    DSP,
    DSC,
    PSP,
    WSCN,
    FILTER,
    FSF,
    EMLF,
    SPF,
)
_HTTPS_SPELLINGS: Final[dict[str, str]] = {
    "https://" + ns[len("http://") :]: ns for ns in _KNOWN if ns.startswith("http://")
}


def canonical_ns(uri: str | None) -> str | None:
    """Fold the ``https://`` spelling of a known namespace to its real ``http://`` URI (R2)."""
    if uri is None:
        return None
    return _HTTPS_SPELLINGS.get(uri, uri)


def canonical_uri(uri: str) -> str:
    """Like :func:`canonical_ns` for URIs built on a known namespace (actions, dialects)."""
    if uri.startswith("https://schemas."):
        candidate = "http://" + uri[len("https://") :]
        for ns in _KNOWN:
            if candidate.startswith(ns):
                return candidate
    return uri


class Action:
    """Action URIs (bdsrr §1 table; dsm-and-stack §1.3; R7)."""

    # WS-DSP (scanners)
    DSP_CREATE: Final = DSP + "/CreatePostScanJob"
    DSP_SEND_IMAGE: Final = DSP + "/SendImage"
    DSP_END: Final = DSP + "/EndPostScanJob"
    DSP_CANCEL: Final = DSP + "/CancelPostScanJob"
    DSP_GET_JOB_ELEMENTS: Final = DSP + "/GetPostScanJobElements"
    DSP_JOB_STATUS_EVENT: Final = DSP + "/PostScanJobStatusEvent"
    DSP_JOB_END_STATE_EVENT: Final = DSP + "/PostScanJobEndStateEvent"

    # MS-BDSRR (management clients)
    DSC_GET_REPOSITORY_ELEMENTS: Final = DSC + "/GetRepositoryElements"
    DSC_CANCEL: Final = DSC + "/CancelPostScanJob"
    DSC_GET_JOB_ELEMENTS: Final = DSC + "/GetPostScanJobElements"
    DSC_GET_ACTIVE_JOBS: Final = DSC + "/GetActiveJobs"
    DSC_GET_JOB_HISTORY: Final = DSC + "/GetJobHistory"
    DSC_ELEMENTS_CHANGE_EVENT: Final = DSC + "/RepositoryElementsChangeEvent"
    DSC_STATUS_SUMMARY_EVENT: Final = DSC + "/RepositoryStatusSummaryEvent"
    DSC_JOB_STATUS_EVENT: Final = DSC + "/PostScanJobStatusEvent"
    DSC_JOB_END_STATE_EVENT: Final = DSC + "/PostScanJobEndStateEvent"
    # Vendor extension (MS-BDSRR service, scan administrators): trim the history by age.
    EXT_PURGE_JOB_HISTORY: Final = EXT + "/PurgeJobHistory"
    # Vendor extension (MS-BDSRR service, scan administrators): run a job's failed filters again.
    EXT_RETRY_JOB: Final = EXT + "/RetryPostScanJob"

    # WS-Eventing 2004/08
    SUBSCRIBE: Final = WSE + "/Subscribe"
    SUBSCRIBE_RESPONSE: Final = WSE + "/SubscribeResponse"
    RENEW: Final = WSE + "/Renew"
    RENEW_RESPONSE: Final = WSE + "/RenewResponse"
    GET_STATUS: Final = WSE + "/GetStatus"
    GET_STATUS_RESPONSE: Final = WSE + "/GetStatusResponse"
    UNSUBSCRIBE: Final = WSE + "/Unsubscribe"
    UNSUBSCRIBE_RESPONSE: Final = WSE + "/UnsubscribeResponse"
    SUBSCRIPTION_END: Final = WSE + "/SubscriptionEnd"

    # Metadata and discovery (R11)
    TRANSFER_GET: Final = WXF + "/Get"
    TRANSFER_GET_RESPONSE: Final = WXF + "/GetResponse"
    MEX_GET_METADATA: Final = MEX + "/GetMetadata/Request"
    PROBE: Final = WSD + "/Probe"
    PROBE_MATCHES: Final = WSD + "/ProbeMatches"


def filter_name(dialect: str) -> str:
    """The short name of a filter dialect, as logs, metrics and tables show it:
    ``.../filter/fileshare`` (the dialect URI, R9) or ``ftr:fileshare`` (a QName) -> ``fileshare``."""
    return dialect.rsplit("/", 1)[-1].split(":")[-1]
