#!/usr/bin/env python3
"""Build a random-weight model of a real architecture and save it like a downloaded one.

Memory and speed do not depend on the weights' values, so GPU calibration and
benchmarks run on these instead of downloads. The model gets vramfit's byte-level
tokenizer (ids < 262, so any vocabulary works).

    python scripts/make_random_model.py scripts/archs/qwen2.5-7b.json /tmp/qwen2.5-7b --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vramfit.embedded import byte_tokenizer  # noqa: E402
from vramfit.model_source import random_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", type=Path, help="a config.json (see scripts/archs/)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu", help="where to run the init: cuda is far faster for 7B+")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if (a.out / "config.json").is_file():
        print(f"{a.out} exists; keeping it")
        return
    t = time.perf_counter()
    random_weights(json.loads(a.arch.read_text()), a.out, byte_tokenizer(), a.seed, a.dtype, a.device)
    print(f"wrote {a.out} in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
