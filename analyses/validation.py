"""The validation study of issue 4 (MATH.md §4a): many runs differing only in sampling order.

    python analyses/validation.py --out validation-out            # full size (minutes)
    python analyses/validation.py --out validation-quick --quick  # a smoke run (seconds)

Writes ``validation.json`` and ``validation.png`` into ``--out`` and prints the verdict. All the
work is :func:`trajlab.studies.validation.run_validation`; this script only parses arguments.
"""

from __future__ import annotations

import argparse

from trajlab.studies.validation import run_validation

QUICK = {"runs": 4, "steps": 40, "hidden": 16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (run stores, JSON, figure)")
    p.add_argument("--runs", type=int, default=16, help="runs per sampler (default: 16)")
    p.add_argument("--steps", type=int, default=300, help="SGD steps per run (default: 300)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate (default: 0.05)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--hidden", type=int, default=32, help="MLP width (default: 32)")
    p.add_argument("--scheduler", default="synchronous",
                   help="Dask scheduler for the analyses: synchronous (default; fastest for "
                        "these small runs), threads, processes, an address, or 'cluster' for "
                        "one LocalCluster")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test size: {QUICK['runs']} runs x {QUICK['steps']} steps, "
                        f"hidden {QUICK['hidden']} (overrides --runs/--steps/--hidden)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.steps, a.hidden = QUICK["runs"], QUICK["steps"], QUICK["hidden"]
    res = run_validation(a.out, n_runs=a.runs, steps=a.steps, lr=a.lr,
                         batch_size=a.batch_size, hidden=a.hidden,
                         scheduler=None if a.scheduler == "cluster" else a.scheduler,
                         progress=not a.no_progress)
    if a.no_progress:  # with progress on, run_validation has printed the verdict already
        print("\n".join(res["verdict"]))
    print(f"wrote {a.out}/validation.json and {a.out}/validation.png "
          f"in {res['runtime_s']['total']:.0f} s")


if __name__ == "__main__":
    main()
