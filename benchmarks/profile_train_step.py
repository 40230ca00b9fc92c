"""Where the GPU time of a training step goes: kernel time per step by kind of kernel (a GPU profile).

Runs a method's real training epoch (``train_utils.train_epoch``; CAT-RS by
default, with the options of its published CIFAR-10 command) on random
CIFAR-sized batches held on the GPU, eagerly, under ``torch.profiler``, and prints per SGD step: the number of
kernels and their summed time, split into convolutions (cuDNN), batch norm,
other elementwise work, fused kernels of ``--compile`` (Triton) and the rest,
then the costliest kernels. The wall time per step is measured apart from the
profile (events around ``--steps`` steps), eager and with ``--cuda-graphs``:
wall time far above the kernels' sum means the GPU waits for launches.

    python benchmarks/profile_train_step.py --bf16
    python benchmarks/profile_train_step.py --bf16 --compile
"""
import os
import sys
import types
from collections import defaultdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))
from architectures import get_architecture  # noqa: E402
from common import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402
from fast_path import compile_model  # noqa: E402
from train_utils import TrainingContext, build_parser, train_epoch  # noqa: E402

CATRS_OPTIONS = ["--noise", "0.25", "--num-noise-vec", "4", "--eps", "256", "--num-steps", "4", "--lbd", "0.5"]
# the first kind whose keys a kernel's name holds; ``--compile``'s Triton kernels first, since their names
# list the operations they fuse (``triton_poi_fused__native_batch_norm_..._relu``)
KINDS = (("fused (Triton)", ("triton",)),
         ("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "wgrad", "dgrad", "fprop", "nchwtonhwc",
                          "nhwctonchw")),
         ("batch norm", ("batch_norm", "batchnorm", "bn_")),
         ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "fill")))


def random_epoch(module, options, arch="cifar_resnet20", batches=2, batch=32, bf16=False, cuda_graphs=False,
                 compile=False, lr=0.01):
    """``train_epoch`` of ``module.METHOD`` over ``batches`` random CIFAR-sized batches on the GPU: ``epoch()`` runs it once
    (``epoch.ctx`` is its ``TrainingContext``); channels-last goes with ``bf16``."""
    args = build_parser(module.METHOD).parse_args(["cifar10", arch, "--lr", str(lr), "--print-freq", "1000000"] +
                                                  options + (["--bf16"] if bf16 else []) +
                                                  (["--cuda-graphs"] if cuda_graphs else []))
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = get_architecture(arch, "cifar10", device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ctx = TrainingContext(args=args, model=model, optimizer=optimizer, device=device,
                          dist=types.SimpleNamespace(is_main=False, enabled=False), channels_last=bf16)
    loader = []
    for _ in range(batches):
        item = [torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)]
        if module.__name__ == "train_catrs":
            item.append(torch.distributions.Dirichlet(torch.ones(10, device=device)).sample((batch,)))
        loader.append(tuple(item))
    model.train()
    torch.cuda.synchronize()

    def epoch():
        return train_epoch(module.METHOD, ctx, loader, 0)
    epoch.ctx = ctx
    return epoch


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KINDS:
        if any(key in lowered for key in keys):
            return kind
    return "other"


def ms_per_step(epoch, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    epoch()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile(args):
    if not torch.cuda.is_available():
        raise UserError("profile_train_step.py profiles GPU kernels and needs a CUDA device")
    import train_catrs
    torch.backends.cudnn.benchmark = True
    make = dict(arch=args.arch, batches=args.batches, batch=args.batch, bf16=args.bf16, compile=args.compile)
    eager = random_epoch(train_catrs, CATRS_OPTIONS, **make)
    m = eager.ctx.args.num_noise_vec
    steps = args.batches * m              # CAT-RS takes one SGD step per mini-batch of batch / m examples
    eager()                               # cuDNN's choice of kernels, compilation
    eager_ms = min(ms_per_step(eager, steps) for _ in range(2))
    # each epoch warms up and captures anew (3 eager steps, 1 captured), so the replays' time is the
    # difference between an epoch of 32 and one of 16 batches
    graphed = {n: random_epoch(train_catrs, CATRS_OPTIONS, cuda_graphs=True, **dict(make, batches=n))
               for n in (16, 32)}
    graphed[16]()
    epoch_ms = {n: min(ms_per_step(graphed[n], 1) for _ in range(2)) for n in (16, 32)}
    graphed_ms = (epoch_ms[32] - epoch_ms[16]) / (16 * m)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        eager()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    kernels = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = event.cuda_time_total
        if device_us <= 0 or event.count == 0:
            continue
        kind = kind_of(event.key)
        totals[kind] += device_us / steps
        counts[kind] += event.count / steps
        kernels.append((device_us / steps, event.count / steps, event.key))
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; CAT-RS {' '.join(CATRS_OPTIONS)}, "
          f"{args.arch}, loader batch {args.batch} ({args.batch // m} examples x {m} noises per step), "
          f"bf16 {args.bf16}, compile {args.compile}")
    print(f"wall time per step: eager {eager_ms:.2f} ms, --cuda-graphs {graphed_ms:.2f} ms (a replay); "
          f"kernels' sum {sum(totals.values()) / 1000:.2f} ms")
    print("| kernels | per step | ms per step | share |")
    print("|---|---|---|---|")
    whole = sum(totals.values())
    for kind in sorted(totals, key=totals.get, reverse=True):
        print(f"| {kind} | {counts[kind]:.0f} | {totals[kind] / 1000:.2f} | {100 * totals[kind] / whole:.0f} % |")
    print("| costliest kernels | calls per step | ms per step |\n|---|---|---|")
    for device_us, count, name in sorted(kernels, reverse=True)[:args.top]:
        print(f"| {name[:90]} | {count:.0f} | {device_us / 1000:.2f} |")


def build_arg_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="cifar_resnet110", choices=["cifar_resnet20", "cifar_resnet110"])
    parser.add_argument("--batch", type=positive_int, default=256, help="loader batch (the published --batch)")
    parser.add_argument("--batches", type=positive_int, default=2, help="loader batches per timed epoch")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast and channels-last")
    parser.add_argument("--compile", action="store_true", help="compile the blocks (--compile)")
    parser.add_argument("--top", type=positive_int, default=15, help="how many kernels to list")
    return parser


def main(argv=None):
    run_cli(lambda: profile(build_arg_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
