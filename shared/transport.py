"""ZeroMQ asyncio sockets speaking `shared.protocol`.

`Server` is a ROUTER: it decodes every frame under a size cap, answers a bad frame with an
`Error` and counts it in `headrace_rejected_frames_total{reason}`, and never raises on input.
`Client` is a DEALER whose routing id is `<peer_id>/<random nonce>`: fixed for the life of
the Client (a server keeps recognising it across reconnects, its own restarts included), new
for every Client (every process), and never guessable from the peer id, so no other peer can
take it over and have the server's replies to it diverted (see ROUTER_HANDOVER below).
`peer_name` recovers the peer id from a routing id; the id itself is never shown to peers.
A background task routes incoming messages to per-type queues and callbacks. ZeroMQ
reconnects by itself; the client layers request retries and a retry budget on top.
Given `curve` keys (shared/security.py) either side speaks CurveZMQ: a server then admits only
listed client keys, and a refused peer's frames never reach `recv`. A CURVE server also knows
each sender's key, hence its role (`role_of`), and binds a routing id to the key that first
used it: a frame from a bound routing id under another key is refused (`forbidden`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, overload

import zmq
import zmq.asyncio

from shared import protocol as P
from shared.metrics import REJECTED_FRAMES
from shared.security import (
    CurveClient,
    CurveServer,
    HandshakeWatch,
    client_names,
    client_roles,
    secure_client,
    secure_server,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# A frame bigger than this closes the connection at the ZMQ layer (protection against a peer
# trying to make us allocate without bound); frames between the protocol cap and this are
# received, rejected with an Error reply and counted.
_HARD_CAP_FACTOR = 2


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop where it is installed: the broker's and the actor's
    loops (fewer microseconds per wake-up, per future, per socket event). The environment
    variable HEADRACE_EVENT_LOOP=asyncio keeps the standard loop."""
    if os.environ.get("HEADRACE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


class PeerUnreachable(RuntimeError):
    """The other side did not answer within the retry budget."""


def _ctx() -> zmq.asyncio.Context:
    return zmq.asyncio.Context.instance()


ROUTING_SEP = "/"  # between a routing id's peer id and its nonce


def new_routing_id(peer_id: str) -> bytes:
    """A routing id for a new Client of `peer_id`: the peer id, then 64 random bits."""
    return f"{peer_id}{ROUTING_SEP}{secrets.token_hex(8)}".encode()


def peer_name(ident: bytes) -> str:
    """The peer id a routing id was made from (`new_routing_id`), without its nonce: what a
    server may show of a peer. An id without a nonce (a raw DEALER's) is its own name."""
    name, sep, _ = ident.rpartition(ROUTING_SEP.encode())
    return (name if sep else ident).decode(errors="replace")


class Server:
    def __init__(
        self,
        bind: str,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        accepts: object = P.Message,
        curve: CurveServer | None = None,
        sndhwm: int = 10_000,
    ) -> None:
        """`accepts`: the union decoded (e.g. `P.BrokerInbound`, which leaves trajectories as
        frames); whatever it is, frames are capped and validated the same way. `curve`: serve
        CurveZMQ to the clients it lists (None: plaintext). `sndhwm`: replies queued per peer
        before ZeroMQ drops more (what a peer that requests without reading can pin)."""
        self.max_frame_bytes = max_frame_bytes
        self._decoder = P.decoder_for(accepts)
        self.sock = _ctx().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # A reconnecting Client takes its routing id back at once (its old connection may
        # not have been seen to close yet). Handover goes to whoever connects with the id, so
        # it is only safe because a Client's id carries a random nonce no other peer knows
        # (`new_routing_id`; servers never disclose it): a peer cannot name another's id to
        # divert the replies meant for it. A restarted process has a new id; the broker
        # takes its Hello as the restart of the peer's old ids (broker/server.py). Under
        # CURVE an id also stays bound to the key that first used it (`_bound`): another key's
        # frames under it are refused, should the id leak.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.roles: dict[str, str] | None = client_roles(curve.allowed_dir) if curve else None
        self.key_names = client_names(curve.allowed_dir) if curve else {}
        self._key_of: dict[bytes, str] = {}  # routing id -> the key (z85) that first used it
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes * _HARD_CAP_FACTOR)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)  # before bind: connections copy it
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        # Before bind: a connection accepted before the ZAP handler exists would be let in.
        self._watch: HandshakeWatch | None = secure_server(self.sock, curve) if curve else None
        try:
            self.sock.bind(bind)
        except zmq.ZMQError:
            self.close()  # e.g. port in use: do not leave the monitor thread behind
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # the same socket, read without a future where a frame is known to be waiting
        self._sync: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)

    async def recv(self) -> tuple[bytes, Any]:
        """Next well-formed message; bad frames are answered and counted here."""
        while True:
            got = await self._accept(await self.sock.recv_multipart(copy=False))
            if got is not None:
                return got

    async def recv_ready(self, limit: int) -> list[tuple[bytes, Any]]:
        """The next well-formed message and those already queued behind it, up to `limit`:
        what one wake-up of the loop can take without waiting (never empty)."""
        out = [await self.recv()]
        while len(out) < limit:
            try:
                parts = self._sync.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            got = await self._accept(parts)
            if got is not None:
                out.append(got)
        return out

    async def _accept(self, parts: list[zmq.Frame]) -> tuple[bytes, Any] | None:
        """The message `parts` hold, or None for a bad frame (answered and counted)."""
        if len(parts) != 2:
            REJECTED_FRAMES.labels(reason="multipart").inc()
            if parts:
                await self._reply_error(parts[0].bytes, "multipart", f"{len(parts) - 1} parts")
            return None
        ident, frame = parts[0].bytes, parts[1].buffer
        if self.roles is not None and not self._bound(ident, parts[1]):
            REJECTED_FRAMES.labels(reason="forbidden").inc()
            await self._reply_error(ident, "forbidden", "routing id bound to another key")
            return None
        try:
            return ident, P.decode(frame, self.max_frame_bytes, self._decoder)
        except P.ProtocolError as e:
            REJECTED_FRAMES.labels(reason=e.reason).inc()
            log.warning("rejected frame from %r: %s", ident, e)
            await self._reply_error(ident, e.reason, e.detail[:500])
            return None

    def _bound(self, ident: bytes, frame: zmq.Frame) -> bool:
        key = str(frame.get("User-Id"))
        return self._key_of.setdefault(ident, key) == key

    def key_of(self, ident: bytes) -> str | None:
        """The key (z85) `ident` is bound to; None without CURVE or before its first frame."""
        return self._key_of.get(ident)

    def forget(self, ident: bytes) -> None:
        """Drop `ident`'s key binding (its peer is gone: every new Client brings a new id, so
        bindings would pile up); should it come back, its next frame binds it again."""
        self._key_of.pop(ident, None)

    def key_name(self, ident: bytes) -> str:
        """The allow-list name of the key behind `ident` (`actor-3`); "" without CURVE."""
        return self.key_names.get(self._key_of.get(ident, ""), "")

    def role_of(self, ident: bytes) -> str | None:
        """The role of the key behind `ident` (CURVE); None without CURVE or for a key whose
        name names no role."""
        if self.roles is None:
            return None
        return self.roles.get(self._key_of.get(ident, ""))

    async def _reply_error(self, ident: bytes, reason: str, detail: str) -> None:
        await self.send(ident, P.Error(reason=reason, detail=detail))

    async def send(self, ident: bytes, msg: P.Base, copy: bool = False) -> None:
        """Send `msg` to peer `ident`. `copy=True` hands ZeroMQ a copy it owns and frees in
        its I/O thread; the default zero-copy send keeps the encoded frame alive until pyzmq's
        garbage-collector thread releases it (cheaper, but unbounded under a flood of
        replies: learner/publish.py)."""
        try:
            await self.sock.send_multipart([ident, P.encode(msg)], copy=copy)
        except zmq.ZMQError as e:  # peer gone (ROUTER_MANDATORY is off, but be safe)
            log.debug("send to %r failed: %s", ident, e)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self.sock.close(linger=0)


class Client:
    """DEALER connection to one server with typed receive queues."""

    def __init__(
        self,
        connect: str,
        peer_id: str,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        curve: CurveClient | None = None,
        routing_id: bytes | None = None,
    ) -> None:
        """`curve`: connect with CurveZMQ, trusting only the server key it names.
        `routing_id`: None (always, but in tests) for a new `new_routing_id(peer_id)`; given,
        this Client stands for the one that had it (the same process, reconnecting)."""
        self.endpoint = connect
        self.peer_id = peer_id
        self.routing_id = routing_id or new_routing_id(peer_id)
        self.max_frame_bytes = max_frame_bytes
        self.sock = _ctx().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes * _HARD_CAP_FACTOR)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.sock.setsockopt(zmq.SNDHWM, 10_000)
        self._watch: HandshakeWatch | None = (
            secure_client(self.sock, curve, connect) if curve else None
        )
        self.sock.connect(connect)
        self._queues: dict[type, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self._handlers: dict[type, Callable[[Any], Awaitable[None] | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.last_recv = 0.0

    def on(self, kind: type[T], handler: Callable[[T], Awaitable[None] | None]) -> None:
        """Route every incoming `kind` message to `handler` instead of a queue."""
        self._handlers[kind] = handler

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._recv_loop())

    async def _recv_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.sock.recv(copy=False)
            self.last_recv = loop.time()
            try:
                msg = P.decode(frame.buffer, self.max_frame_bytes)
            except P.ProtocolError as e:
                REJECTED_FRAMES.labels(reason=e.reason).inc()
                log.warning("rejected frame from %s: %s", self.endpoint, e)
                continue
            handler = self._handlers.get(type(msg))
            if handler is not None:
                try:
                    result = handler(msg)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # a handler bug must not kill the connection
                    log.exception("handler for %s failed", type(msg).__name__)
            else:
                self._queues[type(msg)].put_nowait(msg)

    async def send(self, msg: P.Base) -> None:
        await self.sock.send(P.encode(msg), copy=False)

    async def recv(self, kind: type[T], timeout: float | None = None) -> T:
        return await asyncio.wait_for(self._queues[kind].get(), timeout)

    def drain(self, kind: type) -> None:
        q = self._queues[kind]
        while not q.empty():
            q.get_nowait()

    @overload
    async def request(
        self, msg: P.Base, reply: type[T], timeout: float = ..., retries: int = ...
    ) -> T: ...
    @overload
    async def request(
        self, msg: P.Base, reply: tuple[type, ...], timeout: float = ..., retries: int = ...
    ) -> Any: ...
    async def request(
        self,
        msg: P.Base,
        reply: type[T] | tuple[type, ...],
        timeout: float = 5.0,
        retries: int = 3,
    ) -> Any:
        """Send and wait for the first reply of one of `reply` types (or an Error).

        Resends on timeout up to `retries` times, then raises PeerUnreachable. An `Error`
        answer raises ProtocolError. Only use for idempotent requests.
        """
        kinds = reply if isinstance(reply, tuple) else (reply,)
        for _ in range(retries + 1):
            for k in (*kinds, P.Error):
                self.drain(k)
            try:
                # A DEALER with no connection to send on (the server refused its handshake,
                # or is not up yet) waits in send for as long as that lasts: bound it too.
                await asyncio.wait_for(self.send(msg), timeout)
            except TimeoutError:
                continue
            waiters: dict[asyncio.Future[Any], type] = {
                asyncio.ensure_future(self.recv(k)): k for k in (*kinds, P.Error)
            }
            done, pending = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for f in pending:
                f.cancel()
            if done:
                result = next(iter(done)).result()
                if isinstance(result, P.Error):
                    raise P.ProtocolError(result.reason, result.detail)
                return result
        raise PeerUnreachable(
            f"{self.endpoint} did not answer {type(msg).__name__} "
            f"after {retries + 1} tries of {timeout:.0f}s"
        )

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watch is not None:
            self._watch.stop()
        self.sock.close(linger=0)
