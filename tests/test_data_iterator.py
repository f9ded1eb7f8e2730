"""PromptIterator: deterministic epochs, exact resume through a (json) state round trip, process slices."""
import json

import numpy as np
import pytest

from klq_jax.data.common import PromptDataset
from klq_jax.data.iterator import PromptIterator


def make_ds(n, width=3, pad=-1):
    ids = np.full((n, width), pad, np.int32)
    mask = np.zeros((n, width), np.float32)
    for i in range(n):
        k = 1 + i % width
        ids[i, width - k:] = 1000 + i
        mask[i, width - k:] = 1.0
    return PromptDataset(ids, mask, [f"p{i}" for i in range(n)], [f"r{i}" for i in range(n)], pad_id=pad)


def take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_are_rows_of_the_dataset_and_epochs_are_permutations():
    ds = make_ds(12)
    it = PromptIterator(ds, batch_size=4, seed=3)
    assert it.batches_per_epoch == 3
    epochs = []
    for _ in range(3):
        idx = np.concatenate([b["index"] for b in take(it, 3)])
        assert sorted(idx.tolist()) == list(range(12))  # every prompt once per epoch
        epochs.append(idx.tolist())
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    b = next(it)
    assert b["prompt_ids"].dtype == np.int32 and b["prompt_mask"].dtype == np.float32
    assert b["index"].dtype == np.int32 and b["prompt_ids"].shape == (4, 3)
    np.testing.assert_array_equal(b["prompt_ids"], ds.prompt_ids[b["index"]])
    np.testing.assert_array_equal(b["prompt_mask"], ds.prompt_mask[b["index"]])
    # same seed, same order; other seed, other order
    again = [x["index"].tolist() for x in take(PromptIterator(ds, 4, seed=3), 9)]
    assert sum(again, []) == sum(epochs, [])
    other = [x["index"].tolist() for x in take(PromptIterator(ds, 4, seed=4), 3)]
    assert sum(other, []) != epochs[0]


def test_drop_last_skips_the_tail():
    ds = make_ds(10)
    it = PromptIterator(ds, batch_size=4, seed=0)
    e0 = np.concatenate([b["index"] for b in take(it, 2)])
    assert len(set(e0.tolist())) == 8
    perm1 = np.random.default_rng([0, 1]).permutation(10)
    np.testing.assert_array_equal(next(it)["index"], perm1[:4])  # the next epoch's first rows


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_after_json_round_trip_gives_identical_batches(drop_last):
    ds = make_ds(10)
    for stop in range(0, 9):  # stop anywhere, including at and across epoch ends
        it = PromptIterator(ds, batch_size=4, seed=7, drop_last=drop_last)
        take(it, stop)
        state = json.loads(json.dumps(it.state_dict()))
        assert all(type(v) is int for v in state.values())
        expected = take(it, 6)
        resumed = PromptIterator(ds, batch_size=4, seed=7, drop_last=drop_last)
        resumed.load_state_dict(state)
        for a, b in zip(expected, take(resumed, 6)):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_process_slices_are_disjoint_and_cover_the_global_batch():
    ds = make_ds(24)
    glob = PromptIterator(ds, batch_size=8, seed=1)
    procs = [PromptIterator(ds, batch_size=8, seed=1, process_index=p, process_count=4) for p in range(4)]
    for _ in range(7):  # crosses an epoch end
        g = next(glob)
        parts = [next(it) for it in procs]
        idx = [p["index"].tolist() for p in parts]
        assert all(len(i) == 2 for i in idx)
        flat = sum(idx, [])
        assert len(set(flat)) == 8  # disjoint
        assert flat == g["index"].tolist()  # together, in order, the global batch
        np.testing.assert_array_equal(np.concatenate([p["prompt_ids"] for p in parts]), g["prompt_ids"])
    # the state is global: a process's state resumes a single-process iterator at the same prompt
    single = PromptIterator(ds, batch_size=8, seed=1)
    single.load_state_dict(procs[2].state_dict())
    assert next(single)["index"].tolist() == next(glob)["index"].tolist()


def test_drop_last_false_fills_the_last_batch_with_a_valid_mask():
    ds = make_ds(10)
    it = PromptIterator(ds, batch_size=4, seed=2, drop_last=False)
    assert it.batches_per_epoch == 3
    batches = take(it, 3)
    assert [b["valid"].tolist() for b in batches] == [[1.0] * 4, [1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    seen = np.concatenate([b["index"][b["valid"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))
    perm0 = np.random.default_rng([2, 0]).permutation(10)
    assert batches[2]["index"].tolist() == perm0[8:].tolist() + perm0[:2].tolist()
    assert next(it)["index"].tolist() == np.random.default_rng([2, 1]).permutation(10)[:4].tolist()
    # per-process shapes stay fixed too
    p1 = PromptIterator(ds, batch_size=4, seed=2, process_index=1, process_count=2, drop_last=False)
    assert [b["valid"].tolist() for b in take(p1, 3)][2] == [0.0, 0.0]


def test_errors():
    ds = make_ds(10)
    with pytest.raises(ValueError, match="not divisible"):
        PromptIterator(ds, batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="fewer than one batch"):
        PromptIterator(ds, batch_size=16, seed=0)
    state = PromptIterator(ds, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PromptIterator(ds, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="12 prompts|10 prompts"):
        PromptIterator(make_ds(12), 4, seed=0).load_state_dict(state)
    other = make_ds(10, pad=-2)
    with pytest.raises(ValueError, match="fingerprint"):
        PromptIterator(other, 4, seed=0).load_state_dict(state)
