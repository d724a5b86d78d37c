"""The text path: trainable encoder, SigLIP parity with transformers (PyTorch), checkpoint errors.

Parity tolerance: float32 max abs difference <= 1e-5 between our `SiglipTextEncoder` and
`transformers.SiglipTextModel(...).last_hidden_state` on the same ids (measured ~2e-6 on CPU).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from conftest import tiny_config
from pewm_jax.config import default_config
from pewm_jax.models.hf_checkpoint import CheckpointMismatchError
from pewm_jax.models import text_encoder as te
from test_train_step import SMALL, run_steps

PARITY_ATOL = 1e-5
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", None}
VOCAB, LENGTH, WIDTH = 100, 12, 32
TINY_SIGLIP = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=16)


@pytest.fixture(autouse=True)
def no_eager_sharding():
    """Build modules without a mesh (Flax shards variables eagerly by default)."""
    with nnx.use_eager_sharding(False):
        yield


def _trainable(**kw) -> te.TrainableTextEncoder:
    return te.TrainableTextEncoder(VOCAB, 16, width=WIDTH, depth=2, num_heads=4,
                                   rngs=nnx.Rngs(0), **kw)


@nnx.jit
def _encode(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """model(tokens, mask), compiled once (eager dispatch of each op is slower)."""
    return model(tokens, mask)


def _ids_and_mask(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(3, LENGTH) ids and a mask with real lengths 12, 7 and 3 (zeros are padding)."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, (3, LENGTH)).astype(np.int32)
    mask = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [7], [3]])
    return np.where(mask, ids, 0), mask


# --- trainable encoder -------------------------------------------------------------------------


def test_trainable_shapes_and_dtype():
    enc = _trainable()
    ids, mask = _ids_and_mask()
    out = _encode(enc, ids, mask)
    assert enc.text_width == WIDTH
    assert out.shape == (3, LENGTH, WIDTH) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    bf16 = _encode(_trainable(dtype=jnp.bfloat16), ids, mask)
    assert bf16.dtype == jnp.float32
    with pytest.raises(ValueError, match="only 16 positions"):
        _encode(enc, jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), bool))


def test_trainable_ignores_tokens_at_padded_positions():
    enc = _trainable()
    ids, mask = _ids_and_mask()
    other = np.where(mask, ids, np.random.default_rng(1).integers(1, VOCAB, ids.shape))
    out = np.asarray(_encode(enc, ids, mask))
    out_other = np.asarray(_encode(enc, other, mask))
    np.testing.assert_allclose(out_other[mask], out[mask], atol=1e-6)
    # The check can fail: unmasked, the same change reaches the real positions.
    full = np.ones_like(mask)
    unmasked = np.asarray(_encode(enc, ids, full)) - np.asarray(_encode(enc, other, full))
    assert np.abs(unmasked[1, :7]).max() > 1e-3


def test_trainable_jit_and_grad():
    enc = _trainable()
    ids, mask = _ids_and_mask()
    ids = np.where(mask, np.minimum(ids, 98), 99)  # token 99 only ever at padded positions

    @nnx.jit
    def loss_and_grad(model, tokens, m):
        def loss(model):
            out = model(tokens, m)
            return jnp.sum(jnp.square(out) * m[..., None]) / jnp.sum(m)
        return nnx.value_and_grad(loss)(model)

    loss, grads = loss_and_grad(enc, jnp.asarray(ids), jnp.asarray(mask))
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    embed_grad = np.asarray(grads["token_embed"][...])
    assert np.abs(embed_grad[ids[0, 0]]).max() > 0  # a real token learns
    assert np.abs(embed_grad[99]).max() == 0  # a token seen only as padding gets no gradient
    assert np.abs(np.asarray(grads["blocks"][1]["mlp"]["down"]["kernel"][...])).max() > 0


# --- logical axis names -----------------------------------------------------------------------


def _assert_named(module: nnx.Module) -> None:
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim, (path, names)
        assert set(names) <= LOGICAL_NAMES, (path, names)


def test_every_parameter_names_logical_axes(siglip_dirs):
    _assert_named(_trainable())
    _assert_named(te.load_siglip_text_encoder(siglip_dirs["text"]))


def test_trainable_shards_by_config_rules_on_a_mesh():
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    ids, mask = _ids_and_mask()
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh), \
            nnx.logical_axis_rules(default_config().mesh.logical_axis_rules):
        enc = _trainable()
        out = _encode(enc, ids, mask)
    assert enc.blocks[0].mlp.up.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert enc.blocks[0].attn.query.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert enc.token_embed[...].sharding.spec == P("tensor", "fsdp")
    unsharded = _encode(_trainable(), ids, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(unsharded), atol=1e-5)


# --- SigLIP parity with transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_dirs(tmp_path_factory):
    """Tiny seeded SigLIP checkpoints: text tower, the same sharded, and a full SiglipModel."""
    root = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    text = transformers.SiglipTextModel(transformers.SiglipTextConfig(**TINY_SIGLIP)).eval()
    text.save_pretrained(root / "text")
    text.save_pretrained(root / "sharded", max_shard_size="20KB")
    full = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=TINY_SIGLIP, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            image_size=16, patch_size=8))).eval()
    full.save_pretrained(root / "full")
    return {"root": root, "text": root / "text", "sharded": root / "sharded",
            "full": root / "full", "text_ref": text, "full_ref": full.text_model}


def _reference(model, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask.astype(np.int64))}
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids.astype(np.int64)), **kwargs
                     ).last_hidden_state.numpy()


@pytest.mark.parametrize("mask_padding", [False, True])
def test_siglip_parity(siglip_dirs, mask_padding):
    enc = te.load_siglip_text_encoder(siglip_dirs["text"], mask_padding=mask_padding)
    ids, mask = _ids_and_mask()
    ours = np.asarray(_encode(enc, ids, mask))
    ref = _reference(siglip_dirs["text_ref"], ids, mask if mask_padding else None)
    assert enc.text_width == WIDTH and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= PARITY_ATOL
    # The check can fail: the other masking choice gives different numbers.
    other = _reference(siglip_dirs["text_ref"], ids, None if mask_padding else mask)
    assert np.abs(ours - other).max() > 1e-2


@pytest.mark.parametrize("which,ref", [("sharded", "text_ref"), ("full", "full_ref")])
def test_siglip_loads_sharded_and_full_model_checkpoints(siglip_dirs, which, ref):
    if which == "sharded":
        assert len(list(siglip_dirs["sharded"].glob("model-*.safetensors"))) > 1
    enc = te.load_siglip_text_encoder(siglip_dirs[which])
    ids, mask = _ids_and_mask(seed=2)
    ours = np.asarray(_encode(enc, ids, mask))
    assert np.abs(ours - _reference(siglip_dirs[ref], ids, None)).max() <= PARITY_ATOL


def test_siglip_spec_defaults_match_transformers():
    hf = transformers.SiglipTextConfig()
    for field, value in vars(te.SiglipTextSpec()).items():
        assert getattr(hf, field) == value, field


# --- bad checkpoints --------------------------------------------------------------------------


def _edited_checkpoint(siglip_dirs, name: str, edit) -> str:
    """A copy of the text checkpoint with its tensors edited by `edit(tensors)`."""
    out = siglip_dirs["root"] / name
    out.mkdir()
    shutil.copy(siglip_dirs["text"] / "config.json", out / "config.json")
    tensors = load_file(siglip_dirs["text"] / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("case,edit,message", [
    ("missing", lambda t: t.pop("encoder.layers.1.mlp.fc2.weight"),
     r"missing tensors: encoder\.layers\.1\.mlp\.fc2\.weight"),
    ("unexpected", lambda t: t.update({"encoder.layers.0.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected tensors: encoder\.layers\.0\.extra\.weight"),
    ("misshaped", lambda t: t.update({"encoder.layers.0.self_attn.q_proj.weight":
                                      np.zeros((32, 31), np.float32)}),
     r"mis-shaped tensors: encoder\.layers\.0\.self_attn\.q_proj\.weight has shape \(32, 31\), "
     r"expected \(32, 32\)"),
])
def test_bad_checkpoint_names_the_tensor(siglip_dirs, case, edit, message):
    path = _edited_checkpoint(siglip_dirs, case, edit)
    with pytest.raises(CheckpointMismatchError, match=message):
        te.load_siglip_text_encoder(path)


def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        te.load_siglip_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_text_model"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        te.load_siglip_text_encoder(tmp_path)


# --- freezing ---------------------------------------------------------------------------------


def test_the_world_model_trains_around_a_frozen_siglip_tower(siglip_dirs):
    # Freezing is the trainer's: the kind declares the tower fixed, the step leaves it as loaded.
    config = tiny_config(*SMALL, "mesh.data=1", "model.text_encoder=siglip",
                         f"model.text_encoder_path={siglip_dirs['text']}")
    _, state, layout = run_steps(config, jax.devices()[:1], steps=2)
    assert set(jax.tree.leaves(layout.labels["text_encoder"])) == {"frozen"}
    assert set(jax.tree.leaves({k: v for k, v in layout.labels.items()
                                if k != "text_encoder"})) == {"trainable"}
    loaded = nnx.to_pure_dict(nnx.state(te.load_siglip_text_encoder(siglip_dirs["text"]),
                                        nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, state.params["text_encoder"], loaded)
    # The average of a constant stays it, up to the rounding of decay * x + (1 - decay) * x.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state.ema_params["text_encoder"], loaded)


# --- make_text_encoder and the SigLIP tokenizer -----------------------------------------------


def _config(**model):
    config = default_config()
    config.model.update({"text_width": WIDTH, "text_depth": 1, "text_num_heads": 4, **model})
    return config


def test_make_text_encoder(siglip_dirs):
    trainable = te.make_text_encoder(_config(), nnx.Rngs(0), vocab_size=VOCAB)
    assert isinstance(trainable, te.TrainableTextEncoder) and trainable.text_width == WIDTH
    assert trainable.token_embed.shape == (VOCAB, WIDTH) and len(trainable.blocks) == 1
    siglip = te.make_text_encoder(
        _config(text_encoder="siglip", text_encoder_path=str(siglip_dirs["text"]),
                text_width=64), nnx.Rngs(0), vocab_size=7)
    assert isinstance(siglip, te.SiglipTextEncoder) and siglip.text_width == WIDTH

    with pytest.raises(ValueError, match="text_encoder_path"):
        te.make_text_encoder(_config(text_encoder="siglip"), nnx.Rngs(0), vocab_size=VOCAB)
    too_long = _config(text_encoder="siglip", text_encoder_path=str(siglip_dirs["text"]))
    too_long.data.max_text_tokens = 17
    with pytest.raises(ValueError, match="max_text_tokens = 17 exceeds the 16 positions"):
        te.make_text_encoder(too_long, nnx.Rngs(0), vocab_size=VOCAB)


def test_siglip_tokenizer_loads_from_the_checkpoint_dir(siglip_dirs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<unk>", "pick", "the", "red", "cube"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "ckpt"
    shutil.copytree(siglip_dirs["text"], path)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="</s>", unk_token="<unk>").save_pretrained(path)

    ids, mask = te.encode_siglip_text(te.load_siglip_tokenizer(path),
                                      ["pick the red cube", "pick the cube now"], 6)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, [[3, 4, 5, 6, 1, 1], [3, 4, 6, 2, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    out = _encode(te.load_siglip_text_encoder(path), ids, mask)
    assert out.shape == (2, 6, WIDTH)
