"""The planner's input pipeline: generated episodes -> (first frame, task) -> plan batches.

One example per stored expert episode (`tabletop.episode_source`: the built-in world's or
Meta-World's):

    image        the first observation, resized (bicubic) to the planner's input size
    tokens       <bos> plan_prompt(task) <pad>... | plan <eos> | <pad>...   (`plan.prompt_ids`
                 padded to config.planner.prompt_tokens, `plan.target_ids`); the plan's steps
                 are the episode's primitives in their canonical wording (`episode_plan`: the
                 built-in world's words may be a paraphrase) with start/goal points as
                 location tokens of the input image
    target_mask  True on the plan tokens: the loss is the plan's likelihood given the prompt
    target_bins  the bin of each location token of the plan (-1 elsewhere), for the soft
                 location targets of `finetune.plan_loss`
    ground_bins  the same tokens' bins at the image point each is defined by (`goal_anchors`:
                 the object behind which an approach ends, else the point itself; with
                 config.planner.ground_anchors False, the point itself), where
                 `finetune.grounding_loss` has the planner look while it writes the point
    prefix_len   prompt_tokens: the prefix attended both ways with the image (prefix-LM)

The order follows the data-order contract exactly as the clip pipeline does (`OrderedPipeline`:
a pure function of seed and global step, checkpointable Grain iterator).

Training examples (train split only; random draws seeded from (seed, element), like the clips'
crops):
- a share `config.planner.mid_task_fraction` starts at a random later primitive boundary of
  its episode (that frame; the primitives left), which is what the closed-loop controller
  replans from; the rest start at the first frame;
- each is moved by a random whole-pixel translation of up to `config.planner.shift_px`, the
  plan's points with it, kept inside the image: a small planner trained from scratch otherwise
  recalls training scenes instead of finding things in the image.
Other splits are neither: the first frame, unmoved.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tokenizers

from data_loaders import clip_dataset, tabletop, transforms
from pewm_jax.text import tokenizer as tokenizer_lib
from data_loaders.batch_spec import PlanBatchSpec
from data_loaders.clip_dataset import DatasetError
from data_loaders.pipeline import (ELEMENT_KEY, SKIPPED_KEY, ClipBatchIterator, GlobalOrder,
                                   OrderedPipeline, augment_rng, mixture_entries)
from pewm_jax.text.tokenizer import LOCATION_TOKENS, NUM_LOCATION_BINS, PAD, UNK
from pewm_jax.sim.primitives import primitive_from_text
from pewm_jax.text.plan import Plan, PlanStep, prompt_ids, target_ids


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
    """What the planner sees and should say at one primitive boundary of a stored episode."""

    image: np.ndarray  # (N, N, 3) uint8: the observation there, at its stored size
    task: str  # the task's words
    plan: Plan  # the primitives left (canonical wording), points in pixels of the stored frame
    goal_anchors: tuple[tuple[float, float], ...] = ()  # per step, pixels: where its goal is
    # defined in the image (`Primitive.goal_anchor`); () where the data names none (the goals)

    def anchors(self) -> np.ndarray:
        """(steps, 2) pixels: `goal_anchors`, or the goals themselves where there are none."""
        if self.goal_anchors:
            return np.asarray(self.goal_anchors, np.float64)
        return np.array([s.goal_xy for s in self.plan.steps], np.float64).reshape(-1, 2)


def episode_plan(record: dict, segment: int = 0) -> EpisodePlan:
    """The frame where primitive `segment` of a stored RLDS episode (tabletop layout) begins,
    the task, and the expert's primitives from there on: segment 0 is the whole task from the
    first frame; a later one is what a closed-loop controller replans from mid-task. The
    built-in world's paraphrases become their primitive's canonical words; Meta-World's words
    come from one table (pewm_jax.metaworld.experts.TASKS) and are kept as stored."""
    steps = record["steps"]
    starts = tabletop.segment_starts(record)
    if not 0 <= segment < len(starts):
        raise IndexError(f"segment {segment} of an episode with {len(starts)} primitives")
    first = steps[int(starts[segment])]
    image = np.asarray(first["observation"]["image"])
    builtin = "template" in record["episode_metadata"]
    plan_steps, anchors = [], []
    for start in starts[segment:]:
        step = steps[int(start)]
        words = tabletop.decode_text(step["primitive_text"])
        goal = tuple(step["primitive_goal_xy"])
        if builtin:  # the built-in world: paraphrases, and goals defined by an object
            try:
                primitive = primitive_from_text(words)
            except ValueError as e:
                raise DatasetError(f"episode {record['episode_metadata']['seed']}: {e}") from None
            words = primitive.text()  # -> the canonical wording
            size = image.shape[0]  # pixels = workspace units x frame size (`sim.world`)
            anchors.append(tuple(primitive.goal_anchor(np.asarray(goal) / size) * size))
        plan_steps.append(PlanStep(words, tuple(step["primitive_start_xy"]), goal))
    return EpisodePlan(image, tabletop.decode_text(steps[0]["language_instruction"]),
                       Plan(tuple(plan_steps)), tuple(anchors))


def scale_plan(plan: Plan, factor: float, offset: tuple[float, float] = (0.0, 0.0)) -> Plan:
    """`plan` with every point multiplied by `factor` (pixels of another image size), then moved
    by `offset` (pixels of that size)."""
    move = lambda xy: np.asarray(xy) * factor + np.asarray(offset)  # noqa: E731
    return Plan(tuple(PlanStep(s.text, move(s.start_xy), move(s.goal_xy)) for s in plan.steps))


def plan_points(plan: Plan) -> np.ndarray:
    """(2 * steps, 2): every start and goal point of `plan`."""
    return np.array([xy for s in plan.steps for xy in (s.start_xy, s.goal_xy)], np.float64)


def anchored_plan(example: EpisodePlan) -> Plan:
    """`example.plan` with each goal moved to its anchor: written out as tokens, its location
    bins are where the planner should look while writing each of the plan's points."""
    return Plan(tuple(PlanStep(s.text, s.start_xy, tuple(a))
                      for s, a in zip(example.plan.steps, example.anchors(), strict=True)))


def planner_tokenizer_path(config: ml_collections.ConfigDict) -> str:
    """config.planner.tokenizer (a converted model's own), else the dataset's tokenizer."""
    if config.planner.tokenizer:
        return config.planner.tokenizer
    return os.path.join(mixture_entries(config)[0][0], clip_dataset.TOKENIZER_FILE)


def location_base(tok: tokenizers.Tokenizer, where: str) -> int:
    """The id of <loc0000>, checked: the 1024 location tokens must have consecutive ids (as in
    the project tokenizer and PaliGemma's), which the loss's soft location targets rely on."""
    ids = [tok.token_to_id(t) for t in LOCATION_TOKENS]
    if None in ids or ids != list(range(ids[0], ids[0] + NUM_LOCATION_BINS)):
        raise DatasetError(f"the tokenizer {where} lacks the location tokens <loc0000>.."
                           "<loc1023> with consecutive ids that plans are written in. Fix: use "
                           "the dataset's tokenizer or the converted model's own.")
    return ids[0]


class _PlanTransform:
    """(global element p, (0, episode index)) -> one planner example (PlanBatchSpec row)."""

    def __init__(self, dataset_dir: str, split: str, tokenizer_path: str, image_size: int,
                 prompt_tokens: int, max_tokens: int, seed: int, augment: bool, shift_px: int,
                 mid_task_fraction: float, ground_anchors: bool):
        self.dataset_dir, self.split, self.tokenizer_path = dataset_dir, split, tokenizer_path
        self.image_size, self.prompt_tokens, self.max_tokens = (image_size, prompt_tokens,
                                                                max_tokens)
        self.seed, self.augment, self.shift_px = seed, augment, shift_px
        self.mid_task_fraction, self.ground_anchors = mid_task_fraction, ground_anchors
        self._source = self._tokenizer = self._location_base = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None, "_tokenizer": None, "_location_base": None}

    def tokenizer(self) -> tokenizers.Tokenizer:
        """The tokenizer, loaded once per process, and with it the id of <loc0000>."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_path)
            self._location_base = location_base(self._tokenizer, self.tokenizer_path)
        return self._tokenizer

    def __call__(self, p: int, record: tuple[int, int]) -> dict[str, np.ndarray]:
        if self._source is None:
            self._source = tabletop.episode_source(self.dataset_dir, self.split)
        episode = self._source[record[1]]
        rng = augment_rng(self.seed, p)
        u_mid, u_segment = rng.uniform(size=2)  # drawn always: the stream ignores the data
        segment = 0
        if self.augment and u_mid < self.mid_task_fraction:
            later = len(tabletop.segment_starts(episode)) - 1  # boundaries after the first
            segment = 1 + int(u_segment * later) if later else 0
        example = episode_plan(episode, segment)
        tok = self.tokenizer()
        scale = self.image_size / example.image.shape[0]
        try:
            prompt = prompt_ids(tok, example.task, self.prompt_tokens)
        except ValueError as e:
            raise DatasetError(f"{self.split} episode {record[1]}: {e}") from None
        dx, dy = 0, 0
        if self.augment and self.shift_px:
            points = plan_points(example.plan)  # and the anchors, kept inside the image too
            if self.ground_anchors:
                points = np.concatenate([points, example.anchors()])
            dx, dy = transforms.random_shift(rng, self.image_size, self.shift_px, points * scale)
        plan = target_ids(tok, scale_plan(example.plan, scale, (dx, dy)), self.image_size)
        if tok.token_to_id(UNK) in plan:
            unknown = [w for w in " ".join(s.text for s in example.plan.steps).split()
                       if tok.token_to_id(w) is None]
            raise DatasetError(
                f"the tokenizer {self.tokenizer_path} lacks the plan words {sorted(set(unknown))} "
                f"of {self.split} episode {record[1]}, so the planner could never write them. "
                "Fix: regenerate the dataset (its tokenizer holds every primitive's words), or "
                "give config.planner.tokenizer one that does.")
        ids = prompt + plan
        if len(ids) > self.max_tokens:
            raise DatasetError(
                f"the planner example of {self.split} episode {record[1]} has {len(ids)} tokens "
                f"(prompt {len(prompt)}, plan {len(plan)}), more than config.planner.max_tokens "
                f"= {self.max_tokens}. Fix: raise --config.planner.max_tokens to {len(ids)} or "
                "more.")
        tokens = np.full(self.max_tokens, tok.token_to_id(PAD), np.int32)
        tokens[:len(ids)] = ids
        mask = np.zeros(self.max_tokens, bool)
        mask[len(prompt):len(ids)] = True
        bins = np.full(self.max_tokens, -1, np.int32)
        plan_bins = np.asarray(plan) - self._location_base
        is_loc = (plan_bins >= 0) & (plan_bins < NUM_LOCATION_BINS)
        bins[len(prompt):len(ids)] = np.where(is_loc, plan_bins, -1)
        ground = bins  # each point grounded on itself, or (the same token layout) on anchors
        if self.ground_anchors:
            ground = np.full(self.max_tokens, -1, np.int32)
            anchored = target_ids(tok, scale_plan(anchored_plan(example), scale, (dx, dy)),
                                  self.image_size)
            ground[len(prompt):len(ids)] = np.where(
                is_loc, np.asarray(anchored) - self._location_base, -1)
        image = transforms.shift_image(
            transforms.resize_bicubic(example.image[None], self.image_size)[0], dx, dy)
        return {"image": image, "tokens": tokens, "target_mask": mask, "target_bins": bins,
                "ground_bins": ground, "prefix_len": np.asarray(len(prompt), np.int32),
                SKIPPED_KEY: np.asarray(0, np.int32), ELEMENT_KEY: np.asarray(p, np.int64)}


class PlanPipeline(OrderedPipeline):
    """The planner's input pipeline of one split for this process (module docstring).

    `image_size` is the planner model's input size; process index and count default to this
    JAX process's.
    """

    def __init__(self, config: ml_collections.ConfigDict, image_size: int, split: str = "train",
                 *, process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None):
        super().__init__(config, config.planner.train, split, process_index, process_count,
                         num_workers)
        dataset_dir, size = tabletop.single_episode_dataset(mixture_entries(config), split,
                                                            "the planner")
        self.datasets = [["pewm_tabletop_episodes", size, 1.0]]
        self.spec = PlanBatchSpec.from_config(config, image_size)
        self.order = GlobalOrder([size], [1.0], self.seed)
        tokenizer_path = planner_tokenizer_path(config)
        location_base(tokenizer_lib.load_tokenizer(tokenizer_path), tokenizer_path)  # fail here
        self.transform = _PlanTransform(dataset_dir, split, tokenizer_path, image_size,
                                        config.planner.prompt_tokens, config.planner.max_tokens,
                                        self.seed, split == "train", config.planner.shift_px,
                                        config.planner.mid_task_fraction,
                                        config.planner.ground_anchors)


def make_plan_iterator(config: ml_collections.ConfigDict, image_size: int,
                       split: str = "train", *, start_step: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       num_workers: int | None = None) -> ClipBatchIterator:
    """This process's planner batch iterator for `split` from `start_step`."""
    return PlanPipeline(config, image_size, split, process_index=process_index,
                        process_count=process_count, num_workers=num_workers
                        ).iterator(start_step)
