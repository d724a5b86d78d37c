"""The built-in tabletop world: state, rendering, primitives, experts, tasks, gymnasium env.

Everything but the gymnasium wrapper (`env.py`) is numpy only. Importing this package registers
the environment id `pewm/Tabletop-v0` with gymnasium.
"""

import gymnasium

from pewm_jax.sim.env import TabletopEnv
from pewm_jax.sim.episodes import Episode, Segment, expert_episode
from pewm_jax.sim.primitives import Expert, Infeasible, Primitive, PrimitivePlan
from pewm_jax.sim.tasks import HELD_OUT_PAIRS, SPLITS, TEMPLATES, Task, TaskProgress
from pewm_jax.sim.world import OBJECT_NAMES, ZONES, ActionError, WorldState

ENV_ID = "pewm/Tabletop-v0"
if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="pewm_jax.sim.env:TabletopEnv")

__all__ = ["ENV_ID", "ActionError", "Episode", "Expert", "HELD_OUT_PAIRS", "Infeasible",
           "OBJECT_NAMES", "Primitive", "PrimitivePlan", "SPLITS", "Segment", "TEMPLATES",
           "TabletopEnv", "Task", "TaskProgress", "WorldState", "ZONES", "expert_episode"]
