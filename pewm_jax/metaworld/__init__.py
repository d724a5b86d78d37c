"""Meta-World v3 (MuJoCo) as a closed-loop benchmark: environment adapter, expert demonstrations
segmented into primitives. Needs the `metaworld` extra: `pip install -e '.[metaworld]'`.

Importing this package selects MuJoCo's headless EGL backend (`MUJOCO_GL=egl`) unless one is
set: MuJoCo reads it once, when it is first imported, so import this before mujoco.
"""

import os

for _key in ("MUJOCO_GL", "PYOPENGL_PLATFORM"):  # an empty value counts as unset
    os.environ[_key] = os.environ.get(_key) or "egl"
