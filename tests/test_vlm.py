"""PaliGemma in flax.nnx vs transformers (PyTorch): conversion, logits, generation, checkpoints.

Parity tolerance: float32 max abs logit difference <= 1e-4 between our `PaliGemma` and
`PaliGemmaForConditionalGeneration(...).logits` on the same image and prompt + suffix
(measured on CPU, jax 0.10.2 / torch 2.13.0, random weights with logits up to ~10:
gqa 3.6e-6, patch 3.8e-6, pg2 5.3e-6, untied 1.3e-6). Greedy generations are compared with
`generate(do_sample=False)` token for token up to the first step whose top-two logit gap is
<= 1e-3 (on these seeds every step of every example is compared).
"""

from __future__ import annotations

import copy
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

from pewm_jax.config import default_config
from pewm_jax.train.checkpoint import find_checkpoint
from pewm_jax.recipes import paligemma_checkpoints as convert
from pewm_jax.vlm import paligemma as pg
import vlm_fixtures as fx

PARITY_ATOL = 1e-4
GAP = 1e-3  # greedy tokens must agree wherever the top-two logit gap exceeds this
PROMPT, SUFFIX, NEW = 5, 3, 6
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", None}


@pytest.fixture(autouse=True)
def no_eager_sharding():
    """Build modules without a mesh (Flax shards variables eagerly by default)."""
    with nnx.use_eager_sharding(False):
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, fx.HFCheckpoint]:
    """The tiny random HF checkpoints of `fx.CONFIGS`, saved once per module."""
    root = tmp_path_factory.mktemp("paligemma")
    return {name: fx.make_checkpoint(name, root, seed=i) for i, name in enumerate(fx.CONFIGS)}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict[str, pg.PaliGemma]:
    """Our converted models, one per checkpoint."""
    with nnx.use_eager_sharding(False):
        return {name: convert.load_paligemma(c.path) for name, c in checkpoints.items()}


@nnx.jit(static_argnames="prefix_len")
def _forward(model: pg.PaliGemma, image: jax.Array, tokens: jax.Array, prefix_len: int
             ) -> jax.Array:
    """model(image, tokens, prefix_len), compiled once per shape."""
    return model(image, tokens, prefix_len)


# --- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(fx.CONFIGS))
def test_logits_match_transformers(checkpoints, models, name):
    ckpt, model = checkpoints[name], models[name]
    image, tokens = fx.inputs(ckpt, 2, PROMPT + SUFFIX)
    ours = np.asarray(_forward(model, image, tokens, PROMPT))
    ref = fx.hf_logits(ckpt, image, tokens, PROMPT)
    assert ours.shape == ref.shape == (2, fx.num_image_tokens(ckpt) + PROMPT + SUFFIX, fx.VOCAB)
    diff = np.abs(ours - ref).max()
    print(f"{name}: max abs logit difference {diff:.2e} (logits up to {np.abs(ref).max():.2f})")
    assert diff <= PARITY_ATOL
    # The check can fail: without the bidirectional prefix (HF's all-causal mask) logits differ.
    assert np.abs(ours - fx.hf_logits(ckpt, image, tokens, None)).max() > 1e-2


def test_spec_reads_both_text_configs(models):
    gqa, patch, pg2 = models["gqa"].spec, models["patch"].spec, models["pg2"].spec
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.num_image_tokens) == (4, 2, 16)
    assert (patch.num_kv_heads, patch.head_dim, patch.num_image_tokens) == (1, 12, 9)
    assert not gqa.gemma2 and gqa.sliding_window is None and gqa.query_pre_attn_scalar == 8
    assert pg2.gemma2 and pg2.layer_types == (pg.SLIDING, pg.FULL, pg.SLIDING)
    assert (pg2.sliding_window, pg2.query_pre_attn_scalar) == (6, 12)
    assert (pg2.attn_logit_softcapping, pg2.final_logit_softcapping) == (3.0, 8.0)
    untied = models["untied"]
    assert untied.text.lm_head is not None and untied.text.layers[0].attn.out.bias is not None


@pytest.mark.parametrize("name", list(fx.CONFIGS))
def test_spec_round_trips_through_its_hf_config(models, name):
    """`to_hf_config` is `from_hf_config`'s inverse for Gemma 1 and Gemma 2 specs (what a
    planner trained from scratch is exported to Hugging Face with)."""
    spec = models[name].spec
    assert pg.PaliGemmaSpec.from_hf_config(spec.to_hf_config()) == spec


def test_spec_of_a_hub_style_config(tmp_path):
    """Hub config.json files list few keys; transformers' defaults fill the rest."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "paligemma", "image_token_index": 256000, "hidden_size": 2048,
        "projection_dim": 2048, "vocab_size": 257152,
        "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                        "num_attention_heads": 8, "num_hidden_layers": 18,
                        "num_key_value_heads": 1, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14, "projection_dim": 2048}}))
    spec = pg.PaliGemmaSpec.from_hf_config(convert.read_hf_config(tmp_path))
    assert (spec.image_size, spec.num_image_tokens, spec.head_dim, spec.num_kv_heads) == \
        (224, 256, 256, 1)
    assert spec.rope_theta == 10000.0 and spec.layer_types == (pg.FULL,) * 18
    abstract = nnx.eval_shape(lambda: pg.PaliGemma(spec, rngs=nnx.Rngs(0)))
    n = sum(v.size for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == 2_923_466_480  # transformers counts the same, less SigLIP's pooling head


def _agree_where_confident(ours: np.ndarray, theirs: np.ndarray, logits: np.ndarray) -> int:
    """Asserts greedy tokens agree until the first step whose top-two gap is <= GAP; returns
    the number of steps compared. logits (B, steps, V) are ours for those steps."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    confident = (top2[..., 1] - top2[..., 0]) > GAP  # (B, steps)
    compared = 0
    for b in range(ours.shape[0]):
        for step in range(min(ours.shape[1], theirs.shape[1])):
            if not confident[b, step]:
                break
            assert ours[b, step] == theirs[b, step], (b, step)
            compared += 1
    return compared


@pytest.mark.parametrize("name", list(fx.CONFIGS))
def test_greedy_generation_matches_transformers(checkpoints, models, name):
    ckpt, model = checkpoints[name], models[name]
    image, prompt = fx.inputs(ckpt, 2, PROMPT, seed=3)
    ours = np.asarray(pg.generate(model, image, prompt, NEW))
    theirs = fx.hf_greedy(ckpt, image, prompt, NEW)
    full = np.asarray(_forward(model, image, np.concatenate([prompt, ours], 1), PROMPT))
    n = fx.num_image_tokens(ckpt) + PROMPT
    compared = _agree_where_confident(ours, theirs, full[:, n - 1:-1])
    print(f"{name}: {compared} greedy steps compared, HF made {theirs.shape[1]}")
    assert compared >= 4


# --- KV-cache decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(fx.CONFIGS))
def test_kv_cache_decoding_equals_full_sequence(checkpoints, models, name):
    ckpt, model = checkpoints[name], models[name]
    image, prompt = fx.inputs(ckpt, 2, PROMPT, seed=4)
    tokens = np.asarray(pg.generate(model, image, prompt, NEW))
    n = fx.num_image_tokens(ckpt) + PROMPT
    full = np.asarray(_forward(model, image, np.concatenate([prompt, tokens], 1), PROMPT))
    np.testing.assert_array_equal(full[:, n - 1:-1].argmax(-1), tokens)
    # prefill + the jitted decode_step, one token at a time: the same logits as the full pass.
    logits, cache = pg.prefill(model, image, prompt, n + NEW)
    for step in range(NEW):
        np.testing.assert_allclose(np.asarray(logits), full[:, n - 1 + step], atol=1e-5)
        logits, cache = pg.decode_step(model, cache, jnp.asarray(tokens[:, step]))
    assert int(cache.length) == n + NEW


def _count_up(logits: jax.Array, state: pg.StepState) -> tuple[jax.Array, jax.Array]:
    """Allows only token 10 + user state, and counts the user state up (a toy constraint)."""
    allowed = jnp.arange(logits.shape[-1]) == 10 + state.user
    return jnp.where(allowed, logits, -jnp.inf), state.user + 1


def test_logits_mask_fn_and_sampling(checkpoints, models):
    ckpt, model = checkpoints["gqa"], models["gqa"]
    image, prompt = fx.inputs(ckpt, 2, PROMPT, seed=5)
    forced = pg.generate(model, image, prompt, 4, logits_mask_fn=_count_up,
                         mask_state=jnp.int32(0))
    np.testing.assert_array_equal(forced, [[10, 11, 12, 13]] * 2)
    a = pg.generate(model, image, prompt, NEW, temperature=1.0, rng=jax.random.key(1))
    b = pg.generate(model, image, prompt, NEW, temperature=1.0, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, NEW) and int(a.min()) >= 0 and int(a.max()) < fx.VOCAB
    with pytest.raises(ValueError, match="needs an rng"):
        pg.generate(model, image, prompt, NEW, temperature=1.0)


# --- parameters ---------------------------------------------------------------------------------


def test_every_parameter_names_logical_axes(models):
    for model in models.values():
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == var.ndim, (path, names)
            assert set(names) <= LOGICAL_NAMES, (path, names)


def test_shards_by_config_rules_on_a_mesh(checkpoints, models):
    model = models["gqa"]
    image, tokens = fx.inputs(checkpoints["gqa"], 2, PROMPT)
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(default_config().mesh.logical_axis_rules):
        graphdef, state = nnx.split(model)
        sharded = nnx.merge(graphdef, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        out = _forward(sharded, image, tokens, PROMPT)
    assert sharded.text.layers[0].mlp.gate.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.text.layers[0].attn.key.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert sharded.text.embed[...].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(_forward(model, image, tokens,
                                                                    PROMPT)), atol=1e-5)


def test_bfloat16_embedding_scale_matches_transformers(checkpoints):
    """HF multiplies bf16 embeddings by sqrt(width) rounded to bf16 (5.65625 for width 32)."""
    ckpt = checkpoints["gqa"]
    model = convert.load_paligemma(ckpt.path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = np.arange(3, 40, dtype=np.int32).reshape(1, -1)
    embed = copy.deepcopy(ckpt.model.model.language_model.embed_tokens).to(torch.bfloat16)
    with torch.no_grad():
        ref = embed(torch.tensor(ids, dtype=torch.long)).float().numpy()
    ours = np.asarray(model.text.embed_tokens(jnp.asarray(ids)).astype(jnp.float32))
    np.testing.assert_array_equal(ours, ref)
    image, tokens = fx.inputs(ckpt, 1, PROMPT)
    logits = _forward(model, image, tokens, PROMPT)
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


# --- bad checkpoints ----------------------------------------------------------------------------


def _edited_checkpoint(ckpt: fx.HFCheckpoint, out, edit):
    out.mkdir()
    shutil.copy(ckpt.path / "config.json", out / "config.json")
    tensors = load_file(ckpt.path / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


_Q1 = "language_model.model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(_Q1), rf"missing tensors: {_Q1}"),
    (lambda t: t.update({"multi_modal_projector.extra": np.zeros(3, np.float32)}),
     r"unexpected tensors: multi_modal_projector\.extra"),
    (lambda t: t.update({"vision_tower.embeddings.patch_embedding.weight":
                         np.zeros((32, 3, 4, 5), np.float32)}),
     r"mis-shaped tensors: vision_tower\.embeddings\.patch_embedding\.weight has shape "
     r"\(32, 3, 4, 5\), expected \(32, 3, 4, 4\)"),
], ids=["missing", "unexpected", "misshaped"])
def test_bad_checkpoint_names_the_tensor(checkpoints, tmp_path, edit, message):
    path = _edited_checkpoint(checkpoints["gqa"], tmp_path / "bad", edit)
    with pytest.raises(convert.CheckpointMismatchError, match=message):
        convert.load_paligemma(path)


def test_missing_checkpoint_files(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_paligemma(tmp_path)
    shutil.copy(checkpoints["gqa"].path / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_paligemma(tmp_path)


def _assert_same_params(a: nnx.Module, b: nnx.Module) -> None:
    pa = dict(nnx.to_flat_state(nnx.state(a, nnx.Param)))
    pb = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(np.asarray(pa[path][...]), np.asarray(pb[path][...]),
                                      err_msg=str(path))


def test_loads_sharded_checkpoints(checkpoints, models, tmp_path):
    checkpoints["pg2"].model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    _assert_same_params(convert.load_paligemma(tmp_path / "sharded"), models["pg2"])


@pytest.mark.parametrize("layout", [
    {"vision_tower.": "vision_tower.vision_model."},  # the Hub's PaliGemma checkpoints
    {"language_model.model.": "model.language_model.",  # the module layout of 5.x
     "vision_tower.": "model.vision_tower.vision_model.",
     "multi_modal_projector.": "model.multi_modal_projector."},
], ids=["hub", "module"])
def test_loads_other_name_layouts(checkpoints, models, tmp_path, layout):
    ckpt = checkpoints["pg2"]
    shutil.copy(ckpt.path / "config.json", tmp_path / "config.json")
    tensors = {}
    for name, value in load_file(ckpt.path / "model.safetensors").items():
        old = next((p for p in layout if name.startswith(p)), "")
        tensors[layout.get(old, "") + name[len(old):]] = value
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _assert_same_params(convert.load_paligemma(tmp_path), models["pg2"])


# --- Orbax checkpoint and export ------------------------------------------------------------------


def test_orbax_round_trip(checkpoints, models, tmp_path):
    out = convert.convert_checkpoint(checkpoints["pg2"].path, tmp_path / "planner")
    runs, step = find_checkpoint(out, model="planner")
    assert step == 0 and runs.read_json(0, "config")["text_config"]["model_type"] == "gemma2"
    _assert_same_params(convert.restore_paligemma(out), models["pg2"])


def test_export_hf_round_trip(checkpoints, models, tmp_path):
    ckpt, model = checkpoints["patch"], models["patch"]
    out = convert.export_hf(model, json.loads((ckpt.path / "config.json").read_text()),
                            tmp_path / "export")
    exported = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager").eval()
    ref = ckpt.model.state_dict()
    for key, value in exported.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=0, atol=0, msg=key)
    _assert_same_params(convert.load_paligemma(out), model)


def test_export_hf_of_a_checkpoint_with_a_pooling_head_loads_with_no_missing_keys(
        checkpoints, models, tmp_path):
    # The "gqa" checkpoint's SigLIP has its pooling head (vision_use_head: true); PaliGemma
    # never uses it and we do not export it, so the exported config must not announce it.
    ckpt, model = checkpoints["gqa"], models["gqa"]
    config = json.loads((ckpt.path / "config.json").read_text())
    assert config["vision_config"].get("vision_use_head", True)
    out = convert.export_hf(model, config, tmp_path / "export")
    exported, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items() if v} == {}
    assert not any(".head." in key for key in exported.state_dict())
