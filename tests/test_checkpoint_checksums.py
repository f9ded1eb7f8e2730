"""Checkpoints detect silent damage of their arrays: exact per-leaf checksums saved in the meta
(:func:`klq_jax.checkpoint.array_checksums`) and verified on restore. Tiny states, no training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from klq_jax import errors
from klq_jax.checkpoint import CHECKSUM_FORMAT, Checkpointer, array_checksums
from tests.helpers import testing


def _state(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": {"dense": {"kernel": jax.random.normal(k[0], (8, 16)),
                             "bias": jax.random.normal(k[1], (16,)).astype(jnp.bfloat16)}},
        "step": jnp.int32(seed),
        "key": jax.random.key_data(k[2]),
    }


def _bits(tree):
    """Leaves as raw bytes (bitwise equality, NaN-safe)."""
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def _numpy_checksum(a) -> int:
    """The checksum scheme computed independently with numpy uint32 wraparound arithmetic."""
    a = np.asarray(a)
    words = a.astype(np.uint8) if a.dtype == bool else a.view(f"uint{8 * a.dtype.itemsize}")
    words = words.reshape(-1).astype(np.uint32)
    weights = 2 * np.arange(words.size, dtype=np.uint32) + np.uint32(1)
    s1 = words.sum(dtype=np.uint32)
    s2 = (words * weights).sum(dtype=np.uint32)
    return (int(s1) << 32) | int(s2)


def test_array_checksums_match_an_independent_numpy_computation():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((37, 5)).astype(np.float32),
        "bf16": jnp.asarray(rng.standard_normal((3, 7, 11)), jnp.bfloat16),
        "i8": rng.integers(-128, 128, (300,)).astype(np.int8),
        "u32": rng.integers(0, 2**32, (1000,), dtype=np.uint32),  # the sums wrap many times
        "flags": rng.random((4, 9)) < 0.5,
        "scalar": np.int32(-7),
        "nested": {"kernel": rng.standard_normal((4,)).astype(np.float16)},
    }
    got = array_checksums(jax.tree.map(jnp.asarray, tree))
    want = {k: _numpy_checksum(v) for k, v in tree.items() if k != "nested"}
    want["nested/kernel"] = _numpy_checksum(tree["nested"]["kernel"])
    assert got == want
    # any one flipped bit and two swapped elements change the checksum
    f = tree["f32"].copy()
    f.view(np.uint32)[10, 3] ^= 1 << 31
    g = tree["f32"].copy()
    g[0, 0], g[0, 1] = g[0, 1], g[0, 0]
    flipped, swapped = array_checksums([jnp.asarray(f), jnp.asarray(g)]).values()
    assert flipped != got["f32"] and swapped != got["f32"]


def test_checksums_are_the_same_on_one_device_and_sharded(tmp_path):
    assert jax.device_count() >= 8, "conftest provides 8 CPU devices"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    rng = np.random.default_rng(1)
    tree = {
        "w": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32),
        "e": jnp.asarray(rng.standard_normal((8, 4, 6)), jnp.bfloat16),
        "c": jnp.asarray(rng.integers(-100, 100, (32,)), jnp.int8),
        "key": jax.random.key_data(jax.random.key(3)),
    }
    specs = {"w": P("a", "b"), "e": P(None, "a", "b"), "c": P(("a", "b")), "key": P()}
    one = jax.device_put(tree, jax.devices()[0])
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
    assert len(sharded["w"].sharding.device_set) == 8
    assert array_checksums(one) == array_checksums(sharded) == {k: _numpy_checksum(v) for k, v in tree.items()}
    # saved sharded, restored on one device: the checksums verify
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, sharded, {"iteration": 1})
    state, _ = ck.restore(1, one)
    ck.close()
    assert _bits(state) == _bits(tree)


@pytest.mark.parametrize("leaf", ["kernel", "bias"])  # float32, bfloat16
def test_a_flipped_bit_in_saved_array_data_is_damage(tmp_path, caplog, leaf):
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    ck.save(1, _state(1), {"iteration": 1})
    ck.save(2, _state(2), {"iteration": 2})
    ck.close()
    name, before, after = testing.flip_one_bit_in_checkpoint(
        tmp_path / "run" / "checkpoints" / "2", prefix=f"params.dense.{leaf}")
    assert np.asarray(before).tobytes() == np.asarray(_state(2)["params"]["dense"][leaf]).tobytes()
    assert (np.asarray(before) != np.asarray(after)).sum() == 1

    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    # the array still decodes, with the flipped value: orbax alone restores it silently
    silent, _, _ = ck._restore_unverified(2, _state(0))
    assert np.asarray(silent["params"]["dense"][leaf]).tobytes() == np.asarray(after).tobytes()
    with pytest.raises(errors.CheckpointError) as info:
        ck.restore(2, _state(0))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("Checkpoint 2 in ")
    assert f"damaged: array data do not match their checksums: params/dense/{leaf}. Resume from an older checkpoint" in msg
    step, state, meta, skipped = ck.restore_newest(_state(0))
    ck.close()
    assert step == 1 and meta["iteration"] == 1
    assert skipped == [(2, f"array data do not match their checksums: params/dense/{leaf}")]
    assert _bits(state) == _bits(_state(1))  # the older checkpoint: exactly what was saved
    assert "Skipping checkpoint 2" in caplog.text
    assert (tmp_path / "run" / "skipped_checkpoints" / "2").is_dir()


def test_a_checkpoint_without_checksums_restores(tmp_path):
    """Written before checksums existed: the meta has no 'checksums'; it restores unverified."""
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, _state(1), {"iteration": 1, "prompts": {"position": 3}})
    ck.close()
    path = tmp_path / "ck" / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert meta["checksums"]["format"] == CHECKSUM_FORMAT
    assert meta["checksums"]["leaves"] == array_checksums(_state(1))
    del meta["checksums"]
    path.write_text(json.dumps(meta))
    ck = Checkpointer(str(tmp_path / "ck"))
    state, meta = ck.restore(1, _state(0))
    assert meta == {"iteration": 1, "prompts": {"position": 3}} and _bits(state) == _bits(_state(1))
    step, state, meta, skipped = ck.restore_newest(_state(0), required_meta={"prompts": dict})
    ck.close()
    assert (step, skipped) == (1, []) and _bits(state) == _bits(_state(1))


def test_restore_into_another_dtype_verifies_the_saved_bits_then_casts(tmp_path):
    """orbax casts on restore; the checksums are of the saved dtype's bits, so they are checked
    before the cast (a float32 kernel restored as bfloat16 was reported as damage)."""
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, _state(1), {"iteration": 1})
    target = jax.tree_util.tree_map(lambda x: x, _state(0))
    target["params"]["dense"]["kernel"] = target["params"]["dense"]["kernel"].astype(jnp.bfloat16)
    state, _ = ck.restore(1, target)
    assert state["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state["params"]["dense"]["kernel"]),
                                  np.asarray(_state(1)["params"]["dense"]["kernel"].astype(jnp.bfloat16)))
    ck.close()
    testing.flip_one_bit_in_checkpoint(tmp_path / "ck" / "1", "params.dense.kernel")  # still caught after a cast
    ck = Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(errors.CheckpointError, match="do not match their checksums: params/dense/kernel"):
        ck.restore(1, target)
    ck.close()


def test_meta_checksums_that_miss_or_add_an_array_are_damage(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"))
    ck.save(1, _state(1), {"iteration": 1})
    ck.close()
    path = tmp_path / "ck" / "1" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    leaves = meta["checksums"]["leaves"]
    for changed, message in (({k: v for k, v in leaves.items() if k != "step"}, "no checksums for arrays step"),
                             ({**leaves, "params/dense/extra": 1}, "state does not hold: params/dense/extra")):
        path.write_text(json.dumps({**meta, "checksums": {**meta["checksums"], "leaves": changed}}))
        ck = Checkpointer(str(tmp_path / "ck"))
        with pytest.raises(errors.CheckpointError, match=message):
            ck.restore(1, _state(0))
        ck.close()


def test_a_state_with_an_empty_array_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    """orbax cannot save a zero-size array; its error used to come back as 'free disk space'."""
    ck = Checkpointer(str(tmp_path / "ck"))
    state = {**_state(1), "empty": jnp.zeros((0, 4))}
    with pytest.raises(errors.CheckpointError, match=r"arrays with no elements \(empty\); leave them out") as info:
        ck.save(1, state, {"iteration": 1})
    assert "\n" not in str(info.value) and "disk" not in str(info.value)
    ck.save(1, _state(1), {"iteration": 1})  # the directory is untouched: step 1 is still free
    assert ck.all_steps() == [1]
    ck.close()
