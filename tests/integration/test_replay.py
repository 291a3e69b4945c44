"""Record and replay: `headrace replay` trains a fresh learner on a stored run, offline.

The "run" is a broker store written directly with the store API (durability sqlite, no vLLM,
no broker process): synthetic trajectories valid for the tiny model, a few complete GRPO
groups, an incomplete one and an extra trajectory beyond a group's size. Two replays of it
must give bit-identical losses and final weights.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import pytest_asyncio

from broker.store import Store
from broker.store.export import export
from shared import framefile, synthetic
from shared import protocol as P

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GROUP_SIZE = 4
BATCH_GROUPS = 2
N_GROUPS = 7  # complete groups: 3 steps of 2 groups, 1 group left over


def _trajectories() -> tuple[list[P.Trajectory], list[str]]:
    """Stored order, and the complete groups in the order of their first trajectory."""
    rng = np.random.default_rng(0)

    def traj(gid: str, k: int, version: int) -> P.Trajectory:
        n = 24 + int(rng.integers(0, 8))
        return synthetic.trajectory(
            f"{gid}-{k}", gid, n_tokens=n, reward=float(k % 2), rng=rng, policy_version=version
        )

    groups = {
        f"g{g}": [traj(f"g{g}", k, g // 2) for k in range(GROUP_SIZE)] for g in range(N_GROUPS)
    }
    partial = [traj("partial", k, 0) for k in range(GROUP_SIZE - 1)]
    extra = traj("g1", GROUP_SIZE, 0)  # a fifth trajectory of a complete group
    # g0 then g1 interleaved with the partial group and g1's extra; the rest one after another
    order = [*groups["g0"][:2], partial[0], *groups["g1"][:1], *groups["g0"][2:]]
    order += [*groups["g1"][1:], partial[1], extra, partial[2]]
    for g in range(2, N_GROUPS):
        order += groups[f"g{g}"]
    return order, list(groups)


async def _record(data_dir: Path, trajs: list[P.Trajectory]) -> None:
    store = Store(data_dir)
    await store.open()
    try:
        for i in range(0, len(trajs), 5):  # several commits, as a live broker makes
            await store.put(trajs[i : i + 5])
    finally:
        await store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def recorded(tmp_path_factory) -> tuple[Path, list[P.Trajectory], list[str]]:
    data_dir = tmp_path_factory.mktemp("recorded") / "broker"
    trajs, order = _trajectories()
    await _record(data_dir, trajs)
    return data_dir, trajs, order


def _config(path: Path, model: Path) -> Path:
    # The first replay builds the tiny model (in its process: this one never imports torch).
    path.write_text(
        f'[model]\npath = "{model}"\nbuild_tiny_if_missing = true\n\n'
        f"[broker]\ngroup_size = {GROUP_SIZE}\n\n"
        f"[learner]\nbatch_groups = {BATCH_GROUPS}\nlr = 0.01\nseed = 3\n"
        # two epochs of two minibatches: the shuffles draw from the seeded RNG
        "ppo_epochs = 2\nminibatches = 2\n"
    )
    return path


def _headrace(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_export_whole_groups_in_stored_order(recorded) -> None:
    data_dir, trajs, order = recorded
    buf = io.BytesIO()
    stats = export(data_dir, buf, GROUP_SIZE)
    assert (stats.groups, stats.trajectories) == (N_GROUPS, N_GROUPS * GROUP_SIZE)
    assert (stats.incomplete_groups, stats.incomplete_trajectories) == (1, GROUP_SIZE - 1)
    assert stats.extra_trajectories == 1
    buf.seek(0)
    groups = [P.decode(f) for f in framefile.read_frames(buf)]
    assert all(isinstance(g, P.Batch) for g in groups)
    assert [g.items[0].group_id for g in groups] == order
    by_id = {t.traj_id: P.encode(t) for t in trajs}
    for g in groups:
        assert [t.traj_id for t in g.items] == [f"{g.items[0].group_id}-{k}" for k in range(4)]
        # the stored bytes, unchanged
        assert all(msgspec.msgpack.encode(t) == by_id[t.traj_id] for t in g.items)
        assert g.sample_ids == sorted(g.sample_ids) and g.cursor == max(g.sample_ids)


def test_two_replays_are_bit_identical(recorded, tmp_path) -> None:
    data_dir, _, _ = recorded
    tiny_model = tmp_path / "tiny"
    config = _config(tmp_path / "replay.toml", tiny_model)
    runs = []
    # a: --steps 3 (the 7th group is only counted); b: as many steps as the data forms (3)
    for name, steps in (("a", ["--steps", "3"]), ("b", [])):
        summary, ckpt = tmp_path / f"{name}.json", tmp_path / f"ckpt-{name}"
        out = _headrace(
            "replay",
            "--data-dir",
            str(data_dir.parent),  # a `headrace run` dir: the store is in broker/
            "--config",
            str(config),
            "--summary-json",
            str(summary),
            "--checkpoint-dir",
            str(ckpt),
            *steps,
        )
        assert out.returncode == 0, out.stderr
        assert "exported 7 groups" in out.stderr and "skipped 1 incomplete" in out.stderr
        assert "replayed 3 steps; the data forms 3 (7 groups, 2 per step, 1 left over)" in (
            out.stderr
        )
        runs.append((json.loads(summary.read_text())["steps"], ckpt / "step_000003"))
    (steps_a, ckpt_a), (steps_b, ckpt_b) = runs
    assert len(steps_a) == N_GROUPS // BATCH_GROUPS == 3
    assert [s["step"] for s in steps_a] == [1, 2, 3]
    assert [s["policy_version"] for s in steps_a] == [1, 2, 3]
    losses_a = [s["loss"] for s in steps_a]
    assert all(isinstance(x, float) for x in losses_a)
    assert losses_a == [s["loss"] for s in steps_b]  # exactly, not approximately
    assert [s["behaviour_version_max"] for s in steps_a] == [0, 1, 2]
    weights_a = (ckpt_a / "model.safetensors").read_bytes()
    assert weights_a == (ckpt_b / "model.safetensors").read_bytes()
    # it trained: the final weights are not the initial ones
    assert weights_a != (tiny_model / "model.safetensors").read_bytes()


def test_missing_data_dir_is_one_line(tmp_path) -> None:
    out = _headrace("replay", "--data-dir", str(tmp_path / "nope"), timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no data dir" in out.stderr


async def test_empty_store_is_one_line(tmp_path) -> None:
    await _record(tmp_path / "broker", [])
    out = _headrace("replay", "--data-dir", str(tmp_path), timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "no complete group" in out.stderr
