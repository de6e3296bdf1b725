"""What gets hidden: the three ways FLAVA + FLIP corrupt their inputs.

- `block_mask`: BEiT's block-wise image masking (Bao et al., arXiv 2106.08254 §2.5, used by FLAVA
  §3.2 for MIM and MMM). Masked patches are *replaced* by a learned mask token, so a code can be
  predicted at each of them.
- `text_mask`: BERT's masking (Devlin et al., arXiv 1810.04805 §3.1): 15% of the real tokens,
  of which 80% become [MASK], 10% a random word and 10% stay as they were.
- `random_keep`: FLIP's patch dropping (Li et al., arXiv 2212.00794 §3; MAE's argsort-of-noise
  trick, arXiv 2111.06377): a random subset of patches is *removed*, so the encoder's cost
  shrinks with it.

Each function takes an optional `torch.Generator` and is deterministic given it. Polarity: a
corruption mask is True where a token is hidden. Nothing here knows about the model.
Exercise it with `python -m pytest tests/test_masking.py`.
"""
import math
import random

import numpy as np
import torch

IGNORE_INDEX = -100  # labels of positions that carry no loss (F.cross_entropy's default)

# ---------------------------------------------------------------------------------------------
# BEiT block-wise masking
# ---------------------------------------------------------------------------------------------


def default_min_block(num_patches: int) -> int:
    """BEiT's minimum block of 16 patches is meant for a 14 x 14 grid (196 patches); keep the same
    share of the grid on smaller ones (8 x 8 -> 5), and never below 2 so blocks stay blocks."""
    return max(2, round(16 * num_patches / 196))


def _one_block_mask(rng: random.Random, G: int, target: int, min_block: int, log_aspect: tuple) -> np.ndarray:
    """BEiT's generator for one image: add rectangular blocks until `target` patches are masked.
    Each block: area ~ U(min_block, remaining), aspect log-uniform, up to 10 attempts to place
    one that adds between 1 and `remaining` new patches. Stops early when a block adds nothing,
    so the count never exceeds the target and is occasionally below it."""
    mask = np.zeros((G, G), dtype=bool)
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _attempt in range(10):
            area = rng.uniform(min_block, remaining)  # with min > remaining this draws in [remaining, min]
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < G and 0 < w < G):  # strict: a block never spans a whole row or column
                continue
            top, left = rng.randint(0, G - h), rng.randint(0, G - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block[...] = True
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def block_mask(batch: int, grid: int, num_masked: int, min_block: int | None = None,
               min_aspect: float = 0.3, generator: torch.Generator | None = None, seeds=None) -> torch.Tensor:
    """BEiT block-wise masks for a batch of images with a `grid` x `grid` patch grid.

    num_masked: target masked patches per image (BEiT/FLAVA: 75 of 196); min_block: smallest block
    (default scaled from BEiT's 16 on 14 x 14). Returns (B, P) bool on the CPU, row-major like the
    patches, True = masked. Per-image loops run in Python on a `random.Random` seeded from the
    generator: a few blocks per image, well under a millisecond each. With `seeds` (one int per
    image) mask i depends on seeds[i] alone: a shard of a batch draws what the batch draws for it."""
    P = grid * grid
    if not 0 <= num_masked < P:
        raise ValueError(f"block_mask: num_masked={num_masked} must be in [0, {P}) for a {grid}x{grid} grid")
    min_block = default_min_block(P) if min_block is None else min_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    rngs = [random.Random(s) for s in seeds] if seeds is not None else \
        [random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))] * batch  # one stream for all
    assert len(rngs) == batch, f"{len(rngs)} seeds for {batch} images"
    masks = [_one_block_mask(rng, grid, num_masked, min_block, log_aspect) for rng in rngs]
    return torch.from_numpy(np.array(masks, dtype=bool).reshape(batch, P))  # (B, P) bool, B may be 0


# ---------------------------------------------------------------------------------------------
# BERT text masking
# ---------------------------------------------------------------------------------------------


def text_mask(ids: torch.Tensor, *, mask_id: int, special_ids, vocab_size: int, prob: float = 0.15,
              generator: torch.Generator | None = None, rows: tuple | None = None):
    """BERT masking of a batch of token ids (B, L).

    Each row masks k = floor(prob * n + u), u ~ U(0, 1), of its n maskable tokens (never [PAD],
    [CLS], [SEP], [MASK] or another special), so the expected share is exactly `prob`, the count
    is fixed per row as in BERT's original data generation, and k >= 1 whenever n >= 1: no row
    ever contributes a NaN loss for lack of targets. Of the chosen positions 80% become [MASK],
    10% a random non-special token, 10% stay. Returns (masked_ids, labels), labels = the original
    id at chosen positions and IGNORE_INDEX elsewhere. Works on any device; `generator` must live
    on the same device as `ids`. rows = (first, total): ids are rows first .. first + B - 1 of a
    batch of `total`; noise is drawn for all and sliced, so a row is masked alike in any shard."""
    B, L = ids.shape
    dev = ids.device
    first, total = rows or (0, B)
    own = slice(first, first + B)  # this shard's rows of every draw
    specials = sorted(set(int(s) for s in special_ids if 0 <= int(s) < vocab_size))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    for s in specials:  # a few comparisons; no host -> device copy of a special-id tensor
        maskable &= ids != s  # (B, L)
    n = maskable.sum(dim=1)  # (B,)
    u = torch.rand(total, device=dev, generator=generator)[own]
    k = torch.where(n > 0, (prob * n + u).floor().clamp(min=1), torch.zeros_like(u)).long()  # (B,)
    k = torch.minimum(k, n)
    # Rank the maskable positions by noise; the first k of each row are chosen.
    noise = torch.rand(total, L, device=dev, generator=generator)[own].masked_fill(~maskable, 2.0)  # (B, L)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L): 0 = smallest noise
    chosen = rank < k[:, None]  # (B, L) bool, True = masked (a subset of maskable)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))  # (B, L)
    # 80 / 10 / 10 split of the chosen positions.
    r = torch.rand(total, L, device=dev, generator=generator)[own]
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    # Random replacements come from the non-special vocabulary only (HF may draw [CLS] or [PAD]):
    # draw from [0, V - #specials) and step over each special id in increasing order, a bijection
    # onto the non-special ids.
    random_ids = torch.randint(vocab_size - len(specials), (total, L), device=dev, generator=generator)[own]
    for s in specials:
        random_ids += (random_ids >= s).long()  # (B, L)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)  # (B, L)
    return masked, labels


def max_text_masked(text_len: int, prob: float = 0.15) -> int:
    """Upper bound on text_mask's per-row count k = floor(prob * n + u) with n <= text_len."""
    return math.floor(prob * text_len) + 1


# ---------------------------------------------------------------------------------------------
# FLIP random patch keeping
# ---------------------------------------------------------------------------------------------


def num_kept(num_patches: int, keep_ratio: float) -> int:
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1]")
    return max(1, round(num_patches * keep_ratio))


def random_keep(batch: int, num_patches: int, keep_ratio: float, device=None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the patches each image keeps: a uniformly random subset per sample, drawn as
    the first K of an argsort of uniform noise made on `device` (no host -> device copy per step,
    unlike open_clip's CPU noise). Every sample keeps the same K, so the batch stays rectangular
    and needs no attention mask. Returns (B, K) long, sorted so kept tokens stay in raster order."""
    K = num_kept(num_patches, keep_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)  # (B, P)
    keep = noise.argsort(dim=1)[:, :K]  # (B, K)
    return keep.sort(dim=1).values  # (B, K)
