"""The non-primitive baseline: one clip per whole task at the primitive clips' stride, the world
model's pipeline and batch contract around it, and training for the world model's FLOPs."""

import numpy as np
import pytest
from conftest import tiny_config, train_overrides

from data_loaders import tabletop
from data_loaders.clips import frame_indices
from data_loaders.whole_task_pipeline import WholeTaskPipeline, whole_task_config
from pewm_jax.config import ConfigError
from pewm_jax.models.flops import world_model_flops
from pewm_jax.recipes import kinds


def test_examples_are_whole_tasks_from_the_first_frame_at_the_clip_stride(tabletop_dataset):
    config = tiny_config(*train_overrides(tabletop_dataset))
    test = WholeTaskPipeline(config, "test", process_index=0, process_count=1, num_workers=0)
    episodes = tabletop.episode_source(tabletop_dataset, "test")
    horizon, stride = config.whole_task.horizon, config.data.frame_stride
    for p in range(len(episodes)):
        example = test.element(p)
        j = int(test.order[p][1])
        steps = episodes[j]["steps"]
        frames = np.stack([steps[t]["observation"]["image"] for t in range(len(steps))])
        idx = frame_indices(0, len(steps) - 1, horizon, stride)
        assert example["frames"].shape == (horizon, *frames.shape[1:])
        np.testing.assert_array_equal(example["context"][-1], frames[0])
        np.testing.assert_array_equal(example["frames"], frames[idx])
        assert not example["sgg_valid"] and example["text_mask"].any()
        assert test.spec.horizon == horizon


def test_training_steps_spend_the_world_models_flops():
    config = tiny_config()
    whole, primitive = (world_model_flops(c, config.train.global_batch_size).forward_backward
                        for c in (whole_task_config(config), config))
    steps = kinds.WHOLE_TASK.train(config).steps
    assert whole > primitive  # a longer clip costs more per step ...
    budget = config.train.steps * primitive  # ... so it gets fewer steps for the same budget
    assert abs(steps * whole - budget) <= whole / 2
    assert kinds.WHOLE_TASK.train(config).learning_rate == config.train.learning_rate


def test_a_horizon_the_tubelet_does_not_divide_names_the_key():
    with pytest.raises(ConfigError, match="whole_task.horizon"):
        tiny_config("model.tubelet=2", "data.horizon=8", "whole_task.horizon=15")
