"""Monte Carlo certification and prediction of a smoothed classifier.

The smoothed classifier of a base classifier f is
``g(x) = argmax_c P[f(x + e) = c]`` with ``e ~ N(0, sigma^2 I)``. CERTIFY and
PREDICT below are the algorithms of Cohen, Rosenfeld and Kolter, "Certified
Adversarial Robustness via Randomized Smoothing" (ICML 2019):

* ``certify`` returns (cA, R). With probability at least 1 - alpha over the
  sampling, if cA != ABSTAIN then g(x + d) = cA for every ||d||_2 < R.
* ``predict`` returns a class which, with probability at least 1 - alpha, is
  g(x) (or ABSTAIN).

The sampling engine draws the noise on the model's device straight into a
reused buffer (in the model's memory format), adds x in the same pass,
counts predictions on the device (``bincount``) and moves one count vector
per image to the host. Several images can share a forward pass
(``images_per_batch``), which keeps a large device busy with a small model.
On a CPU the forward passes take at most ``forward_batch`` samples (128 per
intra-op thread by default), so the activations stay in cache, and with
``channels_last`` the model's convolution weights are stored channels-last
(oneDNN's kernels for that layout run LeNet's forward pass nearly twice as
fast on an AVX2 CPU; see docs/BENCHMARKS.md). None of this changes the samples'
distribution or the model's values: the fp32 path is the published
algorithm. With ``bf16=True`` the certificate holds for the base classifier
evaluated in bfloat16 autocast (a different, equally valid f).

Reproducible sampling: pass one ``torch.Generator`` per image, e.g. from
``noise_generator(seed, index, device)``. Each image's noise is then drawn
from its own stream, in chunks whose sizes depend only on (N, batch size),
so the counts of an image do not depend on which other images share its
forward passes, on how a data set is split among processes, or on
interruptions.
"""
import math
from fractions import Fraction
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import beta, binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint


# Samples per forward pass and intra-op thread on a CPU (see ``Smooth.forward_batch``).
CPU_FORWARD_BATCH_PER_THREAD = 128


# Layout of the CPU generator's state (``torch.Generator.get_state()``): torch's
# CPUGeneratorImplState, a legacy mt19937 record followed by the cached float
# normal. Checked against a freshly seeded generator at run time (see
# ``_check_cpu_state_layout``): a torch whose layout differs makes
# ``noise_generator`` fail loudly instead of seeding a wrong stream.
_CPU_STATE_BYTES = 5056
_MT_WORDS = 624
_OFFSET_INITIAL_SEED, _OFFSET_LEFT, _OFFSET_SEEDED, _OFFSET_NEXT, _OFFSET_WORDS = 0, 8, 12, 16, 24
_cpu_state_template: Optional[np.ndarray] = None


def _check_cpu_state_layout() -> np.ndarray:
    """A freshly seeded CPU state, after checking that its fields sit where ``noise_generator`` writes."""
    global _cpu_state_template
    if _cpu_state_template is None:
        seed = 0x0123456789ABCDEF
        state = torch.Generator().manual_seed(seed).get_state().numpy().copy()
        words = state[_OFFSET_WORDS:_OFFSET_WORDS + 8 * _MT_WORDS].view(np.uint64) if state.size == _CPU_STATE_BYTES \
            else None
        # mt19937 seeding: w[0] = seed mod 2^32, w[i] = 1812433253 (w[i-1] ^ (w[i-1] >> 30)) + i mod 2^32
        expected = [seed & 0xFFFFFFFF]
        for i in range(1, 3):
            expected.append((1812433253 * (expected[-1] ^ (expected[-1] >> 30)) + i) & 0xFFFFFFFF)
        fits = (words is not None
                and state[_OFFSET_INITIAL_SEED:_OFFSET_INITIAL_SEED + 8].view(np.uint64)[0] == seed
                and state[_OFFSET_LEFT:_OFFSET_LEFT + 4].view(np.int32)[0] == 1
                and state[_OFFSET_SEEDED:_OFFSET_SEEDED + 4].view(np.int32)[0] == 1
                and state[_OFFSET_NEXT:_OFFSET_NEXT + 8].view(np.uint64)[0] == 0
                and [int(w) for w in words[:3]] == expected
                and int(words.max()) <= 0xFFFFFFFF)
        if not fits:
            raise RuntimeError(f"torch {torch.__version__} stores the CPU generator's state in a layout that "
                               "core.noise_generator does not know; update _check_cpu_state_layout and "
                               "noise_generator for it")
        _cpu_state_template = state
    return _cpu_state_template


def noise_generator(seed: int, index: int, device, key: Sequence[int] = ()) -> torch.Generator:
    """A generator whose stream depends only on (seed, key, index) and the device type.

    The stream is seeded from ``numpy.random.SeedSequence(seed, spawn_key=(*key,
    index))`` with full entropy: on a CPU the 19937-bit state of torch's
    mt19937 is filled with words expanded from that seed sequence (through
    PCG64; word 0 holds only the top bit that mt19937 uses, set to 1 as numpy
    does, so the state is never all zero); ``manual_seed`` would keep only
    32 bits of a seed, so that two images among a few hundred thousand
    would share a stream. On other devices (CUDA's Philox) the generator
    takes the 64-bit seed ``manual_seed`` keeps in full; 1.3 million streams
    then collide with probability below 1e-7.
    """
    sequence = np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key) + (int(index),))
    device = torch.device(device)
    generator = torch.Generator(device=device)
    if device.type != "cpu":
        generator.manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0]))
        return generator
    state = _check_cpu_state_layout().copy()
    words = np.empty(_MT_WORDS, dtype=np.uint64)
    words[0] = 0x80000000
    words[1:] = np.random.PCG64(sequence).random_raw(_MT_WORDS // 2).view(np.uint32)[1:]
    state[_OFFSET_WORDS:_OFFSET_WORDS + 8 * _MT_WORDS] = words.view(np.uint8)
    state[_OFFSET_INITIAL_SEED:_OFFSET_INITIAL_SEED + 8] = np.array([words[1] << np.uint64(32) | words[2]],
                                                                   dtype=np.uint64).view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return generator


def chunk_sizes(num: int, batch_size: int) -> List[int]:
    """Sizes of the noise chunks of one image: ``batch_size`` each, the last one smaller."""
    full, rest = divmod(num, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _weights_to_channels_last(module: torch.nn.Module):
    """Store the 4-D parameters and buffers of ``module`` channels-last, in place (same values)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
                continue  # a lazy module's parameter: nothing to convert yet
            if tensor.dim() == 4 and not tensor.is_contiguous(memory_format=torch.channels_last):
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as a contiguous tensor: a channels-last batch viewed as [N x H x W x C].

    (Random fills take their fast vectorised path only on contiguous tensors.)
    """
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1)
    return tensor


class Smooth:
    """A smoothed classifier g around a base classifier f."""

    # to abstain, Smooth returns this int
    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float,
                 images_per_batch: int = 1, channels_last: bool = True, bf16: bool = False,
                 compile: bool = False, forward_batch: Optional[int] = None):
        """
        :param base_classifier: maps a batch [B x C x H x W] to logits [B x num_classes]
        :param num_classes: number of classes
        :param sigma: the noise level hyperparameter
        :param images_per_batch: up to this many images share one forward pass of
            at most ``images_per_batch * batch_size`` samples
        :param channels_last: store the model's 4-D weights and feed 4-D batches in
            channels-last memory format (same values, faster convolutions on CPU
            and tensor cores). This converts ``base_classifier`` in place, as
            ``.eval()`` does; its parameters stay the same objects.
        :param bf16: evaluate f under bfloat16 autocast (the certificate is then
            one of the bf16 base classifier)
        :param compile: run f through ``torch.compile``
        :param forward_batch: the most samples per forward pass; None: 128 per
            intra-op thread on a CPU, no limit on other devices. It changes
            neither the noise nor which sample goes with which image, only the
            speed (and the rounding of kernels that depend on the batch size).
        """
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if forward_batch is not None and int(forward_batch) <= 0:
            raise ValueError(f"forward_batch must be positive, got {forward_batch}")
        self.base_classifier = base_classifier.eval()
        if channels_last:
            _weights_to_channels_last(self.base_classifier)
        self.num_classes = num_classes
        self.sigma = sigma
        self.images_per_batch = max(1, int(images_per_batch))
        self.channels_last = channels_last
        self.bf16 = bf16
        self.forward_batch = None if forward_batch is None else int(forward_batch)
        self._forward = torch.compile(self.base_classifier) if compile else self.base_classifier
        self._noise_buffer: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ public API

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> Tuple[int, float]:
        """Monte Carlo algorithm for certifying that g's prediction around x is constant
        within some L2 radius. With probability at least 1 - alpha, the class returned
        by this method will equal g(x), and g's prediction will be robust within an L2
        ball of the returned radius around x.

        :param x: the input [channel x height x width]
        :param n0: the number of Monte Carlo samples to use for selection
        :param n: the number of Monte Carlo samples to use for estimation
        :param alpha: the failure probability
        :param batch_size: batch size to use when evaluating the base classifier
        :return: (predicted class, certified radius); (ABSTAIN, 0.0) when abstaining
        """
        return self.certify_many(x.unsqueeze(0), n0, n, alpha, batch_size, [generator])[0]

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> int:
        """Monte Carlo algorithm for evaluating the prediction of g at x. With probability
        at least 1 - alpha, the class returned by this method will equal g(x).

        This function uses the hypothesis test described in Hung et al., "Rank
        verification for exponential families" (Annals of Statistics, 2019).

        :return: the predicted class, or ABSTAIN
        """
        return self.predict_many(x.unsqueeze(0), n, alpha, batch_size, [generator])[0]

    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: Optional[torch.Generator] = None) -> np.ndarray:
        """Class counts of f on ``num`` noisy copies of x: an ndarray[num_classes] of ints.

        ``counts / num`` is the class-frequency estimate that smoothed prediction
        stores for CAT-RS.
        """
        return self.sample_counts_many(x.unsqueeze(0), num, batch_size, [generator])[0]

    # the published name of the same estimate
    def _sample_noise(self, x: torch.Tensor, num: int, batch_size: int) -> np.ndarray:
        return self.sample_counts(x, num, batch_size)

    def certify_many(self, xs: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                     generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> List[Tuple[int, float]]:
        """``certify`` for each image of ``xs`` [G x C x H x W]; one generator per image."""
        generators = self._generators(xs, generators)
        # selection and estimation use independent samples (the selection ones come first)
        counts_selection = self.sample_counts_many(xs, n0, batch_size, generators)
        counts_estimation = self.sample_counts_many(xs, n, batch_size, generators)
        results = []
        for counts0, counts in zip(counts_selection, counts_estimation):
            c_a = int(counts0.argmax())
            p_a_lower = self.lower_confidence_bound(int(counts[c_a]), n, alpha)
            if p_a_lower < 0.5:
                results.append((Smooth.ABSTAIN, 0.0))
            else:
                results.append((c_a, float(self.sigma * norm.ppf(p_a_lower))))
        return results

    def predict_many(self, xs: torch.Tensor, n: int, alpha: float, batch_size: int,
                     generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> List[int]:
        """``predict`` for each image of ``xs`` [G x C x H x W]; one generator per image."""
        results = []
        for counts in self.sample_counts_many(xs, n, batch_size, self._generators(xs, generators)):
            top2 = counts.argsort()[::-1][:2]
            count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
            if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
                results.append(Smooth.ABSTAIN)
            else:
                results.append(int(top2[0]))
        return results

    def certify_sequential_many(self, xs: torch.Tensor, n0: int, n_max: int, alpha: float, batch_size: int,
                                generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                                radii: Optional[Sequence[float]] = None, radius_tol: float = 0.0,
                                growth: float = 1.5) -> List[Tuple[int, float, int]]:
        """Sequential CERTIFY for each image of ``xs``: (class or ABSTAIN, radius, samples drawn).

        Same guarantee as ``certify`` (see ``SequentialCertifier``), at most
        ``n0 + n_max`` samples per image. Selection draws ``n0`` samples first,
        as ``certify`` does; then estimation rounds take each image from one
        look to the next, from the image's own stream, so its first n
        estimation samples are the ones ``certify`` with N >= n would use (the
        looks are whole batches). Images that have stopped leave the group.
        With ``radii``: a look after every batch (``batch_looks``) and the
        ``"mixture"`` scheme of ``SequentialCertifier``, with the geometric
        looks of ``look_schedule(n_max, batch_size, growth)`` as checkpoints.
        Without (ACR): the ``"spending"`` scheme on the geometric looks (the
        mixture scheme stopped the ACR mode about 10 % earlier on a
        Fashion-MNIST LeNet but lost about twice as much ACR against fixed-N at
        the same tolerance; docs/BENCHMARKS.md).
        ``radii``/``radius_tol``: the stopping rule (see
        ``SequentialCertifier``). ``samples`` counts the selection samples
        too (n0 + estimation samples).
        """
        generators = self._generators(xs, generators)
        certifier = sequential_certifier(self.sigma, alpha, n_max, batch_size, radii, radius_tol, growth)
        looks = certifier.looks
        selected = self.sample_counts_many(xs, n0, batch_size, generators).argmax(axis=1)
        counts = np.zeros(xs.shape[0], dtype=np.int64)

        def decide(look, num, active, more):
            for i, row in zip(active, more):
                counts[i] += int(row[selected[i]])
            stops, lowers = certifier.step(look, counts[active])
            return [None if not stop else
                    (int(selected[i]), float(certifier.radius(lower)), n0 + num) if lower >= 0.5 else
                    (Smooth.ABSTAIN, 0.0, n0 + num)
                    for i, stop, lower in zip(active, stops, lowers)]

        return self._sequential_rounds(xs, looks, batch_size, generators, decide)

    def predict_sequential_many(self, xs: torch.Tensor, n_max: int, alpha: float, batch_size: int,
                                generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                                growth: float = 1.5) -> List[Tuple[int, int]]:
        """Sequential PREDICT for each image of ``xs``: (class or ABSTAIN, samples drawn).

        Same guarantee as ``predict`` (see ``SequentialPredictor``), at most
        ``n_max`` samples per image, drawn in rounds like
        ``certify_sequential_many``.
        """
        generators = self._generators(xs, generators)
        looks = look_schedule(n_max, batch_size, growth)
        predictor = SequentialPredictor(alpha, looks)
        counts = np.zeros((xs.shape[0], self.num_classes), dtype=np.int64)

        def decide(look, num, active, more):
            results = []
            for i, row in zip(active, more):
                counts[i] += row
                top2 = counts[i].argsort()[::-1][:2]
                stop, decided = predictor.step(look, int(counts[i][top2[0]]), int(counts[i][top2[1]]))
                results.append((int(top2[0]) if decided else Smooth.ABSTAIN, num) if stop else None)
            return results

        return self._sequential_rounds(xs, looks, batch_size, generators, decide)

    def _sequential_rounds(self, xs: torch.Tensor, looks: Sequence[int], batch_size: int,
                           generators: List[Optional[torch.Generator]], decide: Callable) -> list:
        """Draw each undecided image's samples up to each look in turn, from its own stream.

        ``decide(look, num, active, more)`` gets the indices of the images still drawing and the
        class counts [len(active) x num_classes] of their new samples, and returns per image its
        result, or None to go on. Decided images leave the group; returns the results.
        """
        results: list = [None] * xs.shape[0]
        active = list(range(xs.shape[0]))
        drawn = 0
        for look, num in enumerate(looks):
            index = torch.tensor(active, dtype=torch.long, device=xs.device)
            more = self.sample_counts_many(xs.index_select(0, index), num - drawn, batch_size,
                                           [generators[i] for i in active])
            drawn = num
            decided = decide(look, num, active, more)
            for i, result in zip(active, decided):
                results[i] = result
            active = [i for i, result in zip(active, decided) if result is None]
            if not active:
                break
        return results

    @staticmethod
    def lower_confidence_bound(num_a: int, num: int, alpha: float) -> float:
        """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
        return proportion_confint(num_a, num, alpha=2 * alpha, method="beta")[0]

    # ------------------------------------------------------------------ sampling engine

    def sample_counts_many(self, xs: torch.Tensor, num: int, batch_size: int,
                           generators: Optional[Sequence[Optional[torch.Generator]]] = None) -> np.ndarray:
        """Class counts [G x num_classes] of f on ``num`` noisy copies of each image of ``xs``."""
        if num <= 0 or batch_size <= 0:
            raise ValueError(f"num and batch_size must be positive, got {num} and {batch_size}")
        generators = self._generators(xs, generators)
        device = xs.device
        num_images, k = xs.shape[0], self.num_classes
        capacity = batch_size * self.images_per_batch
        counts = torch.zeros(num_images * k, dtype=torch.long, device=device)
        # Work items (image, chunk size), chunk-major so that the images of a group
        # advance together; each image's chunks stay in order, so its stream is fixed.
        items = [(image, size) for size in chunk_sizes(num, batch_size) for image in range(num_images)]
        if self.channels_last and xs.dim() == 4:
            xs = xs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            batch: List[Tuple[int, int]] = []
            filled = 0
            for image, size in items:
                if filled + size > capacity and batch:
                    self._count_batch(xs, batch, generators, counts)
                    batch, filled = [], 0
                batch.append((image, size))
                filled += size
            if batch:
                self._count_batch(xs, batch, generators, counts)
        return counts.view(num_images, k).cpu().numpy()

    def _count_batch(self, xs, batch, generators, counts):
        """Draw the noise of each (image, size) item, classify the batch and add to ``counts``."""
        total = sum(size for _, size in batch)
        noisy = self._buffer(total, xs)
        start = 0
        for image, size in batch:
            chunk = noisy[start:start + size]
            # chunk = x + sigma * e, e ~ N(0, I), drawn in place from the image's own stream
            _dense(chunk).normal_(generator=generators[image])
            torch.add(xs[image], chunk, alpha=self.sigma, out=chunk)
            start += size
        step = self._forward_step(total, xs.device)
        predictions = torch.empty(total, dtype=torch.long, device=xs.device)
        for begin in range(0, total, step):
            logits = self._classify(noisy[begin:begin + step])
            torch.argmax(logits, 1, out=predictions[begin:begin + step])
        image_ids = torch.tensor([image for image, _ in batch], dtype=torch.long, device=xs.device)
        sizes = torch.tensor([size for _, size in batch], dtype=torch.long, device=xs.device)
        keys = torch.repeat_interleave(image_ids * self.num_classes, sizes, output_size=total) + predictions
        counts += torch.bincount(keys, minlength=counts.numel())

    def _classify(self, noisy: torch.Tensor) -> torch.Tensor:
        if self.bf16:
            with torch.autocast(device_type=noisy.device.type, dtype=torch.bfloat16):
                return self._forward(noisy)
        return self._forward(noisy)

    def _forward_step(self, total: int, device: torch.device) -> int:
        """Samples per forward pass: small on a CPU, where cache-sized batches are fastest."""
        if self.forward_batch is not None:
            return self.forward_batch
        if device.type == "cpu":
            return CPU_FORWARD_BATCH_PER_THREAD * max(1, torch.get_num_threads())
        return max(1, total)

    def _buffer(self, total: int, xs: torch.Tensor) -> torch.Tensor:
        """A reused [total x ...] noise buffer on the images' device, in the model's memory format."""
        shape = (total,) + tuple(xs.shape[1:])
        memory_format = torch.channels_last if self.channels_last and len(shape) == 4 else torch.contiguous_format
        buffer = self._noise_buffer
        if (buffer is None or buffer.shape[0] < total or buffer.shape[1:] != shape[1:]
                or buffer.device != xs.device or buffer.dtype != xs.dtype
                or not buffer.is_contiguous(memory_format=memory_format)):
            buffer = torch.empty(shape, dtype=xs.dtype, device=xs.device, memory_format=memory_format)
            self._noise_buffer = buffer
        return buffer[:total]

    @staticmethod
    def _generators(xs, generators):
        if generators is None:
            return [None] * xs.shape[0]
        if len(generators) != xs.shape[0]:
            raise ValueError(f"need one generator per image: {xs.shape[0]} images, {len(generators)} generators")
        return list(generators)


# --------------------------------------------------------------------------- sequential certification

def look_schedule(n_max: int, batch_size: int, growth: float = 1.5) -> List[int]:
    """The fixed sample sizes n_1 < n_2 < ... < n_K = n_max at which a sequential run looks.

    Geometric (each look about ``growth`` times the last), in whole batches of
    ``batch_size`` samples except the last look, which is ``n_max``. The
    schedule depends only on (n_max, batch_size, growth), never on data: the
    alpha-spending of ``SequentialCertifier`` needs it fixed in advance.
    """
    if n_max <= 0 or batch_size <= 0 or growth <= 1:
        raise ValueError(f"need n_max > 0, batch_size > 0 and growth > 1, got {n_max}, {batch_size}, {growth}")
    looks, batches, total = [], 1.0, 0
    while True:
        size = int(math.ceil(batches - 1e-9)) * batch_size
        if size >= n_max:
            break
        if size > total:
            looks.append(size)
            total = size
        batches *= growth
    return looks + [n_max]


def batch_looks(n_max: int, batch_size: int) -> List[int]:
    """A look after every batch: batch_size, 2 batch_size, ..., and n_max last (fixed in advance)."""
    if n_max <= 0 or batch_size <= 0:
        raise ValueError(f"need n_max > 0 and batch_size > 0, got {n_max}, {batch_size}")
    return list(range(batch_size, n_max, batch_size)) + [n_max]


def cp_lower(count, num, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound: the alpha-quantile of Beta(k, n - k + 1).

    ``count`` (and ``num``) may be arrays; 0 where the count is 0.
    """
    count = np.asarray(count, dtype=float)
    safe = np.maximum(count, 1)
    return np.where(count > 0, beta.ppf(alpha, safe, num - safe + 1), 0.0)


def cp_upper(count, num, alpha):
    """One-sided (1 - alpha) Clopper-Pearson upper bound: the (1 - alpha)-quantile of Beta(k + 1, n - k).

    ``count`` (and ``num``) may be arrays; 1 where the count is ``num``.
    """
    count = np.asarray(count, dtype=float)
    safe = np.minimum(count, np.asarray(num) - 1)
    return np.where(count < num, beta.isf(alpha, safe + 1, num - safe), 1.0)


# The alternatives of the mixture confidence sequence (``mixture_lower``): p1 = 1 with weight
# MIXTURE_POINT_WEIGHT, and p1 = 1 - 2^(-j/2), j = 1..40 (1 - p1 from 0.71 down to 1e-6), sharing the rest.
MIXTURE_POINT_WEIGHT = 0.9
MIXTURE_ALTERNATIVES = np.concatenate([[1.0], 1.0 - 2.0 ** (-np.arange(1, 41) / 2.0)])
MIXTURE_WEIGHTS = np.concatenate([[MIXTURE_POINT_WEIGHT], np.full(40, (1 - MIXTURE_POINT_WEIGHT) / 40)])


def mixture_log_martingale(count, num, p0):
    """log M_n(p0) of the one-sided mixture of likelihood ratios, for arrays ``count``, ``p0`` (same shape).

    M_n(p0) = sum over the alternatives p1_j > p0 of w_j prod_i (p1_j / p0)^{X_i} ((1 - p1_j) / (1 - p0))^{1 - X_i},
    with ``count`` = sum X_i of ``num`` draws. For every fixed p1 > p0 the product's factor has mean
    p p1 / p0 + (1 - p) (1 - p1) / (1 - p0) <= 1 whenever p <= p0 (it is 1 at p = p0 and increases in p),
    so M_n(p0) is a nonnegative supermartingale with M_0 <= sum w_j <= 1 under any p <= p0.
    """
    count = np.asarray(count, dtype=float)[..., None]
    p0 = np.asarray(p0, dtype=float)[..., None]
    p1, weights = MIXTURE_ALTERNATIVES, MIXTURE_WEIGHTS
    failures = num - count
    with np.errstate(divide="ignore", invalid="ignore"):
        # (1 - p1)^failures: 1 when there are no failures (also for p1 = 1), 0 when p1 = 1 and there are some
        fail_term = np.where(failures > 0, failures * (np.log1p(-np.minimum(p1, 1.0)) - np.log1p(-p0)),
                             0.0)
        terms = np.log(weights) + count * (np.log(p1) - np.log(p0)) + fail_term
    terms = np.where(p1 > p0, terms, -np.inf)
    return np.logaddexp.reduce(terms, axis=-1)


def mixture_lower(count, num, alpha, iterations=40):
    """Anytime-valid (1 - alpha) lower confidence sequence for a binomial proportion (arrays of counts).

    Guarantee: for draws X_1, X_2, ... i.i.d. Bernoulli(p), P[exists n: mixture_lower(S_n, n, alpha) > p]
    <= alpha, S_n = X_1 + ... + X_n. Proof: the bound is a p0 with M_n(p0) >= 1 / alpha
    (``mixture_log_martingale``), and M_n(p0) is decreasing in p0 below the empirical share k / n (each
    active term decreases there, and terms only drop out as p0 grows) and below 1 from k / n on (there
    every active term is <= 1 times its weight: p1 > p0 >= k / n is farther from k / n than p0), so
    {p0: M_n(p0) >= 1 / alpha} is an interval starting at 0; a bound above p therefore means
    M_n(p) >= 1 / alpha, and by Ville's inequality for the nonnegative supermartingale M_n(p)
    (M_0 <= 1) that happens at some n with probability at most alpha. Bisection keeps the lower end on
    the rejected side, so rounding only lowers the bound; 0 when nothing is rejected.

    A mixture of likelihood-ratio martingales (Robbins' method of mixtures; Waudby-Smith and Ramdas,
    "Estimating means of bounded random variables by betting", JRSS-B 2024, for the general theory;
    Voracek 2024 and Cullen et al. 2026 use such sequences for randomized smoothing) over a fixed grid
    of alternatives: the point mass at p1 = 1 (weight w = ``MIXTURE_POINT_WEIGHT``) makes an all-correct
    stream of n draws give (w alpha)^(1 / n), close to the fixed-n Clopper-Pearson bound alpha^(1 / n);
    the grid 1 - 2^(-j/2) serves streams with a few errors at a price of log(40 / (1 - w)) in log(1 / alpha).
    """
    count = np.asarray(count, dtype=float)
    threshold = math.log(1.0 / alpha)
    low = np.zeros_like(count)                       # rejected (or 0, where nothing is)
    high = np.where(num > 0, count / max(num, 1), 0.0)   # not rejected: M_n(k / n) <= 1 < 1 / alpha
    for _ in range(iterations):
        middle = (low + high) / 2
        rejected = mixture_log_martingale(count, num, np.maximum(middle, 1e-300)) >= threshold
        low = np.where(rejected, middle, low)
        high = np.where(rejected, high, middle)
    return low


# the share of alpha that the mixture confidence sequence gets (see SequentialCertifier)
MIXTURE_SHARE = 0.35
# the share of alpha that sequential certification spends on its last look (see SequentialCertifier)
SEQUENTIAL_FINAL_SHARE = 0.5
# what ``Smooth.certify_sequential_many`` computes, recorded with its results (a change of scheme must
# not continue a file of the old one); written from the constants above, so that changing one changes it
SEQUENTIAL_SCHEME = (
    f"radii: mixture {MIXTURE_SHARE:g} (weight {MIXTURE_POINT_WEIGHT:g} at p1 = 1) at every batch + Clopper-Pearson "
    f"{round(1 - SEQUENTIAL_FINAL_SHARE - MIXTURE_SHARE, 10):g} at geometric looks + "
    f"{Fraction(SEQUENTIAL_FINAL_SHARE)} at the last look; ACR: Clopper-Pearson {Fraction(1 - SEQUENTIAL_FINAL_SHARE)} "
    f"over geometric looks + {Fraction(SEQUENTIAL_FINAL_SHARE)} at the last look")
# what it computes when N-max is at most one batch: a single look, where both modes report CERTIFY's
# Clopper-Pearson bound at the whole of alpha. Recorded instead of SEQUENTIAL_SCHEME, which stays the record
# of every run with more looks, so that a single-look file of the earlier rule (0.35 alpha) is not continued.
SEQUENTIAL_SINGLE_LOOK_SCHEME = "single look: Clopper-Pearson at alpha"


def sequential_scheme(n_max: int, batch_size: int) -> str:
    """The scheme ``Smooth.certify_sequential_many`` runs with these N-max and batch size (for the record)."""
    # the radii mode's looks (batch_looks) and the ACR mode's (look_schedule) are one look for the same runs
    return SEQUENTIAL_SINGLE_LOOK_SCHEME if len(batch_looks(n_max, batch_size)) == 1 else SEQUENTIAL_SCHEME


# the level of the upper bound that stops the radii mode when the next radius is out of reach
RADII_STOP_ALPHA = 0.05


def sequential_certifier(sigma: float, alpha: float, n_max: int, batch_size: int,
                         radii: Optional[Sequence[float]] = None, radius_tol: float = 0.0,
                         growth: float = 1.5) -> "SequentialCertifier":
    """The decision rule of ``Smooth.certify_sequential_many`` with these settings (its looks: ``.looks``).

    With ``radii``: a look after every batch and the ``"mixture"`` scheme, the geometric looks as
    checkpoints; without: the ``"spending"`` scheme on the geometric looks.
    """
    if radii is not None:
        return SequentialCertifier(sigma, alpha, batch_looks(n_max, batch_size), radii=radii,
                                   final_share=SEQUENTIAL_FINAL_SHARE, stop_alpha=RADII_STOP_ALPHA,
                                   sequence="mixture", checkpoints=look_schedule(n_max, batch_size, growth))
    return SequentialCertifier(sigma, alpha, look_schedule(n_max, batch_size, growth), radius_tol=radius_tol,
                               final_share=SEQUENTIAL_FINAL_SHARE, sequence="spending")


class SequentialCertifier:
    """The decision logic of sequential CERTIFY for one image: a pure function of its count stream.

    After the selection step has fixed cA (from N0 samples of its own, as in
    CERTIFY), estimation samples are drawn in rounds; after round k the image
    has ``looks[k]`` estimation samples of which ``count`` were classified
    cA, and ``step(k, count)`` says whether to stop and with which lower
    bound pA_lower of pA = P[f(x + e) = cA].

    Guarantee (as Cohen et al. state CERTIFY's): with probability at least
    1 - alpha over the sampling, if the result is not ABSTAIN, the returned
    class equals g(x) and g's prediction is robust within an L2 ball of the
    returned radius sigma * PhiInv(pA_lower) around x. This holds whatever
    the stopping rule, because the reported bound exceeds pA at the
    data-dependent look where the run stops only if some bound of a fixed
    family exceeds pA at some look, and the family's levels sum to alpha
    (union bound; ``union_levels``). The probability is over the whole
    procedure: conditionally on how many samples a run drew (e.g. on its
    having run to n_max, which the images near a decision do) the bound
    exceeds pA far more often than alpha (0.069 of the runs to n_max for pA
    one standard deviation below Phi(3) in the radii mode at alpha = 0.001;
    ``benchmarks/bench_sequential.py --exact-worst-case``). Two schemes
    (``sequence``):

    * ``"mixture"`` (the default, and ``Smooth.certify_sequential_many``'s):
      three parts. (1) ``mixture_lower`` at alpha * mixture_share at every
      look: an anytime-valid confidence sequence (Ville's inequality for a
      mixture of likelihood-ratio martingales; proof in its docstring), so
      the looks can be as many as the engine's batches (a look after every
      batch). (2) The exact Clopper-Pearson bound at the ``checkpoints``
      (geometric looks, fixed in advance) at alpha_c = alpha * (1 -
      final_share - mixture_share) / (number of checkpoints), an
      alpha-spending part. (3) At the last look, the exact Clopper-Pearson
      bound at alpha * final_share. The reported bound at a look is the
      largest of the parts defined there. ``Smooth.certify_sequential_many``
      gives 1/2 to the last look, 0.35 to the sequence (0.9 of its weight on
      p1 = 1) and 0.15 to 12 checkpoints (alpha / 80 each): at alpha = 0.001
      an all-cA stream reaches Phi(3) (radius 3 sigma, the largest listed
      radius that 100,000 samples can certify at sigma 0.25 and 0.5 in the
      published tables) after 5,942 samples, so at the 6,000-sample look
      with 1,000-sample batches (a single Clopper-Pearson test at the whole
      of alpha needs 5,114); streams in the interior (p around 0.6 to 0.99,
      where the grid of the mixture is coarse) are decided by part (2), and
      images near a decision by part (3), which is CERTIFY's bound at
      alpha / 2. (With 1/4 to the sequence, half of it on p1 = 1, and 1/4
      to the checkpoints, such a stream needed 6,438 samples, i.e. the
      7,000-sample look; giving the sequence 1/2 and the checkpoints
      nothing sent the interior images of a Fashion-MNIST LeNet to n_max
      more often and drew more samples overall, docs/BENCHMARKS.md.)
    * ``"spending"``: look k reports the exact one-sided Clopper-Pearson
      bound at level alpha_k, sum_k alpha_k = alpha (the previous scheme,
      kept for comparison): with K looks on a geometric schedule the price
      is about log(K) in log(1 / alpha) at every look.

    The upper bounds only steer stopping (no validity rests on them).
    Literature: Chen et al., "Input-Specific Robustness Certification for
    Randomized Smoothing" (AAAI 2022) choose the sample size per input;
    Voracek, "Treatment of Statistical Estimation Problems in Randomized
    Smoothing for Adversarial Robustness" (NeurIPS 2024) decides "robust at
    radius r or not" with confidence sequences; Cullen, Montague and
    Rubinstein, "Halt Fast! Early Stopping for Certified Robustness" (2026)
    stop with anytime-valid E-processes; Waudby-Smith and Ramdas,
    "Estimating means of bounded random variables by betting" (JRSS-B
    2024) for confidence sequences from nonnegative supermartingales.

    Two stopping rules (neither affects validity):

    * ``radii`` given (certified accuracy at listed radii): levels 0 (predict
      rather than abstain: pA_lower >= 1/2) and each listed r > 0
      (pA_lower >= Phi(r / sigma)). Stop once the highest level is reached,
      or once the next level is out of reach: even if pA were the current
      upper bound, ``n_max`` samples would not certify it (the lower bound at
      the last look of a count of pA_upper * n_max stays below the level).
      The reported bound is the current lower bound, so the radius is at
      least the largest level reached, and below the next one.
      The upper bound that judges "out of reach" is the (1 - stop_alpha)
      Clopper-Pearson bound (``stop_alpha`` None: at ``look_alpha``), judged
      at the ``checkpoints`` only (more looks would give a level-based
      futility rule more chances to drop an image that CERTIFY certifies);
      levels that no stream of ``n_max`` samples can certify are out of
      reach at every look. ``Smooth.certify_sequential_many`` uses stop_alpha = 0.05
      (``RADII_STOP_ALPHA``): an image stops once fixed-N CERTIFY would
      certify the next level with small probability, instead of waiting
      until it is all but impossible, which on a Fashion-MNIST LeNet draws
      about a third fewer samples (docs/BENCHMARKS.md); like every stopping
      rule it leaves the guarantee intact.
    * ``radii`` None (a radius close to the fixed-N one, for ACR): stop once
      the current radius is within ``radius_tol`` of the best radius that
      ``n_max`` samples could give if pA were the current upper bound, or
      when that best radius is 0 (the image would be abstained on; judged at
      the checkpoints). The upper bound is Clopper-Pearson at ``look_alpha``
      (``"mixture"``: alpha * mixture_share; ``"spending"``: alpha_k), and
      the best includes the mixture sequence's bound at n_max.

    ``final_share``: the fraction of alpha spent on the last look (None: no
    special last look; ``"spending"`` then shares alpha equally by all
    looks, ``"mixture"`` gives the checkpoints all but mixture_share).
    ``Smooth.certify_sequential_many`` gives the last look half
    (``SEQUENTIAL_FINAL_SHARE``): the images that run to n_max are those
    close to a decision, where the last look's level matters most (there it
    costs log 2 in log(1 / alpha) against fixed-N CERTIFY, so the two agree
    on nearly every image), while the early looks decide the clear cases,
    whose sample count grows only with the log of 1 / (their level).
    ``checkpoints``: the looks for futility and for the spending part of
    ``"mixture"`` (None: every look but the last). ``mixture_share``: the
    mixture sequence's fraction of alpha (``MIXTURE_SHARE``).

    A single look (``looks`` of length 1, e.g. N-max at most one batch):
    both schemes report the exact Clopper-Pearson bound at the whole of
    alpha there, whatever the shares, i.e. fixed-N CERTIFY's bound.
    """

    def __init__(self, sigma: float, alpha: float, looks: Sequence[int], radii: Optional[Sequence[float]] = None,
                 radius_tol: float = 0.0, final_share: Optional[float] = None,
                 stop_alpha: Optional[float] = None, sequence: str = "mixture",
                 checkpoints: Optional[Sequence[int]] = None, mixture_share: float = MIXTURE_SHARE):
        if sequence not in ("mixture", "spending"):
            raise ValueError(f"sequence must be 'mixture' or 'spending', got {sequence!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if len(looks) == 0 or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] <= 0:
            raise ValueError(f"looks must be increasing positive sample sizes, got {list(looks)}")
        if radii is not None and any(r < 0 for r in radii):
            raise ValueError(f"radii must not be negative, got {list(radii)}")
        if radius_tol < 0:
            raise ValueError(f"radius_tol must not be negative, got {radius_tol}")
        self.sigma, self.alpha, self.looks = float(sigma), float(alpha), [int(n) for n in looks]
        self.n_max = self.looks[-1]
        self.radii = None if radii is None else sorted(set([0.0] + [float(r) for r in radii]))
        self.radius_tol = float(radius_tol)
        self.stop_alpha = stop_alpha
        self.sequence = sequence
        num = len(self.looks)
        # the looks where "out of reach" is judged and, in the mixture scheme, where the spending part
        # reports a Clopper-Pearson bound (all looks when None)
        self.checkpoints = sorted(set(int(n) for n in (checkpoints or self.looks)) & set(self.looks[:-1]))
        if sequence == "mixture":
            share = 0.0 if final_share is None else float(final_share)
            if not 0 <= share < 1 or not 0 < mixture_share <= 1 - share:
                raise ValueError(f"need 0 <= final_share < 1 and 0 < mixture_share <= 1 - final_share, "
                                 f"got {final_share}, {mixture_share}")
            if num == 1:
                # one look leaves nothing to be anytime-valid over: any split of alpha would only weaken
                # the bound, so the look gets CERTIFY's Clopper-Pearson bound at the whole of alpha
                share, mixture_share = 1.0, 0.0
            self.sequence_alpha = self.alpha * mixture_share   # 0: no mixture sequence (a single look)
            self.final_alpha = self.alpha * share   # 0: no Clopper-Pearson bound at the last look
            spent = self.alpha * (1 - share - mixture_share)
            self.checkpoint_alpha = spent / len(self.checkpoints) if self.checkpoints and spent > 0 else 0.0
            self._alphas = [self.sequence_alpha] * (num - 1) + [self.alpha * share or self.sequence_alpha]
        elif final_share is None or num == 1:
            self._alphas = [self.alpha / num] * num
        else:
            if not 0 < final_share < 1:
                raise ValueError(f"final_share must be in (0, 1), got {final_share}")
            self._alphas = [self.alpha * (1 - final_share) / (num - 1)] * (num - 1) + [self.alpha * final_share]

    def look_alpha(self, look: int) -> float:
        """The level of look k's Clopper-Pearson bound.

        ``spending``: alpha_k, and the alpha_k sum to alpha. ``mixture``: the last look's share of alpha
        at the last look; at the others the sequence's share (the level of the upper bounds that steer
        the ACR mode; no Clopper-Pearson lower bound is used there).
        """
        return self._alphas[look]

    def union_levels(self) -> List[float]:
        """The levels of the events whose union is "some reported lower bound exceeds pA"; they sum to alpha."""
        if self.sequence == "spending":
            return list(self._alphas)
        final = [self.final_alpha] if self.final_alpha > 0 else []
        spending = [self.checkpoint_alpha] * len(self.checkpoints) if self.checkpoint_alpha > 0 else []
        return ([self.sequence_alpha] if self.sequence_alpha > 0 else []) + spending + final

    def anytime_lower(self, look: int, count):
        """The lower bound of the anytime part at look k: P[it exceeds pA at some look] <= its share of alpha.

        ``spending``: Clopper-Pearson at alpha_k. ``mixture``: ``mixture_lower`` at alpha * mixture_share, and
        at a checkpoint the larger of it and Clopper-Pearson at the checkpoints' level.
        """
        if self.sequence == "spending":
            return cp_lower(count, self.looks[look], self.look_alpha(look))
        lower = mixture_lower(count, self.looks[look], self.sequence_alpha) if self.sequence_alpha > 0 \
            else np.zeros(np.shape(count))
        if self.checkpoint_alpha > 0 and self.looks[look] in self.checkpoints:
            lower = np.maximum(lower, cp_lower(count, self.looks[look], self.checkpoint_alpha))
        return lower

    def thresholds(self) -> np.ndarray:
        """pA_lower needed for each level of ``radii`` (1/2 for radius 0), increasing."""
        return np.array([0.5 if r == 0 else float(norm.cdf(r / self.sigma)) for r in self.radii])

    def radius(self, p_lower):
        """The radius of a lower bound (array or number); 0 where it abstains (p_lower < 1/2)."""
        p_lower = np.asarray(p_lower, dtype=float)
        return np.where(p_lower >= 0.5, self.sigma * norm.ppf(np.maximum(p_lower, 0.5)), 0.0)

    def _best_final_lower(self, p_upper):
        """The lower bound at the last look if the count there were p_upper * n_max."""
        last = len(self.looks) - 1
        return cp_lower(np.floor(np.asarray(p_upper) * self.n_max), self.n_max, self.look_alpha(last))

    def _ceiling(self) -> float:
        """The largest lower bound that the last look can report (all n_max samples cA)."""
        if not hasattr(self, "_ceiling_value"):
            best = float(self._best_final_lower(1.0))
            if self.sequence == "mixture" and self.sequence_alpha > 0:
                best = max(best, float(mixture_lower(np.array([self.n_max]), self.n_max, self.sequence_alpha)[0]))
            self._ceiling_value = best
        return self._ceiling_value

    def step(self, look: int, count):
        """After look k (``looks[k]`` samples, ``count`` of them cA): (stop, pA_lower at this look).

        ``count`` may be an array (one entry per image); then both results are arrays.
        """
        count = np.asarray(count)
        num = self.looks[look]
        alpha_k = self.look_alpha(look)
        lower = np.asarray(self.anytime_lower(look, count), dtype=float)
        if look == len(self.looks) - 1:
            if self.sequence == "mixture" and self.final_alpha > 0:
                # the union of two events of probability <= alpha (1 - share) and <= alpha share
                lower = np.maximum(lower, cp_lower(count, num, alpha_k))
            return np.ones_like(lower, dtype=bool), lower
        futile = num in self.checkpoints
        best = self._best_final_lower(cp_upper(count, num, alpha_k if self.stop_alpha is None else self.stop_alpha))
        if self.sequence == "mixture":
            # what n_max samples could give includes the sequence's own bound there
            best = np.maximum(best, mixture_lower(np.floor(cp_upper(
                count, num, alpha_k if self.stop_alpha is None else self.stop_alpha) * self.n_max),
                self.n_max, self.sequence_alpha))
        if self.radii is not None:
            thresholds = self.thresholds()
            reached = np.searchsorted(thresholds, lower, side="right")   # levels with lower >= threshold
            # levels that n_max samples cannot certify even if every one of them is cA are out of reach
            # whatever the data: stop at every look once the highest of the others is reached
            reachable = int(np.searchsorted(thresholds, self._ceiling(), side="right"))
            top = reached >= max(reachable, 1)
            following = thresholds[np.minimum(reached, len(thresholds) - 1)]
            return top | (futile & (best < following)), lower
        stop = (futile & (best < 0.5)) | (self.radius(lower) >= self.radius(best) - self.radius_tol)
        return stop, lower


class SequentialPredictor:
    """The decision logic of sequential PREDICT for one image: a pure function of its count stream.

    After look k (``looks[k]`` samples) the top two classes have counts
    nA >= nB. PREDICT's test (Hung et al., "Rank verification for
    exponential families", Annals of Statistics 2019: the two-sided binomial
    test of nA successes in nA + nB trials at p = 1/2) is run at level
    alpha_k = alpha / K; the run stops with the top class at the first look
    whose test rejects. Guarantee, as Cohen et al. state PREDICT's: with
    probability at least 1 - alpha the returned class is g(x) or ABSTAIN,
    whatever the stopping rule (union bound over the K fixed looks, each of
    which errs with probability at most alpha_k). The run also stops, and
    abstains, once the test cannot reject at ``looks[-1]`` samples even if
    the share of nA among nA + nB were its (1 - alpha_k) upper bound.
    """

    def __init__(self, alpha: float, looks: Sequence[int]):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha, self.looks = float(alpha), [int(n) for n in looks]

    def look_alpha(self, look: int) -> float:
        return self.alpha / len(self.looks)

    def step(self, look: int, count_a, count_b):
        """(stop, predict the top class) after look k with top-two counts nA >= nB (numbers or arrays)."""
        count_a, count_b = np.asarray(count_a), np.asarray(count_b)
        alpha_k = self.look_alpha(look)
        total = count_a + count_b
        decided = (total > 0) & (two_sided_binomial_pvalue(count_a, total) <= alpha_k)
        if look == len(self.looks) - 1:
            stop = np.ones_like(decided)
        else:
            # futility: the most optimistic share of nA, over the most top-two samples the last look can have
            share = cp_upper(count_a, np.maximum(total, 1), alpha_k)
            final_total = np.round(total * self.looks[-1] / self.looks[look])
            final_a = np.floor(share * final_total)
            hopeless = two_sided_binomial_pvalue(final_a, final_total) > self.look_alpha(len(self.looks) - 1)
            stop = decided | hopeless
        if stop.ndim == 0:
            return bool(stop), bool(decided)
        return stop, decided


def two_sided_binomial_pvalue(successes, trials):
    """The two-sided p-value of ``successes`` in ``trials`` fair coin flips (``binomtest(k, n, 0.5)``).

    For p = 1/2 the distribution is symmetric, so the p-value is 2 P[X <= min(k, n - k)], capped at
    1 (1 at k = n / 2); vectorised. 1 where ``trials`` is 0.
    """
    successes, trials = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    low = np.minimum(successes, trials - successes)
    return np.where(trials > 0, np.minimum(1.0, 2 * binom.cdf(low, np.maximum(trials, 1), 0.5)), 1.0)
