"""Certification throughput: ``core.Smooth`` against the published algorithm.

Every implementation runs Cohen et al.'s CERTIFY (N0 selection samples, N
estimation samples, one-sided Clopper-Pearson bound) on the same images:

* ``plain``: the published sampling loop, written out here: repeat the image
  ``batch`` times, ``torch.randn_like`` noise, forward, ``argmax``, move the
  predictions to the host and count them in Python, under ``torch.no_grad()``,
  with the model in its default (contiguous) memory format.
* ``Smooth``: ``core.Smooth`` with its defaults, one ``certify`` call per image;
  ``Smooth many`` certifies all images in one ``certify_many`` call (several
  images per forward pass, which matters on a GPU).
* ``--baseline-core PATH``: adds the ``Smooth`` of another ``core.py`` (an
  older revision, e.g. ``git show REV:code/core.py > /tmp/core_rev.py``), to
  measure a change of the engine side by side.
* ``ART``: IBM ART's ``PyTorchRandomizedSmoothing.certify``, when the
  ``adversarial-robustness-toolbox`` package is installed.

Each implementation gets its own copy of the model. The implementations
take turns (the order rotates every repeat) so that a machine shared with
other work slows them alike; the table gives the median images/s over the
repeats and the median of the per-repeat ratios to ``plain``.

    python benchmarks/bench_certify.py --model lenet --N 10000 --images 8 --repeats 5 --threads 2
"""
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

from architectures import get_architecture  # noqa: E402
from checkpoints import load_base_classifier  # noqa: E402
from common import ArgumentParser, UserError, positive_float, positive_int, run_cli  # noqa: E402
from core import Smooth  # noqa: E402
from datasets import DatasetError, get_dataset, get_input_shape, get_num_classes  # noqa: E402
from scipy.stats import norm  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402

MODELS = {"lenet": "fmnist", "cifar_resnet110": "cifar10"}
DEFAULT_N = {"lenet": 10000, "cifar_resnet110": 2000}


# --------------------------------------------------------------------------- the published algorithm

def plain_counts(model, x, sigma, num, batch_size, num_classes, device):
    """The published sampling loop: class counts of ``model`` on ``num`` noisy copies of x."""
    counts = np.zeros(num_classes, dtype=int)
    remaining = num
    with torch.no_grad():
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch, device=device) * sigma
            predictions = model(batch + noise).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
    return counts


def plain_certify(model, x, sigma, n0, n, alpha, batch_size, num_classes, device):
    counts0 = plain_counts(model, x, sigma, n0, batch_size, num_classes, device)
    c_a = int(counts0.argmax())
    counts = plain_counts(model, x, sigma, n, batch_size, num_classes, device)
    p_a = proportion_confint(int(counts[c_a]), n, alpha=2 * alpha, method="beta")[0]
    return (-1, 0.0) if p_a < 0.5 else (c_a, sigma * norm.ppf(p_a))


# --------------------------------------------------------------------------- implementations

class Plain:
    name = "plain (published algorithm)"

    def __init__(self, model, args, num_classes, device):
        self.model, self.args, self.k, self.device = model.eval(), args, num_classes, device

    def run(self, images, n):
        a = self.args
        return [plain_certify(self.model, x, a.sigma, a.N0, n, a.alpha, a.batch, self.k, self.device) for x in images]


class Ours:
    def __init__(self, model, args, num_classes, device, name="Smooth (defaults)", many=False, **options):
        self.name, self.args, self.many = name, args, many
        if many:
            options.setdefault("images_per_batch", args.images)
        self.smooth = Smooth(model, num_classes, args.sigma, **options)

    def run(self, images, n):
        a = self.args
        if self.many:
            return self.smooth.certify_many(torch.stack(images), a.N0, n, a.alpha, a.batch)
        return [self.smooth.certify(x, a.N0, n, a.alpha, a.batch) for x in images]


class Art:
    name = "IBM ART PyTorchRandomizedSmoothing"

    def __init__(self, model, args, num_classes, device):
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
        self.args = args
        self.classifier = PyTorchRandomizedSmoothing(
            model=model.eval(), loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(args.input_shape),
            nb_classes=num_classes, sample_size=args.N0, scale=args.sigma, alpha=args.alpha,
            device_type="gpu" if device.type == "cuda" else "cpu")

    def run(self, images, n):
        batch = torch.stack(images).cpu().numpy()
        predictions, radii = self.classifier.certify(batch, n=n, batch_size=self.args.batch)
        return list(zip(predictions.tolist(), radii.tolist()))


def load_core(path: str):
    """The module of another core.py, e.g. an older revision of the engine."""
    import importlib.util
    if not os.path.isfile(path):
        raise UserError(f"--baseline-core '{path}' is not a file; write one with "
                        "`git show REV:code/core.py > /tmp/core_rev.py`")
    spec = importlib.util.spec_from_file_location("baseline_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def art_available() -> bool:
    try:
        import importlib
        importlib.import_module("art.estimators.certification.randomized_smoothing")
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- measurement

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_sample(model, input_shape, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    probe = copy.deepcopy(model).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe(torch.zeros((1,) + tuple(input_shape), device=device))
    return float(counter.get_total_flops())


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def load_images(dataset, count, seed):
    try:
        data = get_dataset(dataset, "test")
        return [data[i][0] for i in range(count)], f"{dataset} test images 0..{count - 1}"
    except DatasetError:
        generator = torch.Generator().manual_seed(seed)
        shape = get_input_shape(dataset)
        images = [torch.rand(shape, generator=generator) for _ in range(count)]
        return images, f"uniform random images of shape {tuple(shape)} ({dataset} not found)"


def build_parser():
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet")
    parser.add_argument("--checkpoint", default=None, help="trained weights (default: random weights)")
    parser.add_argument("--N", type=positive_int, default=None, help="estimation samples (lenet 10000, resnet 2000)")
    parser.add_argument("--N0", type=positive_int, default=100, help="selection samples")
    parser.add_argument("--alpha", type=positive_float, default=0.001)
    parser.add_argument("--sigma", type=positive_float, default=0.25, help="noise level")
    parser.add_argument("--batch", type=positive_int, default=1000, help="noise samples per batch (certify --batch)")
    parser.add_argument("--images", type=positive_int, default=4, help="images certified per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=positive_int, default=2, help="intra-op threads on a CPU")
    parser.add_argument("--bf16", action="store_true", help="add a row for Smooth with bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="add a row for Smooth with torch.compile")
    parser.add_argument("--ablations", action="store_true",
                        help="add rows for Smooth without channels-last and without CPU forward sub-batches")
    parser.add_argument("--baseline-core", default=None, metavar="PATH",
                        help="also time the Smooth class of this core.py (e.g. an older revision)")
    parser.add_argument("--no-art", action="store_true", help="leave out IBM ART even when it is installed")
    parser.add_argument("--peak-tflops", type=positive_float, default=989.0,
                        help="the device's dense bf16 peak in TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    run_cli(lambda: benchmark(build_parser().parse_args(argv)))


def benchmark(args):
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown device '{args.device}'; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    if args.alpha >= 0.5:
        raise UserError(f"--alpha {args.alpha} must be below 0.5")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dataset = MODELS[args.model]
    n = args.N or DEFAULT_N[args.model]
    num_classes = get_num_classes(dataset)
    args.input_shape = get_input_shape(dataset)
    if args.checkpoint:
        model = load_base_classifier(args.checkpoint, dataset, device)
    else:
        model = get_architecture(args.model, dataset, device)
    model.eval()
    images, source = load_images(dataset, args.images, args.seed)
    images = [x.to(device) for x in images]

    impls = [Plain(copy.deepcopy(model), args, num_classes, device),
             Ours(copy.deepcopy(model), args, num_classes, device),
             Ours(copy.deepcopy(model), args, num_classes, device, name="Smooth certify_many", many=True)]
    if args.baseline_core:
        baseline = Ours(copy.deepcopy(model), args, num_classes, device, name=f"Smooth of {args.baseline_core}")
        baseline.smooth = load_core(args.baseline_core).Smooth(copy.deepcopy(model), num_classes, args.sigma)
        impls.insert(1, baseline)
    if args.ablations:
        impls.append(Ours(copy.deepcopy(model), args, num_classes, device,
                          name="Smooth channels_last=False", channels_last=False))
        impls.append(Ours(copy.deepcopy(model), args, num_classes, device,
                          name=f"Smooth forward_batch={args.batch}", forward_batch=args.batch))
    if args.bf16:
        impls.append(Ours(copy.deepcopy(model), args, num_classes, device, name="Smooth bf16", bf16=True))
    if args.compile:
        impls.append(Ours(copy.deepcopy(model), args, num_classes, device, name="Smooth compile", compile=True))
    art_note = None
    if args.no_art:
        art_note = "left out (--no-art)"
    elif art_available():
        impls.append(Art(copy.deepcopy(model), args, num_classes, device))
    else:
        art_note = "not installed"

    flops = flops_per_sample(model, args.input_shape, device)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  torch {torch.__version__}  "
          f"device {device} ({machine_name(device)})  "
          f"threads {torch.get_num_threads() if device.type == 'cpu' else '-'}")
    print(f"# model {args.model} ({'weights ' + args.checkpoint if args.checkpoint else 'random weights'}), "
          f"{source}; N0={args.N0} N={n} batch={args.batch} alpha={args.alpha} sigma={args.sigma}; "
          f"{args.repeats} repeats; {flops / 1e6:.2f} MFLOP per forward sample", flush=True)

    # warm-up (and compilation) on one image with few samples
    for impl in impls:
        impl.run(images[:1], min(n, args.batch))
    synchronize(device)

    rates = {impl.name: [] for impl in impls}
    results = {}
    for repeat in range(args.repeats):
        shift = repeat % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            synchronize(device)
            started = time.perf_counter()
            results[impl.name] = impl.run(images, n)
            synchronize(device)
            rates[impl.name].append(len(images) / (time.perf_counter() - started))

    plain = rates[impls[0].name]
    samples_per_image = args.N0 + n
    header = ["implementation", "images/s", "min-max", "ratio vs plain", "GFLOP/s"]
    if device.type == "cuda":
        header.append("% of bf16 peak")
    rows = []
    for impl in impls:
        values = rates[impl.name]
        median = statistics.median(values)
        ratio = statistics.median(v / p for v, p in zip(values, plain))
        gflops = median * samples_per_image * flops / 1e9
        row = [impl.name, f"{median:.3f}", f"{min(values):.3f}-{max(values):.3f}", f"{ratio:.2f}x", f"{gflops:.1f}"]
        if device.type == "cuda":
            row.append(f"{100 * gflops / 1e3 / args.peak_tflops:.2f}%")
        rows.append(row)
    if art_note:
        rows.append(["IBM ART PyTorchRandomizedSmoothing", art_note] + [""] * (len(header) - 2))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    reference = results[impls[0].name]
    for impl in impls[1:]:
        same = sum(a[0] == b[0] for a, b in zip(reference, results[impl.name]))
        print(f"# {impl.name}: same certified class as plain on {same}/{len(reference)} images "
              "(independent noise, so near-ties may differ)")


if __name__ == "__main__":
    main()
