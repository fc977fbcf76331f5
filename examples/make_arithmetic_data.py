"""Write the GRPO example's data (examples/grpo.toml): small additions with their answers.

    python examples/make_arithmetic_data.py            # rewrites examples/data/arithmetic.jsonl

arithmetic.jsonl (format = "prompt"): a system message asking for the number alone (it also
replaces SmolLM2's default system line: shorter prompts, cheaper rollouts) and a user message
asking for a + b with a, b in [1, 9]; the sum is the row's reference answer -- what the
`numeric` reward compares the completion's last number with. Every pair (a, b) once, shuffled
with a fixed seed, so the file is the same on every machine.
"""

from __future__ import annotations

import json
import os
import random

SEED = 0
LOW, HIGH = 1, 9
SYSTEM = "Reply with the number only."
QUESTION = "What is {a} + {b}?"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arithmetic.jsonl")


def rows() -> list[dict]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    random.Random(SEED).shuffle(pairs)
    return [
        {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION.format(a=a, b=b)}],
            "answer": str(a + b),
        }
        for a, b in pairs
    ]


def main() -> None:
    with open(OUT, "w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
