"""Tests for masking.py: BEiT block masks, BERT 80/10/10 text masks, FLIP keep-indices.

Statistical checks draw thousands of masks with a fixed generator and use bounds several standard
deviations wide, so they are deterministic here and would still pass with other seeds.

    python -m pytest tests/test_masking.py
"""
import math

import numpy as np
import pytest
import torch

from masking import IGNORE_INDEX, block_mask, default_min_block, max_text_masked, num_kept, random_keep, text_mask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# BEiT block masks


def component_sizes(mask: np.ndarray):
    """Sizes of the 4-connected components of a (G, G) bool mask."""
    G = mask.shape[0]
    seen = np.zeros_like(mask)
    sizes = []
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        stack, size = [(i, j)], 0
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            size += 1
            for x, y in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= x < G and 0 <= y < G and mask[x, y] and not seen[x, y]:
                    seen[x, y] = True
                    stack.append((x, y))
        sizes.append(size)
    return sizes


def bounding_boxes(masks, G):
    """Height, width and is-a-filled-rectangle of each (B, P) mask viewed row-major as (B, G, G)."""
    m = masks.view(-1, G, G)
    ar = torch.arange(G)
    rows, cols = m.any(2), m.any(1)  # (B, G) each
    h = torch.where(rows, ar, -1).amax(1) - torch.where(rows, ar, G).amin(1) + 1
    w = torch.where(cols, ar, -1).amax(1) - torch.where(cols, ar, G).amin(1) + 1
    return h, w, m.sum((1, 2)) == h * w


@pytest.mark.parametrize("grid, target, min_block", [(8, 25, None), (14, 75, 16), (4, 6, None), (8, 40, 4)])
def test_block_mask_count_never_above_target_and_mean_close(grid, target, min_block):
    """BEiT's generator may stop short but never overshoots; on average it lands within 2% of the target."""
    masks = block_mask(2000, grid, target, min_block, generator=gen())
    assert masks.shape == (2000, grid * grid) and masks.dtype == torch.bool
    counts = masks.sum(1).float()
    assert counts.max() <= target
    assert counts.mean() >= 0.98 * target
    assert (counts == target).float().mean() > 0.6  # most masks hit the target exactly
    assert len({tuple(m.tolist()) for m in masks[:50]}) >= 40  # images get their own masks (4 x 4 grids repeat some)


def test_block_mask_edge_targets_and_validation():
    """num_masked = 0 masks nothing, P - 1 stays below P, and impossible targets are rejected."""
    assert not block_mask(8, 4, 0, generator=gen()).any()
    assert block_mask(200, 4, 15, generator=gen()).sum(1).max() <= 15
    for bad in (16, 17, -1):
        with pytest.raises(ValueError):
            block_mask(2, 4, bad)


@pytest.mark.parametrize("grid, target, min_block", [(8, 25, 10), (8, 25, None), (14, 75, 16)])
def test_block_mask_masks_blocks_of_at_least_min_block(grid, target, min_block):
    """Masked patches come in blocks: at least 95% of them lie in connected regions of >= min_block patches.

    BEiT's algorithm cannot promise 100%: a rounded h x w can fall below the drawn area, and the last
    block (when fewer than min_block patches remain) is smaller by design. Scattered or tiny blocks would
    put far more patches in small regions (measured: min_block=1 puts 13% below 10)."""
    min_block = min_block or default_min_block(grid * grid)
    masks = block_mask(1000, grid, target, min_block, generator=gen()).view(-1, grid, grid).numpy()
    in_small = sum(s for m in masks for s in component_sizes(m) if s < min_block)
    assert in_small / masks.sum() < 0.05


def test_block_mask_min_aspect_one_gives_exact_squares():
    """With aspect fixed to 1 and target = min_block = 9, each mask is one 3 x 3 square in the row-major grid."""
    G = 8
    masks = block_mask(500, G, 9, 9, min_aspect=1.0, generator=gen())
    h, w, is_rect = bounding_boxes(masks, G)
    assert is_rect.all() and (h == 3).all() and (w == 3).all()
    # Squares sit everywhere in the grid (placement is uniform over the 6 x 6 possible corners).
    top = masks.view(-1, G, G).any(2).float().argmax(1)
    left = masks.view(-1, G, G).any(1).float().argmax(1)
    assert set(top.tolist()) == set(range(6)) and set(left.tolist()) == set(range(6))


@pytest.mark.parametrize("min_aspect", [0.3, 0.6])
def test_block_mask_aspect_limits(min_aspect):
    """Block aspect ratios stay within [min_aspect, 1 / min_aspect] (up to integer rounding), reach near both
    ends, and are symmetric (log-aspect mean ~ 0: no systematic h/w swap)."""
    G = 32
    masks = block_mask(2000, G, 100, 100, min_aspect=min_aspect, generator=gen())  # mostly one 100-patch block
    h, w, is_rect = bounding_boxes(masks, G)
    aspect = (h / w)[is_rect].float()
    assert is_rect.float().mean() > 0.8
    assert aspect.max() <= 1.1 / min_aspect and aspect.min() >= min_aspect / 1.1
    assert aspect.max() >= 0.8 / min_aspect and aspect.min() <= 1.25 * min_aspect
    assert abs(aspect.log().mean().item()) < 0.05
    assert (aspect > 1).float().mean().item() == pytest.approx((aspect < 1).float().mean().item(), abs=0.05)


def test_block_mask_deterministic_given_generator():
    """The same generator seed gives the same masks; another seed gives other masks."""
    a = block_mask(16, 8, 25, generator=gen(5))
    assert torch.equal(a, block_mask(16, 8, 25, generator=gen(5)))
    assert not torch.equal(a, block_mask(16, 8, 25, generator=gen(6)))


def test_block_mask_with_a_seed_per_image_is_shard_independent():
    """With one seed per image, any shard of a batch gets exactly the masks the whole batch gets for its
    images (what lets W ranks draw what one process draws), still with BEiT's statistics; 0 images work."""
    seeds = [7 * 2**32 + g for g in range(64)]
    whole = block_mask(64, 8, 25, seeds=seeds)
    assert torch.equal(block_mask(16, 8, 25, seeds=seeds[16:32]), whole[16:32])
    assert torch.equal(block_mask(1, 8, 25, seeds=seeds[5:6]), whole[5:6])
    assert len({tuple(m.tolist()) for m in whole}) == 64 and whole.sum(1).float().mean() >= 0.98 * 25
    assert block_mask(0, 8, 25, seeds=[]).shape == (0, 64)


def test_default_min_block_scales_beit():
    """BEiT's 16 of 196 patches, the same share on smaller grids, never below 2."""
    assert default_min_block(196) == 16
    assert default_min_block(64) == 5
    assert default_min_block(16) == 2 and default_min_block(4) == 2


# ---------------------------------------------------------------------------------------------
# BERT text masks

V = 60
SPECIALS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID = 4


def text_batch(B, L, seed=0, min_len=3):
    """[CLS] words [SEP] [PAD]...; a few [UNK]/[MASK] sprinkled inside the words (specials must never be picked)."""
    g = gen(seed)
    ids = torch.randint(5, V, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < 0.05] = 1
    ids[torch.rand(B, L, generator=g) < 0.05] = MASK_ID
    lens = torch.randint(min_len, L + 1, (B,), generator=g)
    attn = torch.arange(L)[None] < lens[:, None]
    ids[:, 0] = 2
    ids[torch.arange(B), lens - 1] = 3
    ids[~attn] = 0
    return ids, attn


def is_special(ids, specials=SPECIALS):
    return torch.isin(ids, torch.tensor(specials))


def test_text_mask_labels_specials_and_unchosen_positions():
    """Labels are the original id where chosen and -100 elsewhere; specials are never chosen or changed."""
    ids, _ = text_batch(3000, 24)
    masked, labels = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(1))
    chosen = labels != IGNORE_INDEX
    assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == torch.long
    assert torch.equal(labels[chosen], ids[chosen])
    assert not (chosen & is_special(ids)).any()
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing changes outside the chosen positions


def test_text_mask_proportion_and_per_row_count():
    """Over many draws 15% of the maskable tokens are chosen; per row k is floor(0.15 n) or that + 1, >= 1."""
    B, L = 4000, 32
    ids = torch.randint(5, V, (B, L), generator=gen(2))
    ids[:, 0], ids[:, -1] = 2, 3  # n = 30 maskable tokens per row: 0.15 n = 4.5
    _, labels = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(3))
    k = (labels != IGNORE_INDEX).sum(1)
    assert set(k.tolist()) == {4, 5}
    assert k.float().mean().item() / 30 == pytest.approx(0.15, abs=0.003)  # std of the mean ~0.0012
    assert k.max() <= max_text_masked(L)  # the static bound losses.py relies on
    # Mixed lengths (n from 1 to 30): the overall share stays 0.15 where 0.15 n >= 1 (the min-1 rule lifts short rows).
    ids, attn = text_batch(4000, 32, seed=4, min_len=3)
    _, labels = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, prob=0.15, generator=gen(5))
    n = (~is_special(ids)).sum(1)
    k = (labels != IGNORE_INDEX).sum(1)
    long_rows = n >= 7
    assert k[long_rows].sum().item() / n[long_rows].sum().item() == pytest.approx(0.15, abs=0.005)
    assert (k <= max_text_masked(32)).all()


def test_text_mask_at_least_one_per_row_and_none_without_words():
    """Every row with a maskable token gets >= 1 target (no NaN rows); a row of specials gets none."""
    ids = torch.tensor([[2, 7, 3, 0, 0, 0],    # one word: always chosen
                        [2, 3, 0, 0, 0, 0],    # nothing maskable
                        [2, 4, 1, 3, 0, 0],    # only specials ([MASK], [UNK])
                        [2, 9, 8, 7, 6, 3]])
    for seed in range(50):
        masked, labels = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(seed))
        k = (labels != IGNORE_INDEX).sum(1)
        assert k[0] == 1 and labels[0, 1] == 7
        assert k[1] == 0 and k[2] == 0 and torch.equal(masked[1:3], ids[1:3])
        assert k[3] >= 1


def test_text_mask_80_10_10_split():
    """Of the chosen tokens 80% become [MASK], 10% a random word, 10% stay (the random word may repeat the original)."""
    ids, _ = text_batch(6000, 32, seed=6)
    masked, labels = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(7))
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    assert n > 12000
    share_mask = (masked[chosen] == MASK_ID).float().mean().item()
    share_same = (masked[chosen] == ids[chosen]).float().mean().item()
    share_random = 1 - share_mask - share_same
    non_special = V - len(SPECIALS)
    assert share_mask == pytest.approx(0.8, abs=0.015)
    assert share_same == pytest.approx(0.1 + 0.1 / non_special, abs=0.012)
    assert share_random == pytest.approx(0.1 * (1 - 1 / non_special), abs=0.012)


def test_text_mask_random_replacements_uniform_over_non_special_ids():
    """Random replacements never produce a special id, even when the specials are scattered (BERT vocab:
    0, 100-103), and cover every non-special id about equally."""
    vocab, specials, mask_id = 25, (0, 7, 13, 20), 13
    B, L = 8000, 16
    ids = torch.full((B, L), 5)  # every token the same non-special word: any other id is a random draw
    masked, labels = text_mask(ids, mask_id=mask_id, special_ids=specials, vocab_size=vocab, prob=0.5,
                               generator=gen(8))
    chosen = labels != IGNORE_INDEX
    drawn = masked[chosen & (masked != mask_id) & (masked != 5)]
    assert not is_special(drawn, specials).any()
    counts = torch.bincount(drawn, minlength=vocab).float()
    others = [i for i in range(vocab) if i not in specials and i != 5]  # 20 ids
    expected = drawn.numel() / len(others)
    assert expected > 250
    assert (counts[others] - expected).abs().max() < 0.25 * expected  # ~4 standard deviations
    assert counts[list(specials)].sum() == 0


def test_text_mask_deterministic_given_generator():
    """The same generator seed gives identical masks; another seed gives other masks."""
    ids, _ = text_batch(64, 24)
    a = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(9))
    b = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(9))
    c = text_mask(ids, mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V, generator=gen(10))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_text_mask_of_a_shard_is_the_whole_batch_mask_of_its_rows():
    """rows=(first, total): a shard's masks are the whole batch's masks of those rows, on every draw (which
    positions, 80/10/10, random words); without it a shard draws other masks."""
    ids, _ = text_batch(12, 16, seed=11)
    kw = dict(mask_id=MASK_ID, special_ids=SPECIALS, vocab_size=V)
    whole = text_mask(ids, generator=gen(12), **kw)
    for first, n in ((0, 4), (4, 4), (8, 4), (3, 1)):
        shard = text_mask(ids[first : first + n], generator=gen(12), rows=(first, 12), **kw)
        assert all(torch.equal(a, b[first : first + n]) for a, b in zip(shard, whole))
    alone = text_mask(ids[4:8], generator=gen(12), **kw)
    assert not torch.equal(alone[1], whole[1][4:8])


# ---------------------------------------------------------------------------------------------
# FLIP random keep


def test_random_keep_counts_unique_sorted():
    """(B, K) long indices, K = round(P * ratio) >= 1, strictly increasing (so unique) and inside [0, P)."""
    for P, ratio, K in ((64, 0.5, 32), (64, 0.25, 16), (196, 0.5, 98), (16, 0.01, 1), (16, 1.0, 16)):
        keep = random_keep(100, P, ratio, generator=gen())
        assert keep.shape == (100, K) and keep.dtype == torch.long and num_kept(P, ratio) == K
        assert keep.min() >= 0 and keep.max() < P
        assert (keep[:, 1:] > keep[:, :-1]).all()
    assert torch.equal(random_keep(3, 16, 1.0, generator=gen()), torch.arange(16).expand(3, 16))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            random_keep(2, 16, bad)


def test_random_keep_is_uniform():
    """Every patch is kept with probability K / P, and every pair with K (K-1) / (P (P-1)): uniform subsets,
    not e.g. a random contiguous window (which has the right marginals but not the right pairs)."""
    B, P, K = 6000, 16, 8
    keep = random_keep(B, P, K / P, generator=gen(11))
    onehot = torch.zeros(B, P).scatter_(1, keep, 1.0)  # (B, P)
    marginal = onehot.mean(0)
    assert (marginal - K / P).abs().max() < 0.03  # std ~0.0065
    pairs = (onehot.T @ onehot) / B  # (P, P)
    off = ~torch.eye(P, dtype=torch.bool)
    expected = K * (K - 1) / (P * (P - 1))
    assert (pairs[off] - expected).abs().max() < 0.03  # std ~0.0055
    assert len({tuple(r.tolist()) for r in keep[:200]}) > 190  # rows differ


def test_random_keep_deterministic_given_generator():
    """Same seed, same indices; another seed, other indices."""
    a = random_keep(8, 64, 0.5, generator=gen(1))
    assert torch.equal(a, random_keep(8, 64, 0.5, generator=gen(1)))
    assert not torch.equal(a, random_keep(8, 64, 0.5, generator=gen(2)))


def test_max_text_masked_bounds_every_row():
    """max_text_masked(L) >= floor(p n + u) for every n <= L: the static head size never drops a target."""
    for L in (8, 20, 32, 77):
        for p in (0.15, 0.4):
            assert max_text_masked(L, p) >= max(math.floor(p * n + 0.999999) for n in range(L + 1))
