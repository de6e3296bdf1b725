"""Multi-process tests (gloo, CPU): W processes with n samples each must give the loss and the (DDP-averaged)
gradients of one process with the whole batch of W * n samples.

First the global contrastive loss (FLAVA §3.2) alone, on the real towers (FLAVA.encode_image with FLIP
keep-indices, encode_text with padding, image_embed / text_embed, logit_scale) in float64, except the
contrastive head itself, which losses.py deliberately runs in fp32 (its logits and softmax: fp16 logits
at scale 100 overflow) -- hence tolerances of ~1e-5, not 1e-12. The negative control, CLIP's local backprop
(no gradient through the gather), must *fail* the same comparison (the recipe of open_clip's tests).
Then the whole FLAVA step (losses.FLAVALoss) of each kind of batch, every loss on: each rank must draw
exactly its rows of what one process draws, and divide its masked losses by the global counts (a
rank-local mean, the negative control, fails).

    python -m pytest tests/test_distributed.py
"""
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import losses
from conftest import join_ranks
import masking
from model import KMeansTokenizer, FLAVA, ModelConfig

CFG = dict(image_size=16, patch_size=4, width=32, heads=2, image_layers=1, text_layers=1,
           mm_layers=1, vocab_size=50, text_len=8, embed_dim=16, codebook_size=16,
           # With FLAVA's N(0, 0.02) every caption (and image) starts with nearly the same embedding: the loss
           # sits at ln(8), the gradients are ~1e-4 and fp32 rounding alone moves them by 1e-3 (measured by
           # permuting the batch). std 0.2 spreads the embeddings (loss ~4.1) and the rounding floor drops to 4e-7.
           init_std=0.2)
N_GLOBAL = 8  # global batch: W = 2 -> 4 per rank, W = 4 -> 2 per rank


def build_model(state=None):
    model = FLAVA(ModelConfig.from_preset("tiny", **CFG)).double()
    if state is not None:
        model.load_state_dict(state)
    return model


def global_batch():
    """A fixed batch of N_GLOBAL pairs: images, FLIP keep-indices, captions with padding."""
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **CFG)
    images = torch.rand(N_GLOBAL, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    keep_idx = masking.random_keep(N_GLOBAL, cfg.num_patches, 0.5, generator=g)  # (N, K)
    L = cfg.text_len
    ids = torch.randint(5, cfg.vocab_size, (N_GLOBAL, L), generator=g)
    lens = torch.randint(3, L + 1, (N_GLOBAL,), generator=g)
    attn = torch.arange(L)[None] < lens[:, None]
    ids[:, 0] = 2
    ids[torch.arange(N_GLOBAL), lens - 1] = 3
    ids[~attn] = 0
    return images, keep_idx, ids, attn


def gc_loss(model, images, keep_idx, ids, attn, backprop):
    """The contrastive pass of losses.FLAVALoss.pairs, with the keep-indices given instead of drawn."""
    image_emb = model.image_embed(model.encode_image(images, keep_idx=keep_idx)[1])  # (n, E)
    text_emb = model.text_embed(model.encode_text(ids, attn)[1])  # (n, E)
    return losses.contrastive_loss(image_emb, text_emb, model.logit_scale, backprop)


def initial_state():
    torch.manual_seed(0)
    model = build_model()
    with torch.no_grad():  # zero-initialised tokens would leave the FLIP positions untested
        for p in (model.image_encoder.cls_token, model.image_encoder.pos_embed):
            p.normal_(std=0.5)
        model.logit_scale.fill_(3.0)
    return model.state_dict()


def reference(state):
    """One process, the whole batch: loss and gradients."""
    model = build_model(state)
    loss = gc_loss(model, *global_batch(), backprop="global")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def join_gloo(rank, world, port):
    """This process as rank `rank` of a `world`-process gloo group on localhost, one thread (ranks share 2 cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def rank_batch(rank, world):
    """This rank's contiguous slice of step_batch(), as a DistributedSampler would give it -> (rows, batch)."""
    n = N_GLOBAL // world
    return n, {k: v[rank * n : (rank + 1) * n] for k, v in step_batch().items()}


def _worker(rank, world, port, state, out_path):
    join_gloo(rank, world, port)
    try:
        n = N_GLOBAL // world
        local = [t[rank * n : (rank + 1) * n] for t in global_batch()]  # contiguous slice, like a DistributedSampler
        results = {}
        for backprop in ("global", "local"):
            model = build_model(state)
            loss = gc_loss(model, *local, backprop=backprop)
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():  # DDP: all-reduce SUM, divide by W
                if p.grad is not None:
                    g = p.grad.clone()
                    dist.all_reduce(g)
                    grads[name] = g / world
            rank_losses = [torch.zeros((), dtype=loss.dtype) for _ in range(world)]
            dist.all_gather(rank_losses, loss.detach())
            results[backprop] = ([x.item() for x in rank_losses], grads)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, state, out_path, timeout=90, worker=_worker):
    """world gloo ranks, each building a tiny model and running a few forwards/backwards -> what they saved."""
    join_ranks(worker, (world, free_port(), state, str(out_path)), world, timeout, "their steps")
    return torch.load(out_path, weights_only=True)


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ranks_match_one_big_batch(world, tmp_path):
    """W ranks x n pairs == one process x W n pairs: mean rank loss and DDP-averaged gradients of every
    parameter (towers, projections, logit_scale); CLIP's no-gradient gather must fail the same check."""
    state = initial_state()
    ref_loss, ref_grads = reference(state)
    results = run_ranks(world, state, tmp_path / "ranks.pt")

    rank_losses, grads = results["global"]
    assert len(rank_losses) == world
    assert sum(rank_losses) / world == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and "logit_scale" in grads
    assert "image_encoder.pos_embed" in grads and "text_encoder.word_embed.weight" in grads
    for name, g in ref_grads.items():
        assert max_rel_err(grads[name], g) < 1e-5, name  # measured ~2e-7

    # Negative control: the same forward (same losses), but each rank's embeddings only get the gradient of
    # its own rows, so the tower gradients point elsewhere. logit_scale is local to every rank: still exact.
    rank_losses, grads = results["local"]
    assert sum(rank_losses) / world == pytest.approx(ref_loss, rel=1e-6)
    for name in ("image_projection.weight", "text_projection.weight", "image_encoder.pos_embed"):
        assert max_rel_err(grads[name], ref_grads[name]) > 0.1, name  # measured 0.4-1.0
    assert max_rel_err(grads["logit_scale"], ref_grads["logit_scale"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# The whole FLAVA step of each kind of batch

# Every loss weight at 1 (the default). The masked pass runs on 0.375 of the 8 rows, rows 0, 2 and 5: the
# ranks hold uneven shares of it (2 + 1 for W = 2; 1 + 1 + 1 + 0 for W = 4, a rank without a masked row).
LOSS = dict(keep_ratio=0.5, itm_neg_prob=0.5, masked_pass_share=0.375)
SEED = 12345


def flava_step(state):
    """losses.FLAVALoss on the model of `state` (in fp32: the step feeds it fp32 pixels) and an image tokenizer whose
    codes vary (a random codebook in pixel space)."""
    model = FLAVA(ModelConfig.from_preset("tiny", **CFG))
    model.load_state_dict(state)
    torch.manual_seed(1)
    image_tokenizer = KMeansTokenizer(model.cfg)
    with torch.no_grad():
        image_tokenizer.codebook.uniform_()
    return losses.FLAVALoss(model, image_tokenizer, losses.LossConfig(**LOSS), mask_id=4, special_ids=range(5))


def step_batch():
    images, _, ids, attn = global_batch()
    return {"image": (images * 255).round().to(torch.uint8), "ids": ids, "attn": attn}  # as data.collate gives


def one_step(state, source, batch):
    """The step's draws, its losses and every parameter's gradient (zeros where unused)."""
    loss_fn = flava_step(state)
    draws = loss_fn.draw(source, batch, SEED)
    out = loss_fn.step(source, batch, draws)
    out["total"].backward()
    return draws, {k: v.item() for k, v in out.items()}, [torch.zeros_like(p) if p.grad is None else p.grad
                                                          for p in loss_fn.model.parameters()]


def _step_worker(rank, world, port, state, out_path):
    join_gloo(rank, world, port)
    try:
        local, results = rank_batch(rank, world)[1], {}
        real_divisors = losses.FLAVALoss.divisors
        for run in ("pairs", "images", "texts", "control"):
            if run == "control":  # the negative control: each rank's masked losses a mean over its own positions
                losses.FLAVALoss.divisors = staticmethod(lambda world_size, **counts: real_divisors(1, **counts))
            draws, values, grads = one_step(state, "pairs" if run == "control" else run, local)
            for g in grads:  # DDP: all-reduce SUM, divide by W
                dist.all_reduce(g)
                g /= world
            gathered = [None] * world
            dist.all_gather_object(gathered, (draws._asdict(), values))  # plain dicts: torch.load's weights_only
            results[run] = (gathered, grads)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, masked_pass", [(2, "joint"), (4, "joint"), (2, "split")])
def test_gloo_ranks_match_one_big_batch_for_the_whole_step(world, masked_pass, tmp_path, monkeypatch):
    """Pairs (GC + ITM + MMM-image + MMM-text), images (MIM), texts (MLM), every loss on, FLIP keep 0.5, ITM
    negatives, a masked pass on part of the rows (FLAVA's joint one, or split): W ranks x n rows draw exactly
    the one process's draws for their rows (kept patches, masked-pass rows, ITM swaps, BEiT and BERT masks),
    their mean losses are the one process's losses and their DDP-averaged gradients its gradients. With
    rank-local means in the masked losses (the control) the MMM gradients differ."""
    monkeypatch.setitem(LOSS, "masked_pass", masked_pass)  # the forked ranks inherit it
    state, batch = initial_state(), step_batch()
    results = run_ranks(world, state, tmp_path / "ranks.pt", worker=_step_worker)
    names = [name for name, _ in build_model().named_parameters()]
    n = N_GLOBAL // world
    for source in ("pairs", "images", "texts"):
        ref_draws, ref_values, ref_grads = one_step(state, source, batch)
        gathered, grads = results[source]
        for key, ref in ref_draws._asdict().items():
            if torch.is_tensor(ref):  # rows are local: rank r's row i is global row r * n + i
                got = torch.cat([d[key] + (r * n if key == "rows" else 0) for r, (d, _) in enumerate(gathered)])
                assert torch.equal(got, ref), (source, key)
        if source == "pairs":
            assert 0 < int((~ref_draws.swap).sum()) < 3 and ref_draws.rows.tolist() == [0, 2, 5]
        for key, ref in ref_values.items():
            assert sum(v[key] for _, v in gathered) / world == pytest.approx(ref, rel=1e-5), (source, key)
        assert sum(bool(g.any()) for g in ref_grads) > 10
        for name, got, ref in zip(names, grads, ref_grads):
            assert max_rel_err(got, ref) < 1e-5 if ref.any() else not got.any(), (source, name)

    _, _, ref_grads = one_step(state, "pairs", batch)
    wrong = {name for name, got, ref in zip(names, results["control"][1], ref_grads) if max_rel_err(got, ref) > 1e-3}
    assert {"mmm_image_head.decoder.weight", "mmm_text_head.decoder.weight"} <= wrong


def test_gather_with_grad_is_identity_in_one_process():
    """Without a process group the gathers are the identity (one process = the whole batch)."""
    x = torch.randn(3, 4, requires_grad=True)
    assert losses.gather_with_grad(x) is x
    assert losses.gather_no_grad(x) is x
