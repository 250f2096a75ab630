"""Whole-word, n-gram and token masking for masked-language-model pretraining.

``lub_fast::wwm_mask`` picks the tokens an MLM predicts, as BERT's ``create_pretraining_data.py``
(Devlin et al. 2019) with whole-word masking (Cui et al., "Pre-Training with Whole Word Masking for
Chinese BERT", 2019/2021) and n-gram masking (ALBERT, Lan et al. 2020; ERNIE, Sun et al. 2019).
The reference ``wwm_mask_ref`` below is the specification; the C++ CPU kernel
(``csrc/wwm/wwm_core.cpp``) and any GPU kernel reproduce it bit for bit.

Per example (row ``b`` of a ``[B, T]`` batch):

1. Words. A maskable token starts a word when ``word_start`` is True, or when the token before it is
   not maskable (a continuation token right after [CLS] or [SEP] starts a word); every other
   maskable token continues the previous word. In ``token`` mode every maskable token is its own word.
   Non-maskable tokens ([CLS], [SEP], [PAD], padding) never belong to a word.
2. Units. ``token`` and ``whole_word``: each word is a unit. ``ngram``: the words are partitioned
   into units of 1 to 3 consecutive words, left to right: at word ``j`` (the first word not yet in
   a unit), with ``m = min(3, words left in j's run)``, where a run is a stretch of words with no
   non-maskable token between them, draw ``n`` in ``1..m`` with ``p(n) proportional to 1/n``
   (``m = 3``: 6/11, 3/11, 2/11; ``m = 2``: 2/3, 1/3), make words ``j .. j+n-1`` one unit and
   continue at ``j + n``. Units never overlap and never cross a special token.
3. Budget ``= min(round_half_even(rate * maskable_tokens), max_predictions)``.
4. Order. A Fisher-Yates shuffle of the ``U`` units, drawn lazily: at step ``i = 0, 1, ...`` swap
   unit ``i`` with unit ``i + below(r_i, U - i)``; unit ``i`` is then taken when its token count
   fits in what remains of the budget, else skipped. Steps stop when the budget is used up or the
   units run out. The budget is never exceeded and a word is never partly masked.
5. Action, once per taken unit: ``a = below(r, 10)``; ``a < 8`` (80%): every token becomes
   ``mask_token_id``; ``a == 8`` (10%): every token becomes a random id in
   ``[random_low, random_high)``, drawn per token; ``a == 9`` (10%): unchanged. Labels hold the
   original id at every taken token and -100 elsewhere.

Random numbers (the contract the kernels implement). ``mix64`` is SplitMix64's finalizer (Steele,
Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014); all arithmetic is
mod 2**64 with ``seed``, ``epoch`` and the example index taken as their two's-complement uint64::

    key     = mix64(mix64(mix64(seed ^ 0x6A09E667F3BCC908) ^ epoch) ^ example_index)
    r(s, c) = mix64(key + ((s << 32) + c + 1) * 0x9E3779B97F4A7C15)
    below(r, n) = ((r >> 32) * n) >> 32            # uniform in [0, n) for n < 2**32

with streams ``s`` and counters ``c``: 0 = n-gram length (``c`` = token position of the unit's
first word), 1 = shuffle (``c`` = step ``i``), 2 = action (``c`` = token position of the unit's first
token), 3 = random replacement (``c`` = token position). n-gram length: ``u = r >> 32``,
``n = 1 + (u >= t1) + (u >= t2)`` with ``t1 = (6 << 32) // 11, t2 = (9 << 32) // 11`` when
``m = 3``, ``t1 = (6 << 32) // 9, t2 = 2**32`` when ``m = 2``, and ``n = 1`` without a draw when
``m = 1``. Every number depends only on (seed, epoch, example index, position), never on the batch,
the thread count or the device.
"""

import warnings

import torch
from torch import Tensor

from lub_fast.ops._kernels import has_kernel

OPS = ("wwm_mask",)

MODES = ("token", "whole_word", "ngram")
IGNORE_INDEX = -100
MAX_NGRAM = 3

MASK64 = (1 << 64) - 1
SEED_SALT = 0x6A09E667F3BCC908
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
STREAM_NGRAM, STREAM_ORDER, STREAM_ACTION, STREAM_REPLACE = 0, 1, 2, 3
# uint32 thresholds of the n-gram length draw, p(n) proportional to 1/n: weights 6 : 3 : 2.
NGRAM_T3 = ((6 << 32) // 11, (9 << 32) // 11)
NGRAM_T2 = ((6 << 32) // 9, 1 << 32)


def mix64(z: int) -> int:
    """SplitMix64's output function (a bijection on uint64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def example_key(seed: int, epoch: int, index: int) -> int:
    """The 64-bit key of one example's random stream."""
    k = mix64((seed ^ SEED_SALT) & MASK64)
    k = mix64(k ^ (epoch & MASK64))
    return mix64(k ^ (index & MASK64))


def draw(key: int, stream: int, counter: int) -> int:
    """Random uint64 number ``counter`` of ``stream`` under ``key``."""
    return mix64((key + ((stream << 32) + counter + 1) * GOLDEN_GAMMA) & MASK64)


def below(r: int, n: int) -> int:
    """Map the uint64 ``r`` to [0, n) by the high 32 bits times ``n`` (``n < 2**32``)."""
    return ((r >> 32) * n) >> 32


def _check_args(input_ids, word_start, maskable, example_index, mode, rate, max_predictions,
                mask_token_id, random_low, random_high):
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"wwm_mask: input_ids must be a 2-D int64 tensor, got {input_ids.dim()}-D "
                         f"{input_ids.dtype}")
    for name, t in (("word_start", word_start), ("maskable", maskable)):
        if t.dtype != torch.bool or t.shape != input_ids.shape:
            raise ValueError(f"wwm_mask: {name} must be a bool tensor of input_ids' shape "
                             f"{tuple(input_ids.shape)}, got {t.dtype} {tuple(t.shape)}")
    if example_index.dtype != torch.int64 or example_index.shape != input_ids.shape[:1]:
        raise ValueError(f"wwm_mask: example_index must be an int64 tensor of shape "
                         f"[{input_ids.shape[0]}], got {example_index.dtype} {tuple(example_index.shape)}")
    if mode not in MODES:
        raise ValueError(f"wwm_mask: mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"wwm_mask: rate must be in [0, 1], got {rate}")
    if max_predictions < 0:
        raise ValueError(f"wwm_mask: max_predictions must be >= 0, got {max_predictions}")
    if mask_token_id < 0:
        raise ValueError(f"wwm_mask: mask_token_id must be >= 0, got {mask_token_id}")
    if not 0 <= random_low < random_high or random_high - random_low >= 1 << 32:
        raise ValueError(f"wwm_mask: random ids [random_low, random_high) must satisfy "
                         f"0 <= random_low < random_high and span < 2**32, got [{random_low}, {random_high})")


def mask_units(starts: list, maskable: list, key: int, mode: str) -> tuple[list, int]:
    """Steps 1-2 for one example given as lists: ``([(first token, token count), ...], maskable count)``."""
    words = []  # [first token, token count, first word of its run]
    n_maskable = 0
    previous = False
    for t in range(len(maskable)):
        if not maskable[t]:
            previous = False
            continue
        n_maskable += 1
        if mode == "token" or starts[t] or not previous:
            words.append([t, 1, not previous])
        else:
            words[-1][1] += 1
        previous = True

    if mode == "ngram":
        # run_end[j]: one past the last word of word j's run.
        run_end = [0] * len(words)
        end = len(words)
        for j in range(len(words) - 1, -1, -1):
            run_end[j] = end
            if words[j][2]:
                end = j
        units = []
        j = 0
        while j < len(words):
            m = min(MAX_NGRAM, run_end[j] - j)
            n = 1
            if m > 1:
                u = draw(key, STREAM_NGRAM, words[j][0]) >> 32
                t1, t2 = NGRAM_T3 if m == 3 else NGRAM_T2
                n = 1 + (u >= t1) + (u >= t2)
            last = words[j + n - 1]
            units.append((words[j][0], last[0] + last[1] - words[j][0]))
            j += n
    else:
        units = [(w[0], w[1]) for w in words]
    return units, n_maskable


def _mask_example(ids, starts, maskable, key, mode, rate, max_predictions, mask_token_id,
                  random_low, random_high):
    """Mask one example given as Python lists; returns (masked ids, labels) lists."""
    T = len(ids)
    units, n_maskable = mask_units(starts, maskable, key, mode)
    out = list(ids)
    labels = [IGNORE_INDEX] * T
    remaining = min(int(round(rate * n_maskable)), max_predictions)
    span = random_high - random_low
    U = len(units)
    i = 0
    while remaining > 0 and i < U:
        j = i + below(draw(key, STREAM_ORDER, i), U - i)
        units[i], units[j] = units[j], units[i]
        start, length = units[i]
        if length <= remaining:
            remaining -= length
            action = below(draw(key, STREAM_ACTION, start), 10)
            for t in range(start, start + length):
                labels[t] = ids[t]
                if action < 8:
                    out[t] = mask_token_id
                elif action == 8:
                    out[t] = random_low + below(draw(key, STREAM_REPLACE, t), span)
        i += 1
    return out, labels


def wwm_mask_ref(input_ids: Tensor, word_start: Tensor, maskable: Tensor, example_index: Tensor,
                 seed: int, epoch: int, mode: str, rate: float, max_predictions: int,
                 mask_token_id: int, random_low: int, random_high: int) -> tuple[Tensor, Tensor]:
    """Pure-Python reference of :func:`wwm_mask` (loops per example and token); the specification."""
    _check_args(input_ids, word_start, maskable, example_index, mode, rate, max_predictions,
                mask_token_id, random_low, random_high)
    out = torch.empty_like(input_ids)
    labels = torch.empty_like(input_ids)
    ids_rows = input_ids.tolist()
    start_rows = word_start.tolist()
    maskable_rows = maskable.tolist()
    for b, index in enumerate(example_index.tolist()):
        key = example_key(seed, epoch, index)
        o, lab = _mask_example(ids_rows[b], start_rows[b], maskable_rows[b], key, mode, rate,
                               max_predictions, mask_token_id, random_low, random_high)
        out[b] = torch.tensor(o, dtype=torch.int64)
        labels[b] = torch.tensor(lab, dtype=torch.int64)
    return out, labels


@torch.library.custom_op("lub_fast::wwm_mask", mutates_args=())
def _wwm_mask_op(input_ids: Tensor, word_start: Tensor, maskable: Tensor, example_index: Tensor,
                 seed: int, epoch: int, mode: str, rate: float, max_predictions: int,
                 mask_token_id: int, random_low: int, random_high: int) -> tuple[Tensor, Tensor]:
    return wwm_mask_ref(input_ids, word_start, maskable, example_index, seed, epoch, mode, rate,
                        max_predictions, mask_token_id, random_low, random_high)


@_wwm_mask_op.register_fake
def _(input_ids, word_start, maskable, example_index, seed, epoch, mode, rate, max_predictions,
      mask_token_id, random_low, random_high):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


def supports(input_ids: Tensor) -> bool:
    """True when a compiled kernel is registered for ``input_ids``' device (else the reference runs)."""
    return has_kernel("wwm_mask", input_ids.device.type)


_warned_devices = set()


def wwm_mask(input_ids: Tensor, word_start: Tensor, maskable: Tensor, example_index: Tensor, *,
             seed: int, epoch: int = 0, mode: str = "whole_word", rate: float = 0.15,
             max_predictions: int, mask_token_id: int, random_low: int,
             random_high: int) -> tuple[Tensor, Tensor]:
    """Choose MLM targets and corrupt them; returns ``(masked_ids, labels)``, both int64 ``[B, T]``.

    input_ids: int64 ``[B, T]``. word_start: bool ``[B, T]``, True at the first token of a word.
    maskable: bool ``[B, T]``, False at special tokens and padding (never masked).
    example_index: int64 ``[B]``, each row's dataset index: with ``seed`` and ``epoch`` it keys the
    row's random numbers, so a row's output does not depend on the batch, thread count or device.
    mode: ``"token"``, ``"whole_word"`` or ``"ngram"`` (1 to 3 words, p(n) proportional to 1/n).
    rate: fraction of maskable tokens to predict (rounded half to even), capped at
    ``max_predictions``. Each chosen unit is, once for the whole unit, 80% ``mask_token_id``, 10%
    random ids drawn uniformly from ``[random_low, random_high)`` (keep special ids out of that
    range), 10% unchanged. ``labels`` is the original id at chosen positions, -100 elsewhere.
    See the module docstring for the exact algorithm and random-number contract.
    """
    device = input_ids.device.type
    if device != "cpu" and device not in _warned_devices and not supports(input_ids):
        _warned_devices.add(device)
        warnings.warn(f"lub_fast: no wwm_mask kernel for {device} tensors; "
                      "running the Python reference", stacklevel=2)
    return torch.ops.lub_fast.wwm_mask(input_ids, word_start, maskable, example_index, seed, epoch,
                                       mode, rate, max_predictions, mask_token_id, random_low,
                                       random_high)
