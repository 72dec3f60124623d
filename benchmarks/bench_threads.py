"""Default CPU threads vs one thread for ``cellsam-stream segment``, idle and next to a busy process.

Each case runs ``cellsam-stream segment`` in a fresh process (thread settings are fixed when torch loads
OpenMP), alternating A B A B ``--repeats`` times, and reads the ``segment`` time the command prints (model
loading and imports excluded). A is the default (the library's own choice: as many threads as other
processes leave free, :mod:`cellsam_core.threads`), B is ``OMP_NUM_THREADS=1``, C is A with
``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP workers sleep at once: the library's previous default). The
neighbour is one process spinning on a core, started by this benchmark.

Cases: a 512² frame (one model input; the mask step is many small calls) and a 2048² frame (16 tiles,
enough work for the encoder to use every core).

Usage::

    python benchmarks/bench_threads.py [--repeats 3] [--sizes 512 2048]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellsam_core.synthetic import synthetic_frame

_SEGMENT = re.compile(r"segment ([0-9.]+) s")


def _frame(size: int, path: Path) -> None:
    tile = synthetic_frame((512, 512), seed=3, n_cells=60)[0]
    reps = -(-size // 512)
    tifffile.imwrite(path, np.tile(tile, (reps, reps))[:size, :size])


def _segment_seconds(image: Path, env: dict[str, str]) -> float:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "segment",
            str(image),
            "-o",
            str(image.with_suffix(".labels.tif")),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    ).stdout
    match = _SEGMENT.search(out)
    if match is None:
        raise RuntimeError(f"no timing line in: {out}")
    return float(match.group(1))


def _case(image: Path, variants: dict[str, dict[str, str]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, env in variants.items():  # interleaved, so drifts of the machine hit every variant
            times[name].append(_segment_seconds(image, env))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    args = parser.parse_args()
    variants = {
        "default": {},
        "1 thread": {"OMP_NUM_THREADS": "1"},
        "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    }
    print(f"cellsam-stream segment, bundled model, {os.cpu_count()} cores, median of {args.repeats}")
    print(f"  {'frame':<7} {'machine':<15} {'default':>9} {'1 thread':>9} {'passive':>9} {'default/1':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            image = Path(tmp) / f"frame{size}.tif"
            _frame(size, image)
            for machine in ("idle", "busy neighbour"):
                neighbour = None
                if machine == "busy neighbour":
                    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    t = _case(image, variants, args.repeats)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
                ratio = t["default"] / t["1 thread"]
                print(
                    f"  {size:<7} {machine:<15} {t['default']:8.2f}s {t['1 thread']:8.2f}s "
                    f"{t['passive']:8.2f}s {ratio:9.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
