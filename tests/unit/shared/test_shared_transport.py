"""`Server.recv_ready`: one wake-up takes every frame already queued, in order, with bad
frames answered and left out, as `recv` would one at a time."""

from __future__ import annotations

import asyncio

from shared import protocol as P
from shared.transport import Client, Server


async def test_recv_ready_takes_what_is_queued_in_order_and_answers_bad_frames() -> None:
    server = Server("tcp://127.0.0.1:*")
    client = Client(server.endpoint, "peer-1")
    client.start()
    try:
        for i in range(3):
            await client.send(P.Heartbeat(peer_id=f"hb-{i}"))
        await client.sock.send(b"\xc1 not msgpack")
        await client.send(P.Heartbeat(peer_id="hb-3"))
        got: list[str] = []
        while len(got) < 4:
            ready = await asyncio.wait_for(server.recv_ready(limit=2), 5)
            assert 1 <= len(ready) <= 2
            got += [msg.peer_id for ident, msg in ready if ident == client.routing_id]
        assert got == ["hb-0", "hb-1", "hb-2", "hb-3"]
        error = await client.recv(P.Error, timeout=5)
        assert error.reason == "malformed"
    finally:
        client.close()
        server.close()
