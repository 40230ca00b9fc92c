"""Throughput of ``smooth_prediction.py`` (the CAT-RS pretrain's smoothed prediction) on one machine, side by side.

Each variant runs the real script on the same training images (``--skip``), in turns, ``--repeats`` times,
and reports forward samples per second of the whole machine from the rows' ``time`` column (the steady
state: start-up and compilation excluded) and from the wall clock (included). Variants are command
fragments; ``torchrun:K`` as the first word shards the images over K processes.

    python benchmarks/bench_smooth_prediction.py CHECKPOINT --images 24 \\
        --variant "today=threads:2" --variant "2x1=torchrun:2 threads:1" \\
        --variant "2x1 compile=torchrun:2 threads:1 --compile"
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text):
    name, _, spec = text.partition("=")
    words = shlex.split(spec)
    procs, threads, options = 1, None, []
    for word in words:
        if word.startswith("torchrun:"):
            procs = int(word.split(":")[1])
        elif word.startswith("threads:"):
            threads = int(word.split(":")[1])
        else:
            options.append(word)
    return name, procs, threads, options


def rows_seconds(path):
    """Summed per-image seconds of a result file (its ``time`` column, H:MM:SS.ffffff)."""
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        column = header.index("time")
        total, rows = 0.0, 0
        for line in handle:
            h, m, s = line.rstrip("\n").split("\t")[column].split(":")
            total += 3600 * int(h) + 60 * int(m) + float(s)
            rows += 1
    return total, rows


def run_variant(args, procs, threads, options, folder):
    out = os.path.join(folder, "out.tsv")
    script = [os.path.join(REPO, "code", "smooth_prediction.py"), "fmnist", args.checkpoint, str(args.sigma), out,
              f"--N={args.N}", f"--skip={args.skip}", f"--max={args.skip * args.images - 1}", "--split=train",
              "--seed", "0", *options]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={procs}", "--"]
    env = dict(os.environ, TMPDIR=folder)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run([*launcher, *script], cwd=REPO, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    seconds, rows = rows_seconds(out)
    assert rows == args.images, f"{rows} rows for {args.images} images"
    samples = args.images * args.N
    # rows of K processes are computed at once: the machine's rate is K images per summed image-second
    return samples * procs / seconds, samples / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--N", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=24, help="training images per run")
    parser.add_argument("--skip", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=SPEC")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    results = {name: [] for name, *_ in variants}
    for _ in range(args.repeats):
        for name, procs, threads, options in variants:
            folder = tempfile.mkdtemp(prefix="bench_sp_")
            try:
                results[name].append(run_variant(args, procs, threads, options, folder))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu}, {os.cpu_count()} cores; {args.images} images x N = {args.N}, "
          f"{args.repeats} repeats (median)")
    print("| variant | samples/s (rows' time) | ratio | samples/s (wall clock) | ratio |")
    print("|---|---:|---:|---:|---:|")
    first = None
    for name, values in results.items():
        steady = sorted(v[0] for v in values)[len(values) // 2]
        wall = sorted(v[1] for v in values)[len(values) // 2]
        first = first or (steady, wall)
        print(f"| {name} | {steady:,.0f} | {steady / first[0]:.2f}x | {wall:,.0f} | {wall / first[1]:.2f}x |")


if __name__ == "__main__":
    main()
