#!/usr/bin/env python3
"""Write the instruction dataset that ships inside vramfit (alpaca format).

Deterministic, rule-based tasks a tiny byte-level model can visibly learn in a few
dozen steps: the responses follow patterns of the instructions. Also used with
``--n``/``--min-chars`` to make long synthetic datasets for GPU runs, where every
example must fill the sequence length so the measured peak is the real peak.

    python scripts/make_embedded_dataset.py                      # the shipped file
    python scripts/make_embedded_dataset.py --n 2000 --min-chars 20000 --out /tmp/long.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden silver window candle forest rocket paper "
    "ocean mirror violin pepper castle planet button harbor lemon tiger meadow "
    "pencil thunder copper saddle lantern orbit marble cactus"
).split()


def _task(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(6)
    words = rng.sample(WORDS, rng.randint(2, 5))
    if kind == 0:
        w = words[0]
        return "Reverse the letters of the word.", w, w[::-1]
    if kind == 1:
        return "Write the words in upper case.", " ".join(words), " ".join(words).upper()
    if kind == 2:
        return "Sort the words alphabetically.", " ".join(words), " ".join(sorted(words))
    if kind == 3:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if kind == 4:
        return "Count the words.", " ".join(words), str(len(words))
    return "Repeat the first word three times.", " ".join(words), " ".join([words[0]] * 3)


def generate(n: int, seed: int, min_chars: int = 0, max_chars: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction, inp, out = _task(rng)
        # Long mode: pad the response with more worked examples so a byte-level
        # tokenizer sees at least min_chars tokens per example (or a length drawn
        # uniformly from min_chars..max_chars, for a spread like real data).
        target = rng.randint(min_chars, max_chars) if max_chars > min_chars else min_chars
        while len(instruction) + len(inp) + len(out) < target:
            i2, x2, o2 = _task(rng)
            out += f"\n{i2} {x2} -> {o2}"
        rows.append({"instruction": instruction, "input": inp, "output": out})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-chars", type=int, default=0)
    ap.add_argument("--max-chars", type=int, default=0, help="with --min-chars: lengths spread uniformly up to this")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/vramfit/embedded/instructions.jsonl")
    a = ap.parse_args()
    tmp = a.out.with_name(a.out.name + ".tmp")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as f:
        for row in generate(a.n, a.seed, a.min_chars, a.max_chars):
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, a.out)  # never leave a half-written dataset behind
    print(f"wrote {a.n} examples to {a.out}")


if __name__ == "__main__":
    main()
