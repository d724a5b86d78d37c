"""RLDS spec: RT-1 robot data as released in Open X-Embodiment (`fractal20220817_data`).

Layout (each step): `observation/image` (256x320x3; centre-cropped to 256x256 here),
`observation/natural_language_instruction` (string; the instruction lives in the observation),
`observation/natural_language_embedding`, `observation/base_pose_tool_reached` (7:
end-effector position x, y, z + quaternion, base-relative, metres), `observation/gripper_closed`
(1), `observation/gripper_closedness_commanded`, `observation/height_to_bottom`, ...;
`action/world_vector` (3), `action/rotation_delta` (3), `action/gripper_closedness_action` (1,
relative: +1 close, -1 open, 0 keep), `action/terminate_episode` (3), `action/base_displacement_*`
(not used here); `is_first`, `is_last`, `is_terminal`,
`reward`. Split: train only, so a deterministic 5% of the episodes is held out as validation.
No camera calibration: clips are segmented, without start/goal points (sgg_valid=False).

Use: pewm ingest --spec=configs/rlds/fractal.py
         --source=<...>/fractal20220817_data/0.1.0 --out=<dir>
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "fractal"
    c.image_key = "observation/image"
    c.wrist_image_key = ""  # none
    # The 7-D action of RT-1 policies (and Octo's / OpenVLA's RT-1 transform), in this order.
    c.action_keys = ("action/world_vector", "action/rotation_delta",
                     "action/gripper_closedness_action")
    c.gripper_dims = (6,)
    c.gripper_actions = "relative"  # converted to absolute: 1 open, 0 closed
    c.instruction_key = "observation/natural_language_instruction"
    c.fallback_instruction = ""
    c.gripper_state_key = "observation/gripper_closed"  # 1 closed, 0 open
    c.ee_position_key = "observation/base_pose_tool_reached[0:3]"
    c.start_point_key = ""
    c.goal_point_key = ""
    c.camera_intrinsics = ""
    c.camera_extrinsics = ""
    # 3 Hz, metres: a pause is >= 2 steps (0.7 s) under 5 mm per step; primitives shorter than
    # 3 steps (1 s) are merged into a neighbour.
    c.segmenter = ml_collections.ConfigDict(dict(
        gripper_threshold=0.5, pause_speed=0.005, pause_steps=2, min_segment_steps=3))
    c.val_fraction = 0.05
    c.split_seed = 0
    return c
