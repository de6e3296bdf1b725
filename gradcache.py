"""Gradient accumulation that keeps every negative of the global contrastive loss: GradCache (Gao et al., arXiv
2101.06983; open_clip's --accum-freq), for paper-sized batches on a few GPUs (train.py --micro_batch).

Companion of losses.py and train.py. The masked losses are sums over positions divided by the whole batch's
count (losses.FLAVALoss.divisors), so their gradients simply add up over micro-batches. The contrastive loss does
not: each row's softmax runs over all the global batch's columns, and naive accumulation would shrink the
negatives to one micro-batch. Exercise it with `python -m pytest tests/test_accumulation.py`.
"""
import contextlib

import torch

import distributed
from losses import contrastive_loss



# losses.PairDraws' tensors with one row per row of the masked pass
MASKED_PASS_FIELDS = ("rows", "swap", "masked_ids", "itm_attn", "text_labels", "patch_masked", "image_rows")


def split(loss_fn, source, batch, draws, size):
    """A local batch and its draws cut into micro-batches of `size` rows -> [(batch, draws)]. Each keeps what
    was drawn for its rows of the whole batch (and of the masked pass, row ranges by FLAVALoss.masked_span),
    and the whole step's divisors, so its masked losses are its share of the whole batch's mean."""
    B = len(batch["image" if source == "images" else "ids"])
    rank, world_size = distributed.rank_and_world()
    j0 = loss_fn.masked_span(rank * B, B, world_size * B)[0]
    parts = []
    for a in range(0, B, size):
        rows = slice(a, a + size)
        if source == "pairs":  # the masked pass's rows of this micro-batch, and its kept patches
            ja, jb, _ = loss_fn.masked_span(rank * B + a, size, world_size * B)
            cut = {k: getattr(draws, k)[ja - j0 : jb - j0] for k in MASKED_PASS_FIELDS}
            cut["rows"] = cut["rows"] - a  # (n,) rows of this micro-batch
            part = draws._replace(**cut, keep_idx=None if draws.keep_idx is None else draws.keep_idx[rows])  # (size, K)
        else:
            part = draws._replace(**{k: v[rows] for k, v in draws._asdict().items() if k != "divisors"})
        parts.append(({k: v[rows] for k, v in batch.items()}, part))  # the divisors: the whole step's
    return parts


def _gradient_sync(step_fn, on: bool):
    """DDP all-reduces the gradients in every backward, except inside no_sync(). FSDP2 reduce-scatters them at every
    micro-step: they stay sharded, which is what FSDP is for (and its set_requires_gradient_sync(False) fails in
    torch 2.13 on a unit that no step has used yet: AttributeError '_unsharded_param')."""
    return step_fn.no_sync() if not on and hasattr(step_fn, "no_sync") else contextlib.nullcontext()


def accumulate(step_fn, source, batch, seed, micro_batch, backward, autocast=contextlib.nullcontext()):
    """One step of one source in micro-batches of `micro_batch` rows per rank (0, or the local batch or more: one
    forward) -> its named losses; the gradients are left in .grad. step_fn: a FLAVALoss, bare or under DDP or FSDP2;
    backward(loss) back-propagates (train.py scales the loss for fp16 first); autocast wraps the forwards only.

    Masked losses are sums over positions divided by the whole batch's count (losses.FLAVALoss.divisors), so their
    gradients simply add up over micro-batches. The contrastive loss does not: each row's softmax runs over all
    the global batch's columns, and naive accumulation would shrink the negatives to one micro-batch. GradCache
    (open_clip's --accum-freq) keeps them: (1) every micro-batch's contrastive pass runs without a graph and its
    embeddings are kept; (2) the global contrastive loss of the whole batch, across ranks through the gather, and
    its gradient w.r.t. the embeddings and logit_scale are computed from them; (3) each micro-batch runs again with
    its graph (contrastive pass, masked pass, ITM, MMM) and back-propagates <embeddings, that gradient> plus its
    share of the other losses. The cost is step (1): one more contrastive forward, without a graph. Every choice is
    drawn once for the whole batch and cut (split), so the step is the same whatever the split; DDP reduces the
    gradients at the last micro-step only."""
    loss_fn = getattr(step_fn, "module", step_fn)  # the FLAVALoss inside DDP
    if not micro_batch or micro_batch >= len(batch["image" if source == "images" else "ids"]):  # one forward
        with autocast:
            losses = step_fn(source, batch, seed=seed)
        backward(losses["total"])
        return losses
    with autocast:
        parts = split(loss_fn, source, batch, loss_fn.draw(source, batch, seed), micro_batch)
    if source == "pairs":  # (1) and (2)
        with torch.no_grad(), autocast:
            embs = [loss_fn.contrastive_pass(b["image"].float() / 255, b["ids"], b["attn"], d.keep_idx)[2:]
                    for b, d in parts]  # (image_emb, text_emb) of each micro-batch
        image_emb, text_emb = (torch.cat(e).requires_grad_() for e in zip(*embs))  # (B, E) each
        scale = loss_fn.model.logit_scale.detach().requires_grad_()
        gc = contrastive_loss(image_emb, text_emb, scale, loss_fn.cfg.backprop)
        grads = torch.autograd.grad(gc, (image_emb, text_emb, scale))  # (B, E), (B, E), ()
    out = {}
    for i, (micro, draws) in enumerate(parts):  # (3)
        last = i == len(parts) - 1
        if source == "pairs":  # this micro-batch's rows of the embedding gradients; logit_scale's once
            rows = slice(i * micro_batch, (i + 1) * micro_batch)
            draws = draws._replace(emb_grads=(grads[0][rows], grads[1][rows], grads[2] * last))
        with _gradient_sync(step_fn, last):
            with autocast:
                losses = step_fn(source, micro, seed, draws=draws)
            backward(losses["total"])
        out = {k: out.get(k, 0) + v.detach() for k, v in losses.items()}
    if source == "pairs":  # report GC itself, not the surrogate <x, dGC/dx> the micro-steps back-propagated
        out["total"] = out["total"] + loss_fn.cfg.gc_weight * (gc.detach() - out["gc"])
        out["gc"] = gc.detach()
    return out
