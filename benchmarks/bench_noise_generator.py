"""Cost of one image's noise stream: ``noise_streams.noise_generator`` against a bare ``manual_seed``.

``noise_generator`` fills the CPU generator's whole mt19937 state from a
``SeedSequence`` (a bare ``manual_seed`` keeps only 32 bits of a seed); this
measures what that costs per image, next to the sampling it precedes.

    python benchmarks/bench_noise_generator.py --images 20000
"""
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

from common import ArgumentParser, positive_int, run_cli  # noqa: E402
from noise_streams import noise_generator  # noqa: E402


def per_image(make, images: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the microseconds to make one generator and draw its first value."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for idx in range(images):
            torch.randn(1, generator=make(idx))
        times.append((time.perf_counter() - start) / images * 1e6)
    return statistics.median(times)


def bare(idx: int) -> torch.Generator:
    state = np.random.SeedSequence([0, idx]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def run(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=positive_int, default=20000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.images} images, median of 5")
    print("| stream | us per image |\n|---|---|")
    print(f"| manual_seed (32 bits kept; the former noise_generator) | {per_image(bare, args.images):.1f} |")
    print(f"| noise_generator (full mt19937 state) | "
          f"{per_image(lambda idx: noise_generator(0, idx, 'cpu'), args.images):.1f} |")


if __name__ == "__main__":
    run_cli(run)
