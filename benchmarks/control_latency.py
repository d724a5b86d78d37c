"""Closed-loop control latency at quickstart size on this machine.

    python benchmarks/control_latency.py [--workdir runs/quickstart] [--config configs/X.py]
                                         [--batch 1] [--steps 10]

With `--workdir`, the run's trained models, sampling as `--config` says (its sampler, steps and
guidance: what `pewm eval` with that config samples with; default: as the model was trained);
without, quickstart-size models with random weights (latency does not depend on the weights).
One control step for B environments is: plan (the planner VLM, constrained greedy decoding) +
generate (the world model samples one primitive clip with the config's sampler steps) + decode
(the action decoder reads its per-step actions) + act (the clip's H x frame_stride per-step
actions, played as they are). Decoding is timed both ways the
controller can do it: once per clip from its own frames (`decode`, `eval.track=False`), and
tracked (`track`, the default): the clip is encoded once with the observation it was imagined
from (`PrimitivePolicy.encode_clips`), then each of the H frame intervals is decoded from the
live observation (`PrimitivePolicy.decode_interval`: one frame encoded, the clip read). Prints,
from `--steps` timed steps after one warm-up:
  * the median seconds of each part and of a primitive step (plan + generate + tracked decode),
    and that step against the issue's aim of 0.5 s (ratio < 1 meets it);
  * control steps per second (primitives per second across the B environments);
  * the generation cost of one primitive clip (H frames) against one clip covering a whole task
    at the same frame stride (config.whole_task.horizon frames, what the whole-task baseline
    generates), both timed here, and their ratio (the same architecture at both horizons,
    random weights: cost does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from data_loaders.clips import ActionStats
from pewm_jax.text.tokenizer import build_tokenizer
from data_loaders.whole_task_pipeline import whole_task_config
from pewm_jax.config import load_config
from pewm_jax.control.policy import PrimitiveCommand, PrimitivePolicy
from pewm_jax.diffusion.samplers import sample_from_config
from pewm_jax.models.action_decoder import build_action_decoder
from pewm_jax.sim import TabletopEnv, expert_episode
from pewm_jax.sim.primitives import all_primitives
from pewm_jax.sim.tasks import TEMPLATE_NAMES, TEMPLATES
from pewm_jax.recipes.kinds import WORLD_MODEL
from pewm_jax.vlm.finetune import build_planner, make_planner

AIM_SECONDS = 0.5


def random_models(batch: int):
    """(policy, planner, config) at quickstart size with random weights."""
    config = load_config("configs/quickstart.py")
    texts = [p.text(k) for p in all_primitives() for k in range(p.num_paraphrases())]
    texts += [t.words for t in TEMPLATES] + ["plan"]
    tokenizer = build_tokenizer(texts)
    vocab = tokenizer.get_vocab_size()
    with nnx.use_eager_sharding(False):
        world = WORLD_MODEL.build(config, vocab, nnx.Rngs(0))
        decoder = build_action_decoder(config, 3, [2], vocab, nnx.Rngs(1))
        planner = make_planner(build_planner(config, vocab, nnx.Rngs(2)), tokenizer, config)
    stats = ActionStats.compute(np.random.default_rng(0).normal(0, 0.05, (256, 3)), [2])
    return PrimitivePolicy(world, config, tokenizer, decoder, stats, batch_size=batch), planner, config


def trained_models(workdir: str, batch: int, config_path: str = ""):
    """(policy, planner, config) restored from a run directory; the world model samples as
    `config_path`'s config says, if given (SAMPLING_KEYS)."""
    from pewm_jax.recipes.restore import restore, with_sampling

    world, decoder = restore(workdir, "world_model"), restore(workdir, "action_decoder")
    if config_path:
        world = with_sampling(world, load_config(config_path).diffusion)
    planner = restore(workdir, "planner")
    policy = PrimitivePolicy(world.model, world.config, decoder.tokenizer, decoder.model,
                             decoder.stats[0], batch_size=batch)
    return policy, make_planner(planner.model, planner.tokenizer, planner.config), world.config


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="", help="a run directory (default: random weights)")
    parser.add_argument("--config", default="", help="with --workdir: sample as this config does")
    parser.add_argument("--batch", type=int, default=1, help="environments per control step")
    parser.add_argument("--steps", type=int, default=10, help="timed control steps")
    args = parser.parse_args()
    policy, planner, config = (trained_models(args.workdir, args.batch, args.config) if args.workdir
                               else random_models(args.batch))
    w = config.world
    envs = [TabletopEnv(w.image_size, (w.num_objects_min, w.num_objects_max), w.max_delta,
                        w.primitive_max_steps) for _ in range(args.batch)]
    stride = config.data.frame_stride
    parts = {"plan": [], "generate": [], "decode": [], "track": [], "act": []}
    h = policy.horizon
    for step in range(args.steps + 1):
        obs = [env.reset(seed=step * args.batch + i)[0]["image"] for i, env in enumerate(envs)]
        images = np.stack(obs)
        plans, plan_s = _timed(lambda: planner.plan(images, [e.task.text for e in envs]))
        scale = w.image_size / planner.image_size
        commands = [PrimitiveCommand(p.steps[0].text, tuple(np.multiply(p.steps[0].start_xy, scale)),
                                     tuple(np.multiply(p.steps[0].goal_xy, scale))) for p in plans]
        out = policy.step(images, commands, step_index=step)
        start = time.perf_counter()
        codes = policy.encode_clips(images, out.clips)  # (B, H + 1, E)
        track_s, act_s = time.perf_counter() - start, 0.0
        for j in range(h):  # tracked: interval j decoded after the live observation
            live = np.stack([env.render() for env in envs])
            start = time.perf_counter()
            chunk = policy.decode_interval(  # (B, s, A)
                codes, live, j, np.array([c.start_xy for c in commands], np.float32),
                np.array([c.goal_xy for c in commands], np.float32),
                np.ones((len(commands),), bool), [c.text for c in commands])
            track_s += time.perf_counter() - start
            start = time.perf_counter()
            for env, actions in zip(envs, chunk):  # per-step actions, as they are
                for action in actions:
                    env.step(action)
            act_s += time.perf_counter() - start
        if step:  # the first step compiles
            for name, s in zip(parts, (plan_s, out.generate_s, out.decode_s, track_s, act_s)):
                parts[name].append(s)
    median = {k: statistics.median(v) for k, v in parts.items()}
    primitive = median["plan"] + median["generate"] + median["track"]
    print(f"device: {jax.devices()[0].device_kind}; batch {args.batch}; "
          f"{'trained ' + args.workdir if args.workdir else 'random weights'} (quickstart size)")
    for name, s in median.items():
        print(f"  {name:<9} {s * 1000:9.1f} ms")
    print(f"primitive step (plan + generate + tracked decode): {primitive:.3f} s = "
          f"{primitive / AIM_SECONDS:.2f} x the {AIM_SECONDS} s aim")
    print(f"control steps/s: {args.batch / (primitive + median['act']):.2f} primitives/s "
          f"({args.batch} env(s), acting included)")

    lengths = [len(expert_episode(envs[0], 10_000 + k, template=name).actions)
               for k, name in enumerate(TEMPLATE_NAMES)]
    whole = config.whole_task.horizon  # the whole-task baseline's clip length
    images = np.stack([envs[0].reset(seed=0)[0]["image"]] * args.batch)
    cond = {"context": images[:, None], "text_tokens": np.zeros((args.batch, config.data.max_text_tokens), np.int32),
            "text_mask": np.ones((args.batch, config.data.max_text_tokens), bool),
            "start_xy": np.zeros((args.batch, 2), np.float32),
            "goal_xy": np.zeros((args.batch, 2), np.float32), "sgg_valid": np.ones((args.batch,), bool)}
    cost = {}
    for horizon in (config.data.horizon, whole):
        sized = whole_task_config(config)  # the same model for `horizon` frames (random weights)
        sized.data.horizon = horizon
        with nnx.use_eager_sharding(False):
            model = WORLD_MODEL.build(sized, policy.tokenizer.get_vocab_size(), nnx.Rngs(3))

        def run(m=model, c=sized):
            return jax.block_until_ready(sample_from_config(m, cond, jax.random.key(0), c))
        run()
        cost[horizon] = statistics.median(_timed(run)[1] for _ in range(5))
    print(f"clip generation: primitive clip ({config.data.horizon} frames) "
          f"{cost[config.data.horizon] * 1000:.1f} ms; whole-task clip ({whole} frames = "
          f"{whole * stride} steps; the expert tasks here take {np.mean(lengths):.0f} steps on "
          f"average, {max(lengths)} at most) {cost[whole] * 1000:.1f} ms; ratio "
          f"{cost[whole] / cost[config.data.horizon]:.2f}")

if __name__ == "__main__":
    main()
