"""Keyed random draws for training: a counter-based hash of a per-sentence key (not in the paper).

Training draws random numbers per sentence: the Gumbel noise of Eq. (3) and prompt dropout (§4.2). They come
from a counter-based hash of the sentence's key (PromptRIS.forward's sample_keys; train.py builds them with
combine_keys(seed, epoch, image id, sentence)), not from a generator's stream: a sentence gets the same noise
whatever batch, micro-batch, process or device computes it, and a resumed run replays it from the key alone.
The hash is splitmix64 in wrapping int64 arithmetic: the same integers on CPU, CUDA and under torch.compile.
"""
import torch

_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's increment and multipliers, as signed int64
_MIX = (0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)
GUMBEL_STREAM, DROPOUT_STREAM = 1, 2  # one independent stream per kind of draw


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of int64 that spreads every input bit over the whole word."""
    x = (x ^ _shift_right(x, 30)) * _MIX[0]
    x = (x ^ _shift_right(x, 27)) * _MIX[1]
    return x ^ _shift_right(x, 31)


def combine_keys(*parts) -> torch.Tensor:
    """int64 key of a tuple, e.g. (seed, epoch, image id, sentence): int64 tensors (broadcast) or ints."""
    key = torch.zeros((), dtype=torch.int64)
    for part in parts:
        key = mix64(key + _GOLDEN + part)
    return key


def keyed_uniform(keys: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """keys (N,) int64 -> (N, n) float32 uniform in (0, 1): draw j of sentence i is a hash of (key_i, stream, j)."""
    counter = torch.arange(n, device=keys.device)
    offset = (stream * _GOLDEN + 2**63) % 2**64 - 2**63  # stream * golden, wrapped to int64 as the tensors wrap
    return unit_interval(mix64(mix64(keys[:, None] + offset) + counter * _GOLDEN))  # (N, n)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """int64 random bits -> float32 in (0, 1), never 0 or 1 (Gumbel's -log(-log u) must stay finite): the top 23
    bits x give (x + 1/2) / 2^23, exact in float32 (with 24 bits, x + 1/2 at x = 2^24 - 1 rounds up to 1)."""
    return (_shift_right(bits, 41).float() + 0.5) * 2.0 ** -23
