"""A starting broker's state, rebuilt from its store: what survives a broker restart.

The run id, the lease secret, the newest policy, open leases, task feedback, the curator's
state, the kept batches (broker/batches.py) and the replay index: open trajectories regrouped,
complete groups back in replay in their stored (FIFO) order.
"""

from __future__ import annotations

import secrets
import time

import msgspec

from broker import metrics as M
from broker.batches import NEXT_ID_KEY, PREFIX
from broker.curriculum.service import STATE_KEY as CURRICULUM_STATE_KEY
from broker.intake import Ingest
from broker.leases import LeaseRecord
from broker.parts import Books
from broker.relay import Relay
from shared import protocol as P

LEASE_SECRET_KEY = "lease_secret"  # the key of lease ids' tags (broker/leases.py)


async def restore(
    books: Books, relay: Relay, ingest: Ingest, max_times_sampled: int, now: float
) -> str:
    """Load every part's saved state; returns the run id (a new one on an empty store)."""
    store = books.store
    run_id = await store.kv_get("run_id")
    if run_id is None:
        new_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        await store.kv_set("run_id", new_id.encode())
    else:
        new_id = run_id.decode()
    secret = await store.kv_get(LEASE_SECRET_KEY)
    if secret is None:
        secret = secrets.token_bytes(16)
        await store.kv_set(LEASE_SECRET_KEY, secret)
    books.leases.secret = books.evals.book.secret = secret
    policy = await store.kv_get("policy")
    if policy is not None:
        relay.restore(msgspec.msgpack.decode(policy, type=P.PolicyPublished))
    leases = await store.kv_scan("lease/")
    books.leases.restore(msgspec.msgpack.decode(v, type=LeaseRecord) for _, v in leases)
    for _, v in await store.kv_scan("feedback/"):
        books.bank.feedback(msgspec.msgpack.decode(v, type=P.TaskFeedback))
    books.curriculum.load(await store.kv_get(CURRICULUM_STATE_KEY))
    books.batches.load(await store.kv_scan(PREFIX), await store.kv_get(NEXT_ID_KEY))
    M.BATCHES_KEPT.set(len(books.batches.records))
    for meta in await store.scan_open(max_times_sampled):
        ingest.add_to_group(meta, now, times_sampled=meta.times_sampled, restoring=True)
    return new_id
