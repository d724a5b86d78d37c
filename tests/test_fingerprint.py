"""Array fingerprints (pewm_jax/train/fingerprint.py): the same on any mesh, changed by any
one-bit change, and independent of how the sums are split into pieces."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pewm_jax.train import fingerprint


def _tree() -> dict:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(300, 72)).astype(np.float32),
            "b": rng.normal(size=(48,)).astype(jnp.bfloat16),
            "t": rng.normal(size=(8, 14, 10, 12)).astype(np.float32),
            "step": np.int32(7), "mask": np.array([True, False]),
            "empty": np.zeros((0, 3), np.float32)}


def test_the_same_on_any_mesh_and_any_split(monkeypatch):
    tree = _tree()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    specs = {"w": P("a", "b"), "b": P("b"), "t": P(None, "a", None, "b"), "step": P(),
             "mask": P(), "empty": P()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
    one_device = jax.device_put(tree, jax.devices()[0])
    want = fingerprint.fingerprints(tree)
    assert fingerprint.fingerprints(sharded) == want == fingerprint.fingerprints(one_device)
    monkeypatch.setattr(fingerprint, "_CHUNK", 7)  # pieces of a few elements: same sums
    assert fingerprint.fingerprints(sharded) == want
    assert set(want) == set(tree) and all(len(v) == 16 for v in want.values())


def test_every_single_bit_change_is_seen():
    tree = _tree()
    want = fingerprint.fingerprints(tree)
    rng = np.random.default_rng(1)
    for name in ("w", "b", "t", "mask"):
        for _ in range(20):
            changed = tree[name].copy()
            flat = changed.reshape(-1).view(np.uint8)
            flat[rng.integers(flat.size)] ^= np.uint8(1 << rng.integers(1 if name == "mask"
                                                                        else 8))
            assert fingerprint.fingerprints({**tree, name: changed})[name] != want[name]
    # two arrays with the same values in another order differ too
    swapped = tree["w"][::-1].copy()
    assert fingerprint.fingerprints({**tree, "w": swapped})["w"] != want["w"]
