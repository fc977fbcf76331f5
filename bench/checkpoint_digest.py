"""What checkpoint validation costs: writing a step's digest (state/integrity.py; in a background
thread while training goes on) and checking a step against it on resume, per GiB of checkpoint.

    python -m bench.checkpoint_digest [--mib 512]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ftc.backends.jax.state import integrity


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the fake checkpoint")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as where:
        step = Path(where) / "4"
        (step / "state").mkdir(parents=True)
        for i in range(4):  # four array files, as Orbax's OCDBT writes a few large ones
            (step / "state" / f"d{i}").write_bytes(os.urandom(args.mib * 2**20 // 4))
        for name in ("_CHECKPOINT_METADATA", "meta/metadata", "data/metadata", "state/_METADATA"):
            (step / name).parent.mkdir(exist_ok=True)
            (step / name).write_text("{}")
        began = time.perf_counter()
        integrity.write_digest(step)
        written = time.perf_counter() - began
        began = time.perf_counter()
        assert integrity.problem(step) is None
        checked = time.perf_counter() - began
    gib = args.mib / 1024
    print(
        json.dumps(
            {
                "mib": args.mib,
                "write_digest_s": round(written, 3),
                "check_s": round(checked, 3),
                "gib_per_s": round(gib / checked, 3),
                "load_average": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()
