"""One training process for the tests that need a real process: killed mid-run, or one of
several joined by jax.distributed (from the PEWM_* environment the local launcher sets).

    python tests/train_process.py WORKDIR OUT_JSON [--kill_after_checkpoint K [--kill_at_step S]]
                                  key=value ...

The config is configs/quickstart.py with the key=value overrides.

Writes OUT_JSON (with `-{process index}` before the suffix) with the losses this process saw
and, per parameter, the sum of its addressable shards, so processes can be compared.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import pathlib
import signal
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("out")
    parser.add_argument("--kill_after_checkpoint", type=int, default=None,
                        help="SIGKILL this process once checkpoint K is committed")
    parser.add_argument("--kill_at_step", type=int, default=None,
                        help="... and step S (default K + 1) is dispatched, before S is logged")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    from pewm_jax.parallel import distributed

    distributed.initialize(distributed.spec_from(), timeout_s=120)
    import jax
    import numpy as np

    from pewm_jax.config import load_config
    from pewm_jax.recipes import kinds
    from pewm_jax.train import loop

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config(str(root / "configs" / "quickstart.py"), args.overrides,
                         jax.device_count())
    hooks = []
    if args.kill_after_checkpoint is not None:
        k = args.kill_after_checkpoint
        kill_at = k + 1 if args.kill_at_step is None else args.kill_at_step
        committed = pathlib.Path(args.workdir) / kinds.WORLD_MODEL.name / str(k)

        def kill_once_committed(step: int) -> None:
            if step >= kill_at:
                while not committed.exists():  # Orbax commits by renaming the temporary dir
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.append(kill_once_committed)
    result = loop.train(config, args.workdir, resume=True, hooks=hooks, kind=kinds.WORLD_MODEL)

    def local_sum(x):
        """Sum of this process's distinct shards (a replicated array counts once)."""
        shards = {str(s.index): s.data for s in x.addressable_shards}
        return float(sum(np.asarray(d, np.float64).sum() for d in shards.values()))

    sums = {jax.tree_util.keystr(p): local_sum(x)
            for p, x in jax.tree_util.tree_leaves_with_path(result.state.params)}
    out = pathlib.Path(args.out)
    out = out.with_name(f"{out.stem}-{jax.process_index()}{out.suffix}")
    out.write_text(json.dumps({"status": result.status, "step": result.step,
                               "losses": result.losses, "param_sums": sums}))


if __name__ == "__main__":
    main()
