"""Per-image noise streams: a ``torch.Generator`` whose stream depends only on (seed, key, index).

``noise_generator(seed, index, device, key)`` seeds a generator from
``numpy.random.SeedSequence(seed, spawn_key=(*key, index))``. Each image
(``index``) of a data set (``key``: empty, or the corruption of certify_c) then
draws its noise from its own stream, so its counts do not depend on which
other images share its forward passes, on how a data set is split among
processes, or on interruptions.

On a CPU the stream has full entropy: the 19937-bit state of torch's mt19937
is filled with words expanded from the seed sequence (``manual_seed`` keeps
only 32 bits of a seed, with which two images among a few hundred thousand
would share a stream). Filling the state means writing torch's
CPUGeneratorImplState record, whose layout is checked against a freshly
seeded generator before the first use. On other devices (CUDA's Philox) the
generator takes the 64-bit seed that ``manual_seed`` keeps in full; 1.3
million streams then collide with probability below 1e-7.
"""
from typing import Optional, Sequence

import numpy as np
import torch

# Layout of the CPU generator's state (``torch.Generator.get_state()``): torch's
# CPUGeneratorImplState, a legacy mt19937 record followed by the cached float normal.
_CPU_STATE_BYTES = 5056
_MT_WORDS = 624
_OFFSET_INITIAL_SEED, _OFFSET_LEFT, _OFFSET_SEEDED, _OFFSET_NEXT, _OFFSET_WORDS = 0, 8, 12, 16, 24
_cpu_state_template: Optional[np.ndarray] = None


def _mt19937_first_words(seed: int, count: int):
    """The first words of mt19937 seeded with ``seed``.

    w[0] = seed mod 2^32, w[i] = 1812433253 (w[i-1] ^ (w[i-1] >> 30)) + i mod 2^32.
    """
    words = [seed & 0xFFFFFFFF]
    for i in range(1, count):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + i) & 0xFFFFFFFF)
    return words


def _field(state: np.ndarray, offset: int, dtype) -> int:
    return state[offset:offset + np.dtype(dtype).itemsize].view(dtype)[0]


def _check_cpu_state_layout() -> np.ndarray:
    """A freshly seeded CPU state, after checking that its fields sit where ``noise_generator`` writes.

    Raises ``RuntimeError`` for a torch whose layout differs, instead of seeding a wrong stream.
    """
    global _cpu_state_template
    if _cpu_state_template is None:
        seed = 0x0123456789ABCDEF
        state = torch.Generator().manual_seed(seed).get_state().numpy().copy()
        fits = state.size == _CPU_STATE_BYTES
        if fits:
            words = state[_OFFSET_WORDS:_OFFSET_WORDS + 8 * _MT_WORDS].view(np.uint64)
            fits = (_field(state, _OFFSET_INITIAL_SEED, np.uint64) == seed
                    and _field(state, _OFFSET_LEFT, np.int32) == 1
                    and _field(state, _OFFSET_SEEDED, np.int32) == 1
                    and _field(state, _OFFSET_NEXT, np.uint64) == 0
                    and [int(w) for w in words[:3]] == _mt19937_first_words(seed, 3)
                    and int(words.max()) <= 0xFFFFFFFF)
        if not fits:
            raise RuntimeError(f"torch {torch.__version__} stores the CPU generator's state in a layout that "
                               "noise_streams.noise_generator does not know; update _check_cpu_state_layout and "
                               "noise_generator for it")
        _cpu_state_template = state
    return _cpu_state_template


def noise_generator(seed: int, index: int, device, key: Sequence[int] = ()) -> torch.Generator:
    """A generator on ``device`` whose stream depends only on (seed, key, index) and the device type.

    On a CPU: mt19937 with all 624 state words drawn by PCG64 from the seed
    sequence (word 0 holds only the top bit that mt19937 uses, set to 1 as
    numpy does, so the state is never all zero). Elsewhere: ``manual_seed``
    with 64 bits of the seed sequence.
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
