"""Batches handed to the learner, kept until a checkpoint covers them: exactly-once training.

A batch's life:
  handed   claimed from replay; its record is written in the same transaction that counts
           the sampling of its trajectories, so no crash can leave them counted but unowned
  trained  the learner's `BatchTrained(step)`; kept, since the learner may crash before a
           checkpoint holds that step and resume from an older one
  gone     the learner's `Checkpointed(step)` covers the step: the record is deleted
A SampleRequest while a batch is handed but not trained is answered with that batch again,
same id: the learner asks only after acknowledging its last batch, so the earlier reply was
lost or is late (the learner recognises a duplicate by its id). A learner's Hello names the
step it resumed from; batches trained after that step are handed again, oldest first.

Records live in the store's key-value table (`batch/<id>`, and the id counter), so a broker
restart keeps them; retention never deletes the trajectories of a kept batch (see
`oldest_seq`).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

PREFIX = "batch/"
NEXT_ID_KEY = "next_batch_id"


class BatchRecord(msgspec.Struct):
    batch_id: int
    seqs: list[int]
    is_weights: list[float]
    cursor: int
    trained_step: int = 0  # 0: handed, not acknowledged; else the learner step that trained it


def key(batch_id: int) -> str:
    return f"{PREFIX}{batch_id:016d}"


def encode(rec: BatchRecord) -> bytes:
    return msgspec.msgpack.encode(rec)


class BatchBook:
    def __init__(self) -> None:
        self.records: dict[int, BatchRecord] = {}  # by id, in id (= hand-out) order
        self.next_id = 1  # never reused: the learner tells duplicates apart by id

    def load(self, stored: Iterable[tuple[str, bytes]], next_id: bytes | None) -> None:
        recs = sorted(
            (msgspec.msgpack.decode(v, type=BatchRecord) for _, v in stored),
            key=lambda r: r.batch_id,
        )
        self.records = {r.batch_id: r for r in recs}
        last = max(self.records, default=0)
        self.next_id = max(last + 1, int(next_id) if next_id else 1)

    def new(self, seqs: list[int], is_weights: list[float], cursor: int) -> BatchRecord:
        """A record for a batch about to be claimed; `add` it once the claim committed."""
        rec = BatchRecord(self.next_id, seqs, is_weights, cursor)
        self.next_id += 1
        return rec

    def kv_of_new(self, rec: BatchRecord) -> list[tuple[str, bytes | None]]:
        """What the claim of `rec` writes with it."""
        return [(key(rec.batch_id), encode(rec)), (NEXT_ID_KEY, str(self.next_id).encode())]

    def add(self, rec: BatchRecord) -> None:
        self.records[rec.batch_id] = rec

    def drop(self, batch_id: int) -> BatchRecord | None:
        return self.records.pop(batch_id, None)

    def pending(self) -> BatchRecord | None:
        """The oldest batch handed and not acknowledged (to hand again), if any."""
        return next((r for r in self.records.values() if not r.trained_step), None)

    def trained(self, batch_id: int, step: int) -> BatchRecord | None:
        """Note the learner's acknowledgement; the record to persist, or None when unknown
        (checkpointed already) or already acknowledged by that step."""
        rec = self.records.get(batch_id)
        if rec is None or rec.trained_step == step or step < 1:
            return None
        rec.trained_step = step
        return rec

    def checkpointed(self, step: int) -> list[int]:
        """Forget batches trained at or before `step`; returns their ids."""
        done = [i for i, r in self.records.items() if 0 < r.trained_step <= step]
        for i in done:
            del self.records[i]
        return done

    def learner_resumed(self, step: int) -> list[BatchRecord]:
        """A learner (re)started from `step`: what later steps trained is lost with them, so
        those batches are handed again. Returns the records changed (to persist)."""
        lost = [r for r in self.records.values() if r.trained_step > step]
        for r in lost:
            r.trained_step = 0
        return lost

    def oldest_seq(self) -> int | None:
        """The oldest trajectory any kept batch holds (retention deletes only before it)."""
        return min((min(r.seqs) for r in self.records.values() if r.seqs), default=None)

    def state(self) -> dict[str, int]:
        handed = sum(1 for r in self.records.values() if not r.trained_step)
        return {"handed": handed, "trained_unsaved": len(self.records) - handed}
