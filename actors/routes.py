"""GatewayRoutes: the bus edge of gateway traffic. Each heartbeat is routed once, by id.

One subscription per pattern, on the bus loop: `P.gw.*.heartbeat`, `P.gw.*.goodbye`, and
`P.gw.*.*.>` only to count malformed subjects (an id with a dot in it). Never `P.gw.>`,
which would answer for absent gateways' config and ping requests and hide their "no
responders". A heartbeat is decoded and checked here (the payload must speak for the id of
its subject) and put in its gateway's `Coalescer`, whose actor is told HEARTBEATS_PENDING
only when no such wake-up is already on its way. This route is the GatewayActor's
subscription: there is no second one, so no heartbeat arrives twice.

The route table belongs to the loop thread: it is read and changed there only. The
supervisor, which owns the fleet's membership, changes it with `attach` and `detach`,
which hand the change to the loop. A heartbeat from an id with no route opens a
provisional one (its coalescer buffers what follows) and tells the supervisor
`Discovered`; once the supervisor has started the gateway's actor it attaches it, and
the buffered heartbeats go to the actor. When an actor falls far behind, its oldest
waiting heartbeats are shed (newest wins); while gatefleet as a whole is more than two
heartbeat intervals behind (local awareness says `shedding`), known gateways' heartbeats
are dropped unread, so that it catches up before the server cuts its connection as a
slow consumer (detection is suspended then anyway). Both count in `status` as shed
heartbeats.
"""

from __future__ import annotations

import time
from typing import Any

import pykka

from actors.base import safe_tell
from actors.coalescer import Coalescer
from actors.messages import HEARTBEATS_PENDING, Arrival, Discovered, GoodbyeReceived
from bus.awareness import LocalAwareness
from bus.edge import Drops, Tally, decode_from_gateway
from bus.runtime import Bus, Inbound, SubscriptionHandle
from bus.subjects import Subjects
from schemas.types import GATEWAY_ID_RE
from schemas.wire import Goodbye, Heartbeat

# Heartbeats of one gateway waiting for its actor; beyond this the oldest are dropped
# (shed, counted): only the newest decide its health, the count and seq rules aside.
MAX_PENDING_HEARTBEATS = 64


class _Route:
    __slots__ = ("pending", "ref")

    def __init__(self, pending: Coalescer[Arrival], ref: pykka.ActorRef[Any] | None) -> None:
        self.pending = pending
        self.ref = ref


class GatewayRoutes:
    def __init__(
        self, bus: Bus, subjects: Subjects, drops: Drops, shed: Tally, awareness: LocalAwareness
    ) -> None:
        self._bus = bus
        self._awareness = awareness
        self._subjects = subjects
        self._drops = drops
        self._shed = shed
        self._routes: dict[str, _Route] = {}  # the loop thread's alone
        self._supervisor: pykka.ActorRef[Any] | None = None
        self._subscriptions: list[SubscriptionHandle] = []

    def start(self, supervisor: pykka.ActorRef[Any]) -> None:
        """Subscribes (blocks the caller until the server has the interest)."""
        self._supervisor = supervisor
        subjects, handle = self._subjects, self._handler()
        for pattern in (subjects.all_heartbeats, subjects.all_goodbyes, subjects.malformed_gateway):
            self._subscriptions.append(self._bus.subscribe(pattern, handle))

    def stop(self) -> None:
        for subscription in self._subscriptions:
            subscription.unsubscribe()
        self._subscriptions.clear()

    # From the supervisor's thread --------------------------------------------------------

    def attach(
        self, gateway_id: str, ref: pykka.ActorRef[Any], pending: Coalescer[Arrival]
    ) -> None:
        """Routes the gateway's heartbeats to `ref` through `pending` from now on."""
        self._bus.call_soon(self._attach, gateway_id, ref, pending)

    def detach(self, gateway_id: str) -> None:
        self._bus.call_soon(self._routes.pop, gateway_id, None)

    # On the loop -------------------------------------------------------------------------

    def _attach(
        self, gateway_id: str, ref: pykka.ActorRef[Any], pending: Coalescer[Arrival]
    ) -> None:
        old = self._routes.get(gateway_id)
        if old is not None and old.pending is not pending:  # heartbeats that came first
            for arrival in old.pending.take():
                pending.put(arrival)
        self._routes[gateway_id] = _Route(pending, ref)
        if len(pending):
            safe_tell(ref, HEARTBEATS_PENDING)

    def _handler(self) -> Any:
        prefix = self._subjects.prefix + ".gw."
        routes, drops, shed, clock = self._routes, self._drops, self._shed, time.monotonic
        awareness = self._awareness
        supervisor = self._supervisor
        assert supervisor is not None

        def handle(msg: Inbound) -> None:
            gateway_id, _, verb = msg.subject[len(prefix) :].partition(".")
            route = routes.get(gateway_id)  # a known id is a valid token: no check needed
            if route is None and not GATEWAY_ID_RE.fullmatch(gateway_id):
                verb = ""
            if verb == "heartbeat":
                if awareness.shedding and route is not None:  # far behind: see awareness
                    shed.add("heartbeats")
                    return
                heartbeat = decode_from_gateway(msg, Heartbeat, gateway_id, drops)
                if heartbeat is None:
                    return
                if route is None:
                    route = routes[gateway_id] = _Route(Coalescer(), None)
                    route.pending.put((heartbeat, clock()))
                    safe_tell(supervisor, Discovered(heartbeat=heartbeat, pending=route.pending))
                else:
                    pending = route.pending
                    if len(pending) >= MAX_PENDING_HEARTBEATS and pending.drop_oldest():
                        shed.add("heartbeats")  # its actor is far behind
                    if route.pending.put((heartbeat, clock())) and route.ref is not None:
                        safe_tell(route.ref, HEARTBEATS_PENDING)
            elif verb == "goodbye":
                if decode_from_gateway(msg, Goodbye, gateway_id, drops) is not None:
                    safe_tell(supervisor, GoodbyeReceived(gateway_id=gateway_id))
            else:
                drops.drop("bad_subject", msg.subject, "not P.gw.<id>.heartbeat|goodbye")

        return handle
