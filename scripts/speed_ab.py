#!/usr/bin/env python3
"""Measure the same training runs under two source trees of vramfit, interleaved, on one GPU.

For a change that should not alter what is trained but may alter its speed (the training
loop's own overhead): each case (`vramfit` arguments) runs under every tree in turn, the
whole set repeated, so the trees meet the same host state as nearly as a shared machine
allows. One JSON line per run to RESULTS/ab.jsonl (tree, case, repeat, metrics.json).
With --profile, one more run per case under the first tree with VRAMFIT_PROFILE
(src/vramfit/step_profile.py), kept apart: profiled steps are slower.

    git archive HEAD src | tar -x -C .gpu/old          # the tree before the change
    python scripts/speed_ab.py --tree new=src --tree old=.gpu/old/src --repeats 2 \\
        --case "0.5b-8=train --preset auto --budget 8 --model M --data D" --results $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(tree: Path, args: list[str], out: Path, log: Path, extra_env: dict[str, str]) -> tuple[int, float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ PYTHONPATH={tree} vramfit {shlex.join(args)} --out {out}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "vramfit", *args, "--out", str(out)], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    m = out / "metrics.json"
    metrics = json.loads(m.read_text()) if m.is_file() else {}
    shutil.rmtree(out, ignore_errors=True)
    return rc, wall, metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a vramfit src/ tree (repeatable)")
    ap.add_argument("--case", action="append", required=True, help="NAME=vramfit arguments, without --out (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="one more run per case under the first tree, profiled")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vramfit-ab"))
    ap.add_argument("--results", type=Path, required=True)
    a = ap.parse_args()
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in a.tree)]
    cases = [(n, shlex.split(c)) for n, c in (x.split("=", 1) for x in a.case)]
    a.results.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.results / "ab.log"
    failures = 0

    def record(rec: dict) -> None:
        with (a.results / "ab.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")

    for rep in range(a.repeats):
        for case, args in cases:
            # Alternate which tree goes first, so neither always meets the host after the other.
            order = trees if rep % 2 == 0 else trees[::-1]
            for name, tree in order:
                rc, wall, m = run_one(tree, args, a.work / "run", log, {})
                failures += rc != 0
                record({"tree": name, "case": case, "repeat": rep, "exit": rc, "wall_s": round(wall, 1),
                        "command": "vramfit " + shlex.join(args), "metrics": m})  # fmt: skip
                print(f"{case:12} {name:6} rep {rep}: exit {rc}, steady {m.get('steady_tokens_per_s')} tok/s, "
                      f"predicted {m.get('predicted_tokens_per_s')}, clocks {m.get('sm_clock_mhz')}", flush=True)  # fmt: skip
    if a.profile:
        name, tree = trees[0]
        for case, args in cases:
            prof = a.results / f"profile-{case}-{name}.txt"
            rc, wall, m = run_one(tree, args, a.work / "run", log, {"VRAMFIT_PROFILE": str(prof)})
            record({"tree": name, "case": case, "repeat": "profiled", "exit": rc, "wall_s": round(wall, 1),
                    "command": f"VRAMFIT_PROFILE={prof.name} vramfit " + shlex.join(args), "metrics": m})  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
