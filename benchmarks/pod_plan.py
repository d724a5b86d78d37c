"""Pod plan: every shipped config on its target topologies, compiled ahead of time on this CPU.

    python benchmarks/pod_plan.py [--mfu 0.4] [--only pewm_base] [--kind world_model] [--json F]

For each (config, topology) of `pewm_jax.parallel.topologies.SHIPPED_PLANS` and each train step
(world model, planner) it runs `pewm-compile` in its own process (one compiler plugin per
process; needs `pip install -e '.[aot]'`) and prints, from that one compile: memory per chip
as a fraction of the chip's memory, the analytic model FLOPs per step and XLA's FLOPs per chip,
the collective ops, and the pod's projected examples/s (clips or plans) at --mfu.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from pewm_jax.parallel import topologies

COLLECTIVE_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
                    "all-to-all": "A2A", "collective-permute": "CP"}


def compile_plan(spec: str, topology: str, kinds: str, mfu: float, timeout: float
                 ) -> tuple[list[dict], str]:
    """Reports of one pewm-compile run (those it wrote) and its error line ('' on success)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pewm_jax.compile_cli", f"--config={spec}",
                 f"--topology={topology}", f"--kind={kinds}", f"--mfu={mfu}", f"--json={out}"],
                capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [], f"timed out after {timeout:.0f} s"
        reports = []
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                reports = json.load(f)
        if proc.returncode == 0:
            return reports, ""
        ours = [line for line in proc.stderr.splitlines() if line.startswith("pewm-compile:")]
        return reports, (ours or proc.stderr.strip().splitlines() or ["failed"])[-1]


def _tflop(flops: float) -> str:
    tera = flops / 1e12
    return f"{tera:,.0f}" if tera >= 1000 else f"{tera:.4g}"


def row(report: dict) -> list[str]:
    """The table cells of one report."""
    ops = " ".join(f"{COLLECTIVE_SHORT[k]}{v}" for k, v in report["collectives"].items())
    xla = report["xla_flops_per_chip"]
    return [report["config"].removeprefix("configs/"), report["topology"], report["kind"],
            str(report["chips"]), f"{report['params'] / 1e6:,.1f}M",
            f"{report['need_bytes'] / 2**30:.1f}", f"{report['memory_fraction']:.0%}",
            "yes" if report["fits"] else "NO", _tflop(report["model_flops_per_step"]),
            "n/a" if xla is None else _tflop(xla), ops or "-",
            f"{report['examples_per_second']:,.0f}", f"{report['compile_seconds']:.0f}"]


def main() -> None:
    """Compiles every shipped plan in turn and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--only", default="", help="substring of the config spec or topology")
    parser.add_argument("--kind", default="world_model,planner")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
    parser.add_argument("--json", help="also write every report to this file")
    args = parser.parse_args()
    everything = []
    header = ["config", "topology", "kind", "chips", "params", "GiB/chip", "of HBM", "fits",
              "model TFLOP/step", "XLA TFLOP/chip", "collectives", f"ex/s @{args.mfu:.0%}",
              "compile s"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for spec, topology in topologies.SHIPPED_PLANS:
        if args.only not in spec + topology:
            continue
        reports, error = compile_plan(spec, topology, args.kind, args.mfu, args.timeout)
        everything += reports
        for report in reports:
            print("| " + " | ".join(row(report)) + " |", flush=True)
        if error:
            print(f"| {spec} | {topology} | {error} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(everything, out, indent=1)


if __name__ == "__main__":
    main()
