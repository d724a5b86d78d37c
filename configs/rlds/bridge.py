"""RLDS spec: BridgeData V2 in RLDS (`bridge_dataset`, the layout Octo and OpenVLA read).

Layout (each step): `observation/image_0` .. `observation/image_3` (256x256x3 JPEG; image_0 is
the fixed over-the-shoulder camera, the others are extra views, zero-filled where an episode
has none: `episode_metadata/has_image_*`), `observation/state` (7: end-effector x, y, z in
metres, roll, pitch, yaw, gripper opening), `action` (7: end-effector delta x, y, z, delta
roll, pitch, yaw, absolute gripper command 1 open / 0 closed), `language_instruction` (step
level; '' where the episode has none: `episode_metadata/has_language`), `is_first`,
`is_last`, `is_terminal`, `reward`, `discount`, `language_embedding`. Splits: train, val.
No camera calibration and no wrist camera in this layout, so clips are segmented (gripper
changes and end-effector pauses) but have no start/goal points (sgg_valid=False).

Use: pewm ingest --spec=configs/rlds/bridge.py --source=<...>/bridge_dataset/1.0.0 --out=<dir>
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "bridge"
    c.image_key = "observation/image_0"
    c.wrist_image_key = ""  # none in this layout
    c.action_keys = ("action",)  # already [dxyz, drpy, gripper]
    c.gripper_dims = (6,)
    c.gripper_actions = "absolute"
    c.instruction_key = "language_instruction"
    c.fallback_instruction = ""  # episodes without language keep an empty text
    c.gripper_state_key = "observation/state[6]"
    c.ee_position_key = "observation/state[0:3]"
    c.start_point_key = ""  # no point annotations
    c.goal_point_key = ""
    c.camera_intrinsics = ""  # no calibration
    c.camera_extrinsics = ""
    # WidowX at 5 Hz, positions in metres: a pause is >= 3 steps (0.6 s) under 3 mm per step;
    # primitives shorter than 1 s are merged into a neighbour.
    c.segmenter = ml_collections.ConfigDict(dict(
        gripper_threshold=0.5, pause_speed=0.003, pause_steps=3, min_segment_steps=5))
    c.val_fraction = 0.05  # only used if a copy has no 'val' split
    c.split_seed = 0
    return c
