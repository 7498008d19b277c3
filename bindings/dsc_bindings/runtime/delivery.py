"""Event delivery that no subscriber can hurt (R7): one bounded queue and one task per
subscription, on an event loop of its own.

The core decides *what* to send (``Deliver`` commands, in order) and counts failures; this hub
only moves bytes, under these rules:

- Each subscription has its own queue of at most ``Limits.delivery_queue_size`` notifications
  and its own delivery task: subscribers are served side by side, each in the order its
  notifications were raised.  A subscriber that is slow, dead or hostile only ever delays
  itself.
- A delivery is one HTTP(S) POST with a connect timeout and an answer timeout; the answer is
  read with a cap on its head (h11's incomplete-event limit) and on its body, then dropped:
  2xx is success.  An endless head, an endless body or ``Content-Length: 10**11`` cost at most
  the caps and the timeout.
- After ``failures_before_end`` consecutive failures (the core's own count, R7) the hub stops
  at once: what is still queued is discarded and nothing more is accepted for it; the core,
  told of every result, ends the subscription with SubscriptionEnd DeliveryFailure.  A full
  queue ends it the same way (``give_up``).
- SubscriptionEnd messages (``final``) follow the subscription's queued notifications; after
  a give-up they are sent on their own.

Results go back through ``report(subscription_id, ok)`` and ``give_up(subscription_id)``, called
in the hub's thread: the service hands them to the core's owner without blocking.  A notification
may carry ``done``, a blocking call run (in a worker thread) once it was answered and before
the subscription's next one is sent: the outbox deletes its row there (runtime/outbox.py), so a
new delivery owner resends at most the one in flight.

The hub runs trio in one thread, for both HTTP bindings: a thousand idle subscriptions cost a
thousand parked tasks, not threads.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

from dsc_core import Deliver, Limits

__all__ = ["DeliveryHub", "DeliveryLimits"]

log = logging.getLogger("dsc.delivery")

#: A subscription's task ends after this long without anything to send (a new notification
#: starts it again), so subscriptions that expired or were unsubscribed leave nothing behind.
IDLE_TASK_SECONDS = 30.0
#: Subscriptions given up recently: late notifications for them are dropped, not sent.
DEAD_REMEMBERED = 10_000
_READ_SIZE = 16 * 1024


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    """The hub's limits, read from :class:`dsc_core.Limits` (one place for every limit)."""

    queue_size: int = 64
    connect_timeout: float = 5.0
    answer_timeout: float = 10.0
    max_answer_head_bytes: int = 16 * 1024
    max_answer_body_bytes: int = 64 * 1024
    failures_before_end: int = 3

    @classmethod
    def from_limits(cls, limits: Limits, failures_before_end: int) -> DeliveryLimits:
        return cls(
            queue_size=limits.delivery_queue_size,
            connect_timeout=limits.delivery_connect_timeout,
            answer_timeout=limits.delivery_answer_timeout,
            max_answer_head_bytes=limits.max_delivery_answer_head_bytes,
            max_answer_body_bytes=limits.max_delivery_answer_body_bytes,
            failures_before_end=failures_before_end,
        )


#: A notification and what to run once it was answered (module doc).
_Item = tuple[Deliver, Callable[[], None] | None]


class _Subscription:
    __slots__ = ("dead", "failures", "identifier", "receive", "send")

    def __init__(self, identifier: str, size: int) -> None:
        self.identifier = identifier
        self.send: trio.MemorySendChannel[_Item]
        self.receive: trio.MemoryReceiveChannel[_Item]
        self.send, self.receive = trio.open_memory_channel[_Item](size)
        self.failures = 0
        self.dead = False


class DeliveryHub:
    """See the module doc.  ``start()``, then ``deliver()`` from any thread; ``close()``."""

    def __init__(
        self,
        limits: DeliveryLimits,
        report: Callable[[str, bool], None],
        give_up: Callable[[str], None],
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.limits = limits
        self._report = report
        self._give_up = give_up
        self._ssl_context = ssl_context
        self._subs: dict[str, _Subscription] = {}
        self._dead: OrderedDict[str, None] = OrderedDict()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        #: time.monotonic() by which queued deliveries must be done (set by close()).
        self._deadline: float | None = None
        #: Notifications accepted and not yet sent or discarded.
        self._pending = 0
        self._thread = threading.Thread(target=self._thread_main, name="dsc-delivery", daemon=True)
        self._closed = False
        #: Deliveries attempted / succeeded (for logs and tests).
        self.sent = 0
        self.delivered = 0

    # --- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def set_limits(self, limits: DeliveryLimits) -> None:
        """A configuration reload: applies to deliveries from now on."""
        self.limits = limits

    def deliver(self, command: Deliver, done: Callable[[], None] | None = None) -> None:
        """Queue one notification (thread-safe, never blocks); ``done``: module doc."""
        token = self._token
        if token is None or self._closed:
            log.warning("dropping notification to %s: delivery stopped", command.address)
            return
        try:
            token.run_sync_soon(self._accept, command, done)
        except trio.RunFinishedError:
            log.warning("dropping notification to %s: delivery stopped", command.address)

    def close(self, timeout: float) -> None:
        """Let queued deliveries run for up to ``timeout`` seconds, then stop."""
        if self._closed:
            return
        self._closed = True
        token = self._token
        if token is None:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        try:
            token.run_sync_soon(self._request_stop)
        except trio.RunFinishedError:
            return
        self._thread.join(timeout + 2.0)
        if self._thread.is_alive():
            log.warning("the delivery thread did not stop in time")

    # --- the hub's loop -----------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException:
            log.exception("the delivery loop failed")
        finally:
            self._token = None
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await self._stop.wait()
            deadline = self._deadline if self._deadline is not None else time.monotonic()
            with trio.move_on_after(max(0.0, deadline - time.monotonic())):
                while self._pending:
                    await trio.sleep(0.02)
            if self._pending:
                log.warning("delivery stopped with %d notification(s) not delivered", self._pending)
            nursery.cancel_scope.cancel()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _accept(self, command: Deliver, done: Callable[[], None] | None = None) -> None:
        """In the loop: put ``command`` in its subscription's queue (module doc)."""
        nursery = self._nursery
        assert nursery is not None
        identifier = command.subscription_id
        sub = self._subs.get(identifier)
        self._pending += 1
        if command.final:
            if sub is not None and not sub.dead:
                try:
                    sub.send.send_nowait((command, None))
                    return
                except trio.WouldBlock:
                    self._kill(sub, "its queue is full")
            nursery.start_soon(self._send_once, command)
            return
        if identifier in self._dead:
            self._pending -= 1
            return  # given up: the core ends it (SubscriptionEnd follows)
        if sub is None:
            sub = self._subs[identifier] = _Subscription(identifier, self.limits.queue_size)
            nursery.start_soon(self._run, sub)
        try:
            sub.send.send_nowait((command, done))
        except trio.WouldBlock:
            self._pending -= 1
            log.warning(
                "subscription %s: %d notifications queued and not delivered: ending it",
                identifier,
                self.limits.queue_size,
            )
            self._kill(sub, "its queue is full")
            self._give_up(identifier)

    def _kill(self, sub: _Subscription, why: str) -> None:
        """Stop delivering to ``sub``: discard what is queued, accept nothing more."""
        sub.dead = True
        if self._subs.get(sub.identifier) is sub:
            del self._subs[sub.identifier]
        self._dead[sub.identifier] = None
        while len(self._dead) > DEAD_REMEMBERED:
            self._dead.popitem(last=False)
        discarded = 0
        while True:
            try:
                sub.receive.receive_nowait()
                discarded += 1
                self._pending -= 1
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        sub.send.close()
        log.warning(
            "subscription %s: delivery stopped (%s); %d queued notification(s) discarded",
            sub.identifier,
            why,
            discarded,
        )

    async def _run(self, sub: _Subscription) -> None:
        """One subscription's deliveries, in order."""
        while not sub.dead:
            item: _Item | None = None
            with trio.move_on_after(IDLE_TASK_SECONDS):
                try:
                    item = await sub.receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            if item is None:  # idle: forget it (no await since the receive timed out)
                if self._subs.get(sub.identifier) is sub:
                    del self._subs[sub.identifier]
                sub.send.close()
                return
            command, done = item
            ok = await self._post(command)
            if done is not None:
                await self._done(done)
            if command.final:
                if self._subs.get(sub.identifier) is sub:
                    del self._subs[sub.identifier]
                sub.send.close()
                return
            if sub.dead:
                return  # given up while this one was in flight (queue full)
            self._report(sub.identifier, ok)
            sub.failures = 0 if ok else sub.failures + 1
            if sub.failures >= self.limits.failures_before_end:
                self._kill(sub, f"{sub.failures} consecutive failures")
                return

    async def _done(self, done: Callable[[], None]) -> None:
        try:
            await trio.to_thread.run_sync(done)
        except Exception:  # logged by the caller's own code; never stops this subscription
            log.exception("recording a notification as answered failed")

    async def _send_once(self, command: Deliver) -> None:
        await self._post(command)

    async def _post(self, command: Deliver) -> bool:
        """One notification: HTTP(S) POST, 2xx = delivered (R7).  Never raises."""
        self.sent += 1
        try:
            ok, why = await self._attempt(command)
        except Exception as exc:  # a bug must not stop this subscription's task
            log.exception("notification to %s failed", command.address)
            ok, why = False, repr(exc)
        finally:
            self._pending -= 1
        if ok:
            self.delivered += 1
        else:
            log.warning("notification to %s failed: %s", command.address, why)
        return ok

    async def _attempt(self, command: Deliver) -> tuple[bool, str]:
        limits = self.limits
        url = urllib.parse.urlsplit(command.address)
        try:
            port = url.port
        except ValueError:
            return False, "not a usable port"
        if url.scheme not in ("http", "https") or not url.hostname:
            return False, "not an http(s) address"
        host = url.hostname
        port = port or (443 if url.scheme == "https" else 80)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        stream: trio.abc.Stream | None = None
        with trio.move_on_after(limits.connect_timeout + limits.answer_timeout) as overall:
            try:
                with trio.move_on_after(limits.connect_timeout) as connecting:
                    stream = await trio.open_tcp_stream(host, port)
                if connecting.cancelled_caught or stream is None:
                    return False, f"no connection within {limits.connect_timeout:g} s"
                with trio.move_on_after(limits.answer_timeout) as answering:
                    if url.scheme == "https":
                        context = self._ssl_context or ssl.create_default_context()
                        tls = trio.SSLStream(stream, context, server_hostname=host)
                        stream = tls
                        await tls.do_handshake()
                    return await self._exchange(stream, command, host, target)
                if answering.cancelled_caught:
                    return False, f"no answer within {limits.answer_timeout:g} s"
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return False, str(exc) or type(exc).__name__
            except h11.ProtocolError as exc:
                return False, f"unreadable answer: {exc}"
            except ssl.SSLError as exc:
                return False, f"TLS: {exc}"
            finally:
                if stream is not None:
                    await trio.aclose_forcefully(stream)
        if overall.cancelled_caught:
            return False, "timed out"
        return False, "no answer"

    async def _exchange(
        self, stream: trio.abc.Stream, command: Deliver, host: str, target: str
    ) -> tuple[bool, str]:
        limits = self.limits
        body = command.body
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_answer_head_bytes)
        data = conn.send(
            h11.Request(
                method="POST",
                target=target,
                headers=[
                    ("Host", host),
                    ("Content-Type", command.content_type),
                    ("Content-Length", str(len(body))),
                    ("User-Agent", "dsc-server"),
                    ("Connection", "close"),
                ],
            )
        )
        await stream.send_all(data + body)
        status: int | None = None
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(_READ_SIZE)
                conn.receive_data(bytes(chunk))  # b"" is EOF: h11 says what that means
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                status = event.status_code
                if not 200 <= status < 300:
                    return False, f"answered HTTP {status}"
                # The verdict is in the head; read (and drop) at most the body cap, then go.
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > limits.max_answer_body_bytes:
                    break
            else:  # EndOfMessage, ConnectionClosed
                break
        if status is None:
            return False, "no answer"
        return True, ""
