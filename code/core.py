"""Certification and prediction of a smoothed classifier by Monte Carlo sampling.

The smoothed classifier of a base classifier f is
``g(x) = argmax_c P[f(x + e) = c]`` with ``e ~ N(0, sigma^2 I)``.
``Smooth.certify`` and ``Smooth.predict`` are CERTIFY and PREDICT of Cohen,
Rosenfeld and Kolter, "Certified Adversarial Robustness via Randomized
Smoothing" (ICML 2019); ``Smooth.sample_counts`` is the class-count
estimate that smoothed prediction stores for CAT-RS. The ``*_many`` methods
evaluate several images at once, with one ``torch.Generator`` per image
(``noise_streams.noise_generator``); each image's counts depend only on its
own generator, N and the batch size. The sequential variants are in
sequential.py, which builds on this module (``sequential.certify_sequential``
and ``predict_sequential`` take a ``Smooth``); the binomial statistics are in
binomial.py. How the engine draws and batches the noise is in docs/DESIGN.md.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import norm

from binomial import cp_lower, cp_upper, two_sided_binomial_pvalue  # noqa: F401 (re-exported)

# Samples per forward pass and intra-op thread on a CPU (see ``Smooth.forward_batch``).
CPU_FORWARD_BATCH_PER_THREAD = 128

Generators = Optional[Sequence[Optional[torch.Generator]]]


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
    """A smoothed classifier g around a base classifier f (Cohen et al., ICML 2019).

    ``certify(x, n0, n, alpha, batch_size)`` returns (cA, R): with probability
    at least 1 - alpha over the sampling, if cA is not ABSTAIN then
    g(x + d) = cA for every ||d||_2 < R. ``predict(x, n, alpha, batch_size)``
    returns a class that, with probability at least 1 - alpha, is g(x) (or
    ABSTAIN). Radii are in the units of the input (pixel values in [0, 1]),
    like sigma. With ``bf16`` the guarantees hold for the base classifier
    evaluated in bfloat16 autocast (a different, equally valid f); the other
    options change neither the samples' distribution nor which sample goes
    with which image, only the speed.
    """

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
                     generators: Generators = None) -> List[Tuple[int, float]]:
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
                     generators: Generators = None) -> List[int]:
        """``predict`` for each image of ``xs`` [G x C x H x W]; one generator per image."""
        results = []
        for counts in self.sample_counts_many(xs, n, batch_size, self._generators(xs, generators)):
            top2 = counts.argsort()[::-1][:2]
            count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
            if two_sided_binomial_pvalue(count1, count1 + count2) > alpha:
                results.append(Smooth.ABSTAIN)
            else:
                results.append(int(top2[0]))
        return results

    @staticmethod
    def lower_confidence_bound(num_a: int, num: int, alpha: float) -> float:
        """One-sided (1 - alpha) Clopper-Pearson lower bound on pA from ``num_a`` of ``num`` samples."""
        return float(cp_lower(num_a, num, alpha))

    # ------------------------------------------------------------------ sampling engine

    def sample_counts_many(self, xs: torch.Tensor, num: int, batch_size: int,
                           generators: Generators = None) -> np.ndarray:
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
