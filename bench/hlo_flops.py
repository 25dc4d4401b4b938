"""Where a plan's FLOPs go: the matmul FLOPs of a compiled train step by the jax op that made them.

    XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" \\
      python -m jaxsft.train ... --dry_run=h100:8
    python -m bench.hlo_flops DUMP/module_*jit_train_step*gpu_after_optimizations.txt [--top 20]

Counts as `--dry_run` does (jaxsft.hlo_stats: dots, cuBLAS GEMMs, the flash kernels, each weighted
by its loops' trip counts), so the rows add up to the plan's "step TFLOP".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsft import hlo_stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hlo", help="an optimized HLO module's text (XLA's after_optimizations dump)")
    ap.add_argument("--top", type=int, default=30, help="rows to print")
    a = ap.parse_args(argv)
    by_op = hlo_stats.flops_by_op(Path(a.hlo).read_text())
    print(f"{sum(by_op.values()) / 1e12:10.1f} TFLOP in all, by op:")
    for name, flops in list(by_op.items())[:a.top]:
        print(f"{flops / 1e12:10.1f}  {name}")


if __name__ == "__main__":
    main()
