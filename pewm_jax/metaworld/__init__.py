"""Meta-World v3 (MuJoCo) as a closed-loop benchmark: environment adapter, expert demonstrations
segmented into primitives. Needs the `metaworld` extra: `pip install -e '.[metaworld]'`.

Importing this package selects MuJoCo's headless EGL backend (`MUJOCO_GL=egl`) unless one is
set: MuJoCo reads it once, when it is first imported, so import this before mujoco.
"""

import os

os.environ["MUJOCO_GL"] = os.environ.get("MUJOCO_GL") or "egl"  # empty counts as unset
if os.environ["MUJOCO_GL"] == "egl":  # PyOpenGL must agree with MuJoCo's backend
    os.environ["PYOPENGL_PLATFORM"] = os.environ.get("PYOPENGL_PLATFORM") or "egl"
