"""Forward-pass cost per sample of a base classifier by memory format and batch size.

What ``core.Smooth``'s CPU defaults rest on: the model's weights stored
channels-last (``channels_last=True``) and forward passes of at most 128
samples per thread (``forward_batch``). Variants: the default contiguous
model, the channels-last model, oneDNN tensors (``torch.utils.mkldnn``) and, with ``--bf16`` and
``--compile``, bfloat16 autocast and ``torch.compile`` of the channels-last
model. The
variants take turns; the table gives the median microseconds per sample.

    python benchmarks/bench_forward.py --model lenet --batches 128,256,512,1000 --threads 2
"""
import copy
import datetime
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

from architectures import get_architecture  # noqa: E402
from common import ArgumentParser, UserError, positive_int, run_cli  # noqa: E402
from datasets import get_input_shape  # noqa: E402

MODELS = {"lenet": "fmnist", "cifar_resnet110": "cifar10"}


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet")
    parser.add_argument("--batches", default="128,256,512,1000", help="comma-separated batch sizes")
    parser.add_argument("--samples", type=positive_int, default=4000, help="samples per measurement")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the channels-last model")
    parser.add_argument("--bf16", action="store_true", help="add bfloat16 autocast of the channels-last model")
    return parser


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


def benchmark(args):
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches '{args.batches}' is not a comma-separated list of integers, e.g. 128,256")
    if not batches or min(batches) <= 0:
        raise UserError("--batches needs positive batch sizes, e.g. 128,256")
    torch.set_num_threads(args.threads)
    dataset = MODELS[args.model]
    shape = tuple(get_input_shape(dataset))
    model = get_architecture(args.model, dataset, "cpu").eval()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants = {"contiguous": lambda x: model(x), "channels-last weights": lambda x: cl(x)}
    mkldnn_model = None
    try:
        warnings.filterwarnings("ignore", message=".*is deprecated", category=FutureWarning)
        from torch.utils import mkldnn
        mkldnn_model = mkldnn.to_mkldnn(copy.deepcopy(model))
        variants["torch.utils.mkldnn"] = lambda x: mkldnn_model(x.to_mkldnn()).to_dense()
    except Exception as exc:  # not every build has oneDNN tensors
        print(f"# torch.utils.mkldnn left out: {type(exc).__name__}")
    if args.bf16:
        def bf16_forward(x):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                return cl(x)
        variants["bf16 autocast (channels-last)"] = bf16_forward
    if args.compile:
        compiled = torch.compile(copy.deepcopy(cl))
        variants["torch.compile (channels-last)"] = lambda x: compiled(x)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  model {args.model}  {args.samples} samples per measurement, "
          f"{args.repeats} repeats; microseconds per sample (median)")
    print("| batch | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    with torch.inference_mode():
        for batch in batches:
            x = torch.rand((batch,) + shape)
            passes = max(1, args.samples // batch)
            times = {name: [] for name in variants}
            for forward in variants.values():
                forward(x)   # warm-up (and compilation for this shape)
            for _ in range(args.repeats):
                for name, forward in variants.items():
                    started = time.perf_counter()
                    for _ in range(passes):
                        forward(x)
                    times[name].append((time.perf_counter() - started) / (passes * batch) * 1e6)
            print(f"| {batch} | " + " | ".join(f"{statistics.median(times[n]):.1f}" for n in variants) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
