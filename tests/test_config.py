"""Tests for pewm_jax/config.py and the shipped configs under configs/."""

import json
from pathlib import Path

import ml_collections
import pytest

from pewm_jax.config import (
    ConfigError,
    default_config,
    load_config,
    resolve_mesh_shape,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# (config spec relative to configs/, devices its mesh is meant for, expected resolved mesh)
SHIPPED = [
    ("quickstart.py", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ("cpu_reference.py", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ("mid.py", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ("reference_gpu.py", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ("pewm_base.py", 64, {"data": 4, "fsdp": 16, "tensor": 1}),
    ("pewm_base.py:v5p-128", 64, {"data": 4, "fsdp": 16, "tensor": 1}),
    ("pewm_base.py:v5e-256", 256, {"data": 16, "fsdp": 16, "tensor": 1}),
    ("pewm_base.py:h100x8", 8, {"data": 1, "fsdp": 8, "tensor": 1}),
    ("pewm_large.py", 512, {"data": 8, "fsdp": 64, "tensor": 1}),
    ("metaworld.py", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ("metaworld.py:128", 1, {"data": 1, "fsdp": 1, "tensor": 1}),
]


def _spec(name: str) -> str:
    return str(CONFIGS / name)


def _with(key: str, value: object) -> ml_collections.ConfigDict:
    """The default config rebuilt from a plain dict with one value replaced, as a config read
    back from JSON or built by hand would be (ConfigDict's own assignment would coerce it)."""
    d = default_config().to_dict()
    *groups, leaf = key.split(".")
    holder = d
    for name in groups:
        holder = holder[name]
    holder[leaf] = value
    return ml_collections.ConfigDict(d)


def _raises(config: ml_collections.ConfigDict, key: str, num_devices: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        validate(config, num_devices)
    message = str(info.value)
    assert f"config.{key}" in message
    return message


def test_every_config_file_is_covered_by_the_shipped_list():
    files = {p.name for p in CONFIGS.glob("*.py")} - {"__init__.py"}
    assert files == {spec.partition(":")[0] for spec, _, _ in SHIPPED}


def test_default_config_validates():
    validate(default_config())
    validate(default_config(), num_devices=1)


@pytest.mark.parametrize("spec, num_devices, mesh", SHIPPED)
def test_shipped_config_loads_validates_and_is_locked(spec, num_devices, mesh):
    config = load_config(_spec(spec), num_devices=num_devices)
    assert resolve_mesh_shape(config, num_devices) == mesh
    with pytest.raises(AttributeError):
        config.train.stpes = 5
    with pytest.raises(AttributeError):
        config.new_group = ml_collections.ConfigDict()


def test_config_sizes():
    quick = load_config(_spec("quickstart.py"))
    assert (quick.world.image_size, quick.model.patch_size, quick.data.horizon) == (64, 8, 8)
    assert (quick.model.width, quick.model.depth, quick.train.global_batch_size) == (64, 2, 8)
    mid = load_config(_spec("mid.py"))
    assert (mid.model.width, mid.model.depth, mid.model.num_heads) == (384, 8, 6)
    assert mid.train.global_batch_size == 16
    v5p = load_config(_spec("pewm_base.py:v5p-128"), num_devices=64)
    h100 = load_config(_spec("pewm_base.py:h100x8"), num_devices=8)
    assert (v5p.world.image_size, v5p.data.horizon) == (256, 16)
    assert (v5p.model.width, v5p.model.depth) == (1024, 24)
    assert (v5p.model.dtype, v5p.model.param_dtype) == ("bfloat16", "float32")
    assert (v5p.train.global_batch_size, v5p.model.remat) == (512, "dots")
    assert (h100.train.global_batch_size, h100.model.remat) == (64, "full")
    # Every train section of a preset splits its batch over the same mesh.
    assert h100.planner.train.global_batch_size == h100.action_decoder.train.global_batch_size == 64
    large = load_config(_spec("pewm_large.py:v5p-1024"), num_devices=512)
    assert (large.model.width, large.model.num_heads, large.model.depth) == (1536, 12, 24)
    assert (large.train.global_batch_size, large.model.remat) == (2048, "dots")


def test_pewm_base_without_preset_is_v5p_128():
    default = load_config(_spec("pewm_base.py"))
    assert default.to_dict() == load_config(_spec("pewm_base.py:v5p-128")).to_dict()


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="v5p-128, v5e-256, h100x8"):
        load_config(_spec("pewm_base.py:v4-8"))


def test_config_without_presets_rejects_an_arg():
    with pytest.raises(ConfigError, match="quickstart.py takes no"):
        load_config(_spec("quickstart.py:big"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(_spec("nope.py"))


def test_overrides_change_values_and_keep_types():
    config = load_config(
        _spec("quickstart.py"),
        [
            "train.steps=50",
            "train.learning_rate=1",
            "--config.diffusion.sampler=heun",
            "run.stages=('data', 'train')",
            "data.dataset_dir=/tmp/data",
        ],
    )
    assert config.train.steps == 50 and type(config.train.steps) is int
    assert config.train.learning_rate == 1.0 and type(config.train.learning_rate) is float
    assert config.diffusion.sampler == "heun"
    assert config.run.stages == ("data", "train")
    assert config.data.dataset_dir == "/tmp/data"
    assert config.train.global_batch_size == 8  # untouched
    with pytest.raises(AttributeError):
        config.train.stpes = 5


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.stpes=5", "train.stpes", "did you mean config.train.steps?"),
        ("trian.steps=5", "trian", "did you mean config.train?"),
        ("train.steps=abc", "train.steps", "cannot parse 'abc' as an integer"),
        ("train.steps=2.5", "train.steps", "cannot parse '2.5' as an integer"),
        ("train.learning_rate=fast", "train.learning_rate", "cannot parse 'fast' as a number"),
        ("train=3", "train", "is a group of keys"),
        ("train.steps", "train.steps", "has no '='"),
        ("model.dtype=float16", "model.dtype", "'float32', 'bfloat16'"),
        ("run.stages=data,train", "run.stages", "several stages are a tuple"),
    ],
)
def test_bad_override(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(_spec("quickstart.py"), [override])
    assert key in str(info.value) and fragment in str(info.value)


def test_unknown_key_is_reported_with_a_suggestion():
    config = default_config()
    config.train.stpes = 5
    assert "did you mean config.train.steps?" in _raises(config, "train.stpes")


def test_unknown_key_without_close_match_lists_the_group():
    config = default_config()
    config.model.xyzzy = 5
    assert "patch_size" in _raises(config, "model.xyzzy")


def test_unknown_key_found_in_another_group():
    config = default_config()
    config.train.horizon = 4
    assert "did you mean config.data.horizon?" in _raises(config, "train.horizon")


def test_missing_key():
    config = default_config()
    del config.train["ema_decay"]
    _raises(config, "train.ema_decay")


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.steps", 2.5),
        ("train.steps", True),
        ("train.learning_rate", True),
        ("train.learning_rate", "1e-4"),
        ("model.dtype", 32),
        ("run.stages", "train"),
        ("train.steps", None),
        ("train", 3),
    ],
)
def test_wrong_type(key, value):
    _raises(_with(key, value), key)


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.learning_rate", 1),  # int where a float is expected
        ("run.stages", ["preview", "train"]),  # list where a tuple is expected
        ("train.grad_clip", None),  # an explicitly nullable key
    ],
)
def test_accepted_type_variants(key, value):
    validate(_with(key, value))


def test_json_round_trip_validates():
    config = load_config(_spec("pewm_base.py"), num_devices=64)
    validate(ml_collections.ConfigDict(json.loads(config.to_json())), num_devices=64)


@pytest.mark.parametrize(
    "key, value",
    [
        ("world.image_size", 8),
        ("world.image_size", 0),
        ("world.num_objects_min", 0),
        ("world.num_objects_max", 9),
        ("world.max_delta", 0.0),
        ("data.horizon", 0),
        ("data.num_train_episodes", 0),
        ("data.num_workers", -1),
        ("model.width", 0),
        ("model.depth", 0),
        ("model.patch_size", 0),
        ("model.mlp_ratio", -1.0),
        ("model.dtype", "float16"),
        ("model.param_dtype", "int8"),
        ("model.remat", "some"),
        ("diffusion.sampler", "ddpm"),
        ("diffusion.num_steps", 0),
        ("diffusion.cond_dropout", 1.0),
        ("diffusion.guidance_min_t", 1.0),
        ("diffusion.guidance_min_t", -0.1),
        ("diffusion.sgg_sigma_px", 0.0),
        ("diffusion.target", "delta"),
        ("diffusion.prediction", "noise"),
        ("diffusion.residual_scale", 0.0),
        ("train.steps", 0),
        ("train.global_batch_size", 0),
        ("train.learning_rate", 0.0),
        ("train.learning_rate", -1e-4),
        ("train.warmup_steps", -1),
        ("train.grad_clip", 0.0),
        ("train.ema_decay", 1.0),
        ("train.checkpoint_every", 0),
        ("eval.episodes_per_template", 0),
        ("mesh.data", 0),
        ("mesh.fsdp", -2),
        ("planner.grounding_weight", -0.1),
        ("run.preview_episodes", 0),
        ("run.stages", ()),
        ("run.stages", ("train", "deploy")),
        ("run.stages", ("train", "train")),
    ],
)
def test_bad_value(key, value):
    config = default_config()
    config[key.split(".")[0]][key.split(".")[1]] = value
    _raises(config, key)


def test_objects_min_above_max():
    config = default_config()
    config.world.num_objects_min, config.world.num_objects_max = 5, 3
    _raises(config, "world.num_objects_min")


def test_image_size_not_divisible_by_patch_size():
    config = default_config()
    config.world.image_size = 60
    _raises(config, "model.patch_size")


def test_horizon_not_divisible_by_tubelet():
    config = default_config()
    config.model.tubelet = 3
    _raises(config, "data.horizon")


def test_width_not_divisible_by_heads():
    config = default_config()
    config.model.num_heads = 3
    _raises(config, "model.width")
    config = default_config()
    config.model.text_num_heads = 3
    _raises(config, "model.text_width")


def test_batch_not_divisible_by_data_parallel_size():
    config = default_config()
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.train.global_batch_size = 12
    assert "4 * 2 = 8" in _raises(config, "train.global_batch_size")
    config.train.global_batch_size = 16
    validate(config)


def test_batch_check_resolves_minus_one_only_with_the_device_count():
    config = default_config()  # mesh.data = -1
    config.train.global_batch_size = 12
    validate(config)
    validate(config, num_devices=4)
    _raises(config, "train.global_batch_size", num_devices=8)


def test_batch_check_counts_grad_accumulation_microbatches():
    config = default_config()
    config.mesh.data = 8
    config.train.global_batch_size, config.train.grad_accum_steps = 32, 2
    validate(config)
    config.train.grad_accum_steps = 8
    assert "microbatches of 4" in _raises(config, "train.global_batch_size")
    config.train.grad_accum_steps = 3
    _raises(config, "train.global_batch_size")


def test_fixed_mesh_axes_must_divide_device_count():
    config = load_config(_spec("pewm_base.py:h100x8"))
    assert "divide the 6 available devices" in _raises(config, "mesh", num_devices=6)
    config = default_config()
    config.mesh.data = 2
    assert "uses 2 devices but 4 are available" in _raises(config, "mesh", num_devices=4)
    validate(config, num_devices=2)


def test_only_one_mesh_axis_may_be_minus_one():
    config = default_config()
    config.mesh.fsdp = -1
    _raises(config, "mesh.fsdp")


def test_resolve_mesh_shape_fills_the_minus_one_axis():
    config = default_config()
    config.mesh.data, config.mesh.tensor = 2, -1
    assert resolve_mesh_shape(config, 8) == {"data": 2, "fsdp": 1, "tensor": 4}


def test_logical_axis_rules_must_cover_every_logical_axis():
    config = default_config()
    rules = config.mesh.logical_axis_rules
    config.mesh.logical_axis_rules = tuple(r for r in rules if r[0] != "kv")
    assert "'kv'" in _raises(config, "mesh.logical_axis_rules")


def test_logical_axis_rules_name_only_mesh_axes():
    config = default_config()
    config.mesh.logical_axis_rules = config.mesh.logical_axis_rules + (("embed", "model"),)
    _raises(config, "mesh.logical_axis_rules[8]")
    config.mesh.logical_axis_rules = (("batch",),)
    _raises(config, "mesh.logical_axis_rules[0]")


def test_metaworld_keys_name_what_is_wrong():
    with pytest.raises(ConfigError, match="metaworld.tasks.*unknown task 'door-opn'"):
        validate(_with("metaworld.tasks", ("door-opn",)))
    with pytest.raises(ConfigError, match="metaworld.cameras.*unknown camera 'topview'"):
        validate(_with("metaworld.cameras", ("topview",)))
    with pytest.raises(ConfigError, match="metaworld.eval_conditions.*unknown condition 'oracle'"):
        validate(_with("metaworld.eval_conditions", ("pewm", "oracle")))
    with pytest.raises(ConfigError, match="metaworld.eval_seeds"):
        validate(_with("metaworld.eval_seeds", 0))
    with pytest.raises(ConfigError, match="metaworld.train_seeds.*must be positive"):
        validate(_with("metaworld.train_seeds", 0))
    with pytest.raises(ConfigError, match="data.generator"):
        validate(_with("data.generator", "meta-world"))
    with pytest.raises(ConfigError, match="takes a frame size"):
        load_config(_spec("metaworld.py:96"))


def test_path_keys_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config(_spec("quickstart.py"), [
        "data.dataset_dir=runs/../data", "data.tokenizer=~/tok.json",
        "planner.hf_config=gs://bucket/pg/config.json", "planner.tokenizer=/abs/tok.json",
        "data.mixture=(('a', 1.0), ('gs://b/c', 2.0))"])
    assert config.data.dataset_dir == str(tmp_path / "data")
    assert config.data.tokenizer == str(tmp_path / "home" / "tok.json")
    assert config.planner.hf_config == "gs://bucket/pg/config.json"  # remote: as given
    assert config.planner.tokenizer == "/abs/tok.json"
    assert config.model.text_encoder_path == ""  # empty: unset, stays empty
    assert [tuple(e) for e in config.data.mixture] == [(str(tmp_path / "a"), 1.0),
                                                       ("gs://b/c", 2.0)]
