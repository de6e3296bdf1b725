"""Tests for train.py's optimizer and schedule: AdamW's weight-decay groups and the learning rate of each stage.
(Whole training runs are in test_reliability.py.)

    python -m pytest tests/test_train.py
"""
import math

import pytest

import checkpoints
import train
from model import FLAVA


def test_weight_decay_only_on_weight_matrices(tiny_cfg):
    """Every parameter sits in exactly one group; weight matrices (linear and stem weights, the heads) decay at
    --weight_decay; biases, LayerNorms, the cls / position / mask tokens, the word embeddings and logit_scale
    (decay would pull the temperature towards 1) do not."""
    model = FLAVA(tiny_cfg)
    decay, no_decay = train.make_optimizer(model, train.TrainConfig(weight_decay=0.3)).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    decayed = {name for name, p in model.named_parameters() if any(p is q for q in decay["params"])}
    for name in ("image_encoder.transformer.blocks.0.attn.qkv.weight", "image_encoder.patch_embed.stages.0.weight",
                 "text_encoder.transformer.blocks.1.mlp.fc2.weight", "mm_encoder.image_to_mm.weight",
                 "itm_head.pooler.weight", "mmm_text_head.decoder.weight", "image_projection.weight"):
        assert name in decayed, name
    assert not any(name.endswith(".bias") or ".ln" in name or "norm" in name for name in decayed)
    for name in ("image_encoder.cls_token", "image_encoder.pos_embed", "image_encoder.mask_token",
                 "mm_encoder.cls_token", "text_encoder.pos_embed", "text_encoder.word_embed.weight", "logit_scale"):
        assert name not in decayed, name
    assert len(decayed) == sum(p.dim() >= 2 for p in model.parameters()) - 6  # the 6 tokens / embeddings named


def test_lr_warmup_peak_cosine_floor_and_the_constant_unmasked_stage():
    """Linear warmup to --lr at the last warmup step, cosine down through the midpoint (lr + min_lr) / 2 to
    --min_lr at the stage's end (and never below); FLIP's unmasked stage holds --unmasked_lr throughout."""
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, unmasked_lr=3e-5)
    n = 110
    lrs = [train.lr_at(cfg, "joint", t, n) for t in range(n + 5)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) == max(lrs)  # 1/10 ... 10/10 of lr
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then falling
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert lrs[n] == pytest.approx(1e-4) and min(lrs) == pytest.approx(1e-4)  # the floor, held past the end
    assert lrs[n - 1] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 99 / 100)))
    assert train.lr_at(cfg, "unimodal", 9, n) == lrs[9]  # stage 2 has the same shape
    assert {train.lr_at(cfg, "unmasked", t, 20) for t in range(20)} == {3e-5}


def test_step_seed_is_the_same_on_every_rank_and_new_each_step():
    """The per-step seed depends on the run's seed and the step, nothing else (every rank draws for the global
    batch); different steps and different runs get different seeds."""
    seeds = {train.step_seed(s, t) for s in range(3) for t in range(1000)}
    assert len(seeds) == 3000
    # The formula itself is part of every checkpoint: a resumed run redraws its steps from it, so a change would
    # silently give a resumed run other masks than the run it continues. Pinned.
    assert [train.step_seed(0, 0), train.step_seed(1, 5), train.step_seed(7, 123_456)] == [0, 4_099_032_792, 29_199_132_223]



def test_a_cpu_run_never_touches_cuda_state(monkeypatch):
    """A CPU run on a machine with a GPU saves and restores no CUDA generator: reading it would initialise
    CUDA, which a forked process (the resume tests) cannot do."""
    import torch

    def forbidden(*args, **kwargs):
        raise AssertionError("CUDA touched by a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", forbidden)
    monkeypatch.setattr(torch.cuda, "set_rng_state", forbidden)
    state = checkpoints.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    checkpoints.set_rng_state({**state, "cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))
