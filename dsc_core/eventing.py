"""WS-Eventing 2004/08 as profiled by DPWS 2006/02 (R7): the subscriptions, and delivering a
notification to the subscribers that asked for it (``events.py`` says which changes notify).

Push delivery only; the DPWS Action filter dialect (space-separated action URIs, exact match);
no filter means every event of that hosted service.  Expires is a duration or a dateTime, absent
means the default, the grant is capped.  The subscription manager is addressed by the
``wse:Identifier`` reference parameter.  Expired subscriptions are dropped without
SubscriptionEnd; repeated delivery failures end a subscription with DeliveryFailure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from xml.sax.saxutils import escape as xml_escape

from lxml import etree

from . import faults, names, soap
from .commands import Command, Deliver, EndSubscription, RecordDeliveryFailures
from .config import ServerConfig
from .deadlines import DeadlineChanges
from .subscription import EndpointReference, Subscription
from .xmlread import Element, children, split, trimmed

A = names.Action

DSP_EVENTS = frozenset({A.DSP_JOB_STATUS_EVENT, A.DSP_JOB_END_STATE_EVENT})
DSC_EVENTS = frozenset(
    {
        A.DSC_ELEMENTS_CHANGE_EVENT,
        A.DSC_STATUS_SUMMARY_EVENT,
        A.DSC_JOB_STATUS_EVENT,
        A.DSC_JOB_END_STATE_EVENT,
    }
)
ALL_EVENTS = DSP_EVENTS | DSC_EVENTS

SHUTTING_DOWN = names.WSE + "/SourceShuttingDown"
DELIVERY_FAILURE = names.WSE + "/DeliveryFailure"


@dataclass
class Subscriptions:
    config: ServerConfig
    new_id: Callable[[], str]
    #: Changed only here: a subscription added, renewed or ended also bumps :attr:`changes`.
    #: Read :attr:`by_id`.
    _by_id: dict[str, Subscription] = field(default_factory=dict, init=False)
    #: Bumped by each change of an expiry (:meth:`next_expiry`, ScanServer.next_deadline);
    #: a delivery failure counted changes none.
    changes: DeadlineChanges = field(default_factory=DeadlineChanges)

    @property
    def by_id(self) -> Mapping[str, Subscription]:
        """The subscriptions held, read-only: a change made elsewhere would move an expiry
        uncounted (dsc_core/deadlines.py); mypy refuses one made through this view."""
        return self._by_id

    # --- requests ---------------------------------------------------------------------------

    def subscribe(
        self,
        env: soap.Envelope,
        payload: Element,
        service_hint: str | None,
        now: datetime,
        owner: str | None = None,
    ) -> tuple[Subscription, Element]:
        """``owner``: the identity of a subscriber who is not a scan administrator (R13): it
        may subscribe to WS-DSP events only, and receives those of its own jobs only."""
        if owner is not None and service_hint == "dsc":
            raise faults.not_scan_admin(owner)  # R13, R4 step 5: MS-BDSRR events need an admin
        # Expired ones still held (until the leader's tick ends them, issue 18) do not count.
        active = sum(1 for s in self._by_id.values() if s.active(now))
        if active >= self.config.limits.max_subscriptions:
            raise faults.eventing(
                "EventSourceUnableToProcess",
                f"{active} subscriptions are active, the limit ([limits] max_subscriptions)",
            )
        limit = self.config.limits.max_reference_parameter_bytes
        end_to: EndpointReference | None = None
        notify_to: EndpointReference | None = None
        expires_el: Element | None = None
        filter_el: Element | None = None
        for child in children(payload):
            ns, local = split(child.tag)
            if ns != names.WSE:
                continue
            if local == "EndTo":
                end_to = _read_epr(child, limit)
            elif local == "Delivery":
                mode = trimmed(child.get("Mode")) or names.PUSH_MODE
                if names.canonical_uri(mode) != names.PUSH_MODE:
                    raise faults.eventing(
                        "DeliveryModeRequestedUnavailable",
                        f"only push delivery is offered, not {mode}",
                    )
                for item in children(child):
                    if split(item.tag) == (names.WSE, "NotifyTo"):
                        notify_to = _read_epr(item, limit)
            elif local == "Expires":
                expires_el = child
            elif local == "Filter":
                filter_el = child
        if notify_to is None:
            raise faults.eventing(
                "InvalidMessage",
                # No Detail: an empty wse:NotifyTo would not be a valid one (the reason says).
                "the Subscribe has no wse:Delivery/wse:NotifyTo",
            )
        if owner is not None and service_hint is None and filter_el is None:
            service_hint = "dsp"  # no service named: the events this subscriber may have
        expires = self._grant(expires_el, now)
        actions = self._filter(filter_el, service_hint)
        if owner is not None and not actions <= DSP_EVENTS:
            raise faults.not_scan_admin(owner)
        identifier = f"urn:uuid:{self.new_id()}"
        sub = Subscription(
            identifier,
            notify_to,
            end_to,
            actions,
            expires,
            env.addressing.wsa_ns,
            owner=owner,
        )
        self._by_id[identifier] = sub
        self.changes.moved()
        response = etree.Element(f"{{{names.WSE}}}SubscribeResponse")
        manager = etree.SubElement(response, f"{{{names.WSE}}}SubscriptionManager")
        wsa = env.addressing.wsa_ns
        etree.SubElement(manager, f"{{{wsa}}}Address").text = self._manager_address(actions)
        params = etree.SubElement(manager, f"{{{wsa}}}ReferenceParameters")
        etree.SubElement(params, f"{{{names.WSE}}}Identifier").text = identifier
        etree.SubElement(response, f"{{{names.WSE}}}Expires").text = duration(expires - now)
        return sub, response

    def renew(
        self, env: soap.Envelope, payload: Element, now: datetime, owner: str | None = None
    ) -> tuple[Subscription, Subscription, Element]:
        """(the subscription before, after, the response)."""
        sub = self._find(env, "UnableToRenew", now, owner)
        expires_el = next(
            (c for c in children(payload) if split(c.tag) == (names.WSE, "Expires")), None
        )
        expires = self._grant(expires_el, now)
        renewed = self._by_id[sub.identifier] = replace(sub, expires=expires)
        self.changes.moved()
        response = etree.Element(f"{{{names.WSE}}}RenewResponse")
        etree.SubElement(response, f"{{{names.WSE}}}Expires").text = duration(expires - now)
        return sub, renewed, response

    def get_status(self, env: soap.Envelope, now: datetime, owner: str | None = None) -> Element:
        sub = self._find(env, "InvalidMessage", now, owner)
        response = etree.Element(f"{{{names.WSE}}}GetStatusResponse")
        etree.SubElement(response, f"{{{names.WSE}}}Expires").text = duration(sub.expires - now)
        return response

    def unsubscribe(
        self, env: soap.Envelope, now: datetime, owner: str | None = None
    ) -> Subscription:
        """R13: the 2004/08 UnsubscribeResponse is an empty Body (only the Action says it).
        Returns the subscription ended."""
        sub = self._find(env, "InvalidMessage", now, owner)
        del self._by_id[sub.identifier]
        self.changes.moved()
        return sub

    def put_back(self, sub: Subscription) -> None:
        """Undo a Renew or Unsubscribe whose store command failed (R4 step 9)."""
        self._by_id[sub.identifier] = sub
        self.changes.moved()

    def forget(self, identifier: str) -> None:
        """Undo a Subscribe whose store command failed (R4 step 9)."""
        if self._by_id.pop(identifier, None) is not None:
            self.changes.moved()

    def absorb(
        self,
        stored: Iterable[Subscription],
        ended: Iterable[str],
        counting: Collection[str] = frozenset(),
    ) -> None:
        """Subscriptions another instance of a shared store created, renewed or ended (issue
        18): the table is a cache of the stored ones, so quotas count the cluster's and any
        instance manages any of them.  The failure count comes with them (RecordDeliveryFailures),
        so the R7 rule that ends a failing subscription counts across delivery owners.

        ``counting``: subscriptions whose count this instance changed and the store may not
        have given back yet (read before it was written): their count here is newer than the
        one read, and is kept.  Taken from a Renew's row read meanwhile, a failure counted but
        not yet written was lost (issue 18, runtime/catchup.py)."""
        for sub in stored:
            held = self._by_id.get(sub.identifier)
            if held is not None and sub.identifier in counting:
                sub = replace(sub, failures=held.failures)
            self._by_id[sub.identifier] = sub
            if held is None or held.expires != sub.expires:
                self.changes.moved()
        for identifier in ended:
            if self._by_id.pop(identifier, None) is not None:
                self.changes.moved()

    def _find(
        self, env: soap.Envelope, fault: str, now: datetime, owner: str | None = None
    ) -> Subscription:
        """The subscription a manager request names.  A non-administrator (``owner``) manages
        only its own: an MS-BDSRR subscription needs an administrator (R13), another user's
        WS-DSP subscription is as unknown to it as a job of another user (R10)."""
        ident = env.addressing.identifier
        sub = self._by_id.get(ident or "")
        if sub is not None and owner is not None and sub.owner != owner:
            if not sub.actions <= DSP_EVENTS:
                raise faults.not_scan_admin(owner)
            sub = None
        if sub is None or not sub.active(now):
            raise faults.eventing(
                fault,
                "no active subscription has this wse:Identifier (expired, ended or unknown)",
                faults.Detail((names.WSE, "Identifier"), ident or ""),
            )
        return sub

    def _grant(self, expires_el: Element | None, now: datetime) -> datetime:
        default = timedelta(seconds=self.config.subscription_default_seconds)
        cap = timedelta(seconds=self.config.subscription_max_seconds)
        if expires_el is None:
            return now + min(default, cap)
        text = trimmed(expires_el.text)
        try:
            if text.startswith(("P", "-P")):
                wanted = parse_duration(text)
            else:
                wanted = datetime.fromisoformat(text.replace("Z", "+00:00")) - now
        except (ValueError, TypeError):
            raise faults.eventing(
                "InvalidExpirationTime", "wse:Expires is neither a duration nor a dateTime"
            ) from None
        except OverflowError:
            # Beyond what timedelta holds: a valid but huge duration gets the cap.
            if text.startswith("-"):
                raise faults.eventing("InvalidExpirationTime", "wse:Expires is negative") from None
            wanted = cap
        if wanted <= timedelta(0):
            raise faults.eventing("InvalidExpirationTime", "wse:Expires is not in the future")
        return now + min(wanted, cap)

    def _filter(self, filter_el: Element | None, service_hint: str | None) -> frozenset[str]:
        offered = {"dsp": DSP_EVENTS, "dsc": DSC_EVENTS}.get(service_hint or "", ALL_EVENTS)
        if filter_el is None:
            return offered
        # WS-Eventing 2004/08 §3.1: a Filter without @Dialect is XPath 1.0, which this source
        # does not offer (only the DPWS Action dialect, R7).
        dialect = names.canonical_uri(trimmed(filter_el.get("Dialect")) or names.XPATH10_DIALECT)
        if dialect != names.DEVPROF_ACTION_DIALECT:
            raise faults.eventing(
                "FilteringRequestedUnavailable",
                f"the filter dialect {dialect} is not offered; use {names.DEVPROF_ACTION_DIALECT}",
                # WS-Eventing 2004/08 §3.1 fault table: the Detail lists the supported dialect.
                faults.Detail((names.WSE, "SupportedDialect"), names.DEVPROF_ACTION_DIALECT),
            )
        wanted = frozenset(names.canonical_uri(a) for a in (filter_el.text or "").split())
        if not wanted:
            raise faults.eventing(
                "InvalidMessage",
                "the wse:Filter names no action",
                faults.Detail((names.WSE, "Filter")),
            )
        for action in sorted(wanted):
            if action not in offered:
                raise faults.filter_action_not_supported(action)
        return wanted

    def _manager_address(self, actions: frozenset[str]) -> str:
        if actions <= DSP_EVENTS:
            return self.config.dsp_url
        return self.config.dsc_url

    # --- time and delivery ------------------------------------------------------------------

    def expire(self, now: datetime) -> list[Command]:
        """Drop the expired subscriptions, without SubscriptionEnd (WS-Eventing 2004/08 sends
        it for an unexpected end; the subscriber knew this one); EndSubscription each, so a
        shared store ends its row once and the other instances learn it from the feed (issue
        18 point 4)."""
        expired = [i for i, s in self._by_id.items() if not s.active(now)]
        for ident in expired:
            del self._by_id[ident]
            self.changes.moved()
        return [EndSubscription(ident) for ident in expired]

    def next_expiry(self) -> datetime | None:
        return min((s.expires for s in self._by_id.values()), default=None)

    def notify(
        self, action: str, body: Element, now: datetime, job_owner: str | None = None
    ) -> list[Deliver]:
        """One Deliver per subscriber of ``action``.  The envelope around ``body`` is
        serialized once per event (and WS-Addressing version); each subscriber only adds its
        own header blocks (To, MessageID, reference parameters).  ``job_owner``: the event is
        about a job of that identity (R13: restricted subscriptions get only their own)."""
        out = []
        frames: dict[str, tuple[bytes, bytes]] = {}
        for sub in self._by_id.values():
            if sub.owner is not None and sub.owner != job_owner:
                continue
            if action in sub.actions and sub.active(now):
                frame = frames.get(sub.wsa_ns)
                if frame is None:
                    frame = frames[sub.wsa_ns] = _frame(sub.wsa_ns, body)
                header = self._header(sub.notify_to, sub.wsa_ns, action)
                out.append(
                    Deliver(sub.identifier, sub.notify_to.address, (frame[0], header, frame[1]))
                )
        return out

    def delivery_result(self, identifier: str, ok: bool) -> list[Command]:
        sub = self._by_id.get(identifier)
        if sub is None:
            return []
        if ok:
            if sub.failures == 0:
                return []  # the usual case: nothing to record
            self._by_id[identifier] = replace(sub, failures=0)
            return [RecordDeliveryFailures(identifier, 0)]
        sub = replace(sub, failures=sub.failures + 1)
        if sub.failures < self.config.delivery_failures_before_end:
            self._by_id[identifier] = sub
            return [RecordDeliveryFailures(identifier, sub.failures)]
        del self._by_id[identifier]
        self.changes.moved()
        return self._end([sub], DELIVERY_FAILURE, "Event deliveries failed repeatedly.")

    def give_up(self, identifier: str) -> list[Command]:
        sub = self._by_id.pop(identifier, None)
        if sub is None:
            return []
        self.changes.moved()
        return self._end([sub], DELIVERY_FAILURE, "Event deliveries failed repeatedly.")

    def end_all(self) -> list[Command]:
        subs = list(self._by_id.values())
        self._by_id.clear()
        self.changes.moved()
        return self._end(subs, SHUTTING_DOWN, "The scan server is shutting down.")

    def _end(self, subs: Iterable[Subscription], status: str, reason: str) -> list[Command]:
        """EndSubscription (a shared store forgets it), then SubscriptionEnd to its EndTo."""
        out: list[Command] = []
        for sub in subs:
            out.append(EndSubscription(sub.identifier))
            if sub.end_to is None:
                continue
            body = etree.Element(f"{{{names.WSE}}}SubscriptionEnd")
            manager = etree.SubElement(body, f"{{{names.WSE}}}SubscriptionManager")
            etree.SubElement(manager, f"{{{sub.wsa_ns}}}Address").text = self._manager_address(
                sub.actions
            )
            params = etree.SubElement(manager, f"{{{sub.wsa_ns}}}ReferenceParameters")
            etree.SubElement(params, f"{{{names.WSE}}}Identifier").text = sub.identifier
            etree.SubElement(body, f"{{{names.WSE}}}Status").text = status
            text = etree.SubElement(body, f"{{{names.WSE}}}Reason")
            text.set(f"{{{names.XML}}}lang", "en")
            text.text = reason
            start, rest = _frame(sub.wsa_ns, body)
            header = self._header(sub.end_to, sub.wsa_ns, names.Action.SUBSCRIPTION_END)
            out.append(
                Deliver(sub.identifier, sub.end_to.address, (start, header, rest), final=True)
            )
        return out

    def _header(self, to: EndpointReference, wsa_ns: str, action: str) -> bytes:
        """A one-way message's header blocks: To, Action, a fresh MessageID, and the EPR's
        reference parameters (dsm-and-stack §4, §6 "Notifications").  The ``wsa`` prefix is
        declared on the envelope (``_frame``); reference parameters carry their own
        declarations (they were serialized standalone)."""
        return b"".join(
            (
                b"<wsa:To>",
                _text(to.address),
                b"</wsa:To><wsa:Action>",
                _text(action),
                b"</wsa:Action><wsa:MessageID>urn:uuid:",
                _text(self.new_id()),
                b"</wsa:MessageID>",
                *to.parameters,
            )
        )


def _text(value: str) -> bytes:
    return xml_escape(value).encode("utf-8")


_HEADER_SLOT = b"<soap:Header/>"


def _frame(wsa_ns: str, body: Element) -> tuple[bytes, bytes]:
    """The envelope of a one-way message around ``body``, cut where the header blocks go:
    (start up to and including ``<soap:Header>``, ``</soap:Header>`` and the rest)."""
    root, _header, body_el = soap.new_envelope(
        wsa_ns, {"wse": names.WSE, "dsc": names.DSC, "dsp": names.DSP}
    )
    body_el.append(etree.fromstring(etree.tostring(body)))  # a copy: the caller keeps body
    start, slot, rest = soap.serialize(root).partition(_HEADER_SLOT)
    assert slot, "the empty header serializes as <soap:Header/>"
    return start + b"<soap:Header>", b"</soap:Header>" + rest


def _standalone(el: Element) -> bytes:
    """``el`` serialized with only the namespace declarations it uses (a plain tostring would
    repeat every declaration in scope of the request envelope in each notification)."""
    copy = deepcopy(el)
    copy.tail = None
    etree.cleanup_namespaces(copy)
    return etree.tostring(copy)


def _read_epr(el: Element, limit: int) -> EndpointReference:
    """An endpoint reference.  Its reference parameters are copied into every message sent to
    it, so their serialized size is limited (Limits.max_reference_parameter_bytes): beyond it
    the Subscribe gets wse:EventSourceUnableToProcess (the source declines it for a local
    reason, dsm-and-stack's fault table)."""
    address = None
    params: list[bytes] = []
    for child in children(el):
        ns, local = split(child.tag)
        if ns not in (names.WSA, names.WSA10):
            continue
        if local == "Address":
            address = trimmed(child.text)
        elif local in ("ReferenceParameters", "ReferenceProperties"):
            params.extend(_standalone(p) for p in children(child))
    if not address:
        raise faults.eventing(
            "InvalidMessage",
            "an endpoint reference has no wsa:Address",
            faults.Detail((names.WSA, "Address")),
        )
    if sum(len(p) for p in params) > limit:
        raise faults.eventing(
            "EventSourceUnableToProcess",
            f"the reference parameters exceed {limit} bytes ([limits] "
            "max_reference_parameter_bytes)",
            faults.Detail((names.WSA, "ReferenceParameters")),
        )
    return EndpointReference(address, tuple(params))


_DURATION = re.compile(
    r"^(-)?P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str) -> timedelta:
    """xs:duration; a year counts 365 days and a month 30 (only used to grant an expiry)."""
    match = _DURATION.match(text)
    if match is None or text.endswith(("P", "T")):
        raise ValueError(f"not an xs:duration: {text!r}")
    sign, years, months, days, hours, minutes, seconds = match.groups()
    total = timedelta(
        days=int(years or 0) * 365 + int(months or 0) * 30 + int(days or 0),
        hours=int(hours or 0),
        minutes=int(minutes or 0),
        seconds=float(seconds or 0),
    )
    return -total if sign else total


def duration(delta: timedelta) -> str:
    """A granted expiry as xs:duration (WSDBIT expects durations in responses)."""
    seconds = max(0, int(delta.total_seconds()))
    return f"PT{seconds}S"
