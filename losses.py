"""What gets learned: FLAVA's objectives and the step that runs them for each kind of batch.

FLAVA (arXiv 2112.04482) §3.2 trains image-text pairs with three multimodal objectives,
- global contrastive (GC): CLIP's InfoNCE (arXiv 2103.00020) whose all_gather passes gradients
  back to *every* rank, where CLIP only back-propagates the local part;
- masked multimodal modeling (MMM): predict the image tokenizer code of each masked patch and the word of
  each masked token from the multimodal encoder;
- image-text matching (ITM): say from [CLS_M] whether image and caption belong together;
and §3.3 adds the unimodal MIM (image-only batches) and MLM (text-only batches). FLIP (arXiv
2212.00794) makes the contrastive pass cheap by dropping patches. Exercise it with `python -m pytest tests/test_losses.py`.

Shapes follow model.py's legend. All masked-prediction losses ignore label -100 and are 0, not
NaN, when nothing is masked. Every tensor keeps a static shape (no boolean indexing), so a step
never waits on the GPU to know how many tokens were masked.
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import masking
from masking import IGNORE_INDEX
from model import LOGIT_SCALE_MAX

# ---------------------------------------------------------------------------------------------
# Global contrastive loss (FLAVA §3.2, CLIP §2.3, open_clip's local-rows x global-columns form)
# ---------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of *every* rank's loss with
    respect to its own slice: the columns of rank r's logits hold rank s's embeddings, so rank
    s's embeddings receive gradient from every rank. Sum the gradients (all_reduce), keep ours."""

    @staticmethod
    def forward(ctx, x):  # x (n, E) -> (W * n, E)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # grad (W * n, E) -> (n, E)
        grad = grad.contiguous()
        dist.all_reduce(grad)  # SUM over ranks of dL_r / d(all embeddings)
        n = grad.size(0) // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all_gather along dim 0; the identity in a single process."""
    return _AllGatherWithGrad.apply(x) if _distributed() else x  # (W * n, E)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """CLIP-style local backprop: gathered embeddings are constants. Kept as the negative control
    of the distributed gradient test: with it, N ranks do *not* match one big batch."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)  # (W * n, E), no gradient


def contrastive_loss(image_emb, text_emb, logit_scale, backprop: str = "global"):
    """Symmetric InfoNCE over the global batch. image_emb, text_emb (n, E): this rank's
    L2-normalised embeddings of n matched pairs; logit_scale: the log-temperature parameter.

    Each rank scores its n rows against all W*n gathered columns (memory O(n * W * n), not
    O((W n)^2)); the positive of local row i is global column rank * n + i. With gradients through
    the gather and DDP's averaging, W ranks reproduce one process with the whole batch exactly."""
    gather = gather_with_grad if backprop == "global" else gather_no_grad
    with torch.autocast(image_emb.device.type, enabled=False):  # logits and softmax in fp32
        image_emb, text_emb = image_emb.float(), text_emb.float()
        all_image, all_text = gather(image_emb), gather(text_emb)  # (W * n, E)
        scale = logit_scale.float().clamp(0, LOGIT_SCALE_MAX).exp()
        logits_i2t = scale * image_emb @ all_text.T  # (n, W * n)
        logits_t2i = scale * text_emb @ all_image.T  # (n, W * n)
        n = image_emb.size(0)
        rank = dist.get_rank() if _distributed() else 0
        labels = torch.arange(n, device=image_emb.device) + rank * n  # (n,)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


# ---------------------------------------------------------------------------------------------
# Masked prediction (MIM, MLM, MMM), ITM and the codebook's health
# ---------------------------------------------------------------------------------------------


def masked_ce(logits, labels, divisor=None):
    """Mean cross-entropy over the positions whose label is not -100; exactly 0 when there are
    none (F.cross_entropy's mean would divide 0 by 0 and give NaN, TorchMultimodal's pitfall).
    `divisor` replaces the local count of labelled positions (FLAVALoss: see _divisors)."""
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels.ne(IGNORE_INDEX).sum().clamp(min=1) if divisor is None else divisor)


def masked_prediction(head, states, labels, k: int, divisor=None):
    """Apply `head` only where there is something to predict. states (B, T, D), labels (B, T)
    with -100 where nothing is hidden, k >= the most labelled positions a row can have. Each
    row's labelled positions are moved first (stable sort) and the first k are taken: a static
    (B, k) selection, so the head never runs over the whole sequence (a 30k-word vocabulary on
    every token would cost more than the encoder) and nothing synchronises with the host."""
    labelled = labels.ne(IGNORE_INDEX).to(torch.uint8)  # (B, T)
    idx = labelled.argsort(dim=1, descending=True, stable=True)[:, :k]  # (B, k)
    picked = states.gather(1, idx[..., None].expand(-1, -1, states.size(-1)))  # (B, k, D)
    return masked_ce(head(picked), labels.gather(1, idx), divisor)  # padding picks carry label -100


def itm_loss(logits, labels, divisor):
    """(B, 2) logits vs (B,) labels, 1 = matched, 0 = swapped: summed cross-entropy / divisor (B: the mean)."""
    return F.cross_entropy(logits, labels, reduction="sum") / divisor


@torch.no_grad()
def codebook_stats(codes, codebook_size: int):
    """Health of a codebook from a batch of codes: share of codes used and perplexity
    exp(entropy of the code histogram), which is codebook_size for perfectly even use."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"used": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item()}


# ---------------------------------------------------------------------------------------------
# The FLAVA step (FLAVA §3.2-3.3): one kind of batch per step, named losses out
# ---------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    keep_ratio: float = 1.0  # FLIP: share of patches the contrastive pass keeps (1.0 = FLAVA's unmasked pass)
    mask_ratio: float = 0.383  # BEiT: share of patches masked for MIM / MMM (FLAVA: 75 of 196)
    min_block: int = 0  # smallest BEiT block in patches; 0 scales BEiT's 16-of-196 to the grid
    mlm_prob: float = 0.15  # BERT: share of real text tokens masked for MLM (text-only batches)
    mmm_text_prob: float = 0.15  # share of a caption's tokens masked for MMM-text (FLAVA: as MLM's)
    itm_neg_prob: float = 0.5  # share of captions swapped for another row's to make ITM negatives (ALBEF, ViLT: 0.5)
    masked_pass: str = "split"  # "joint": FLAVA's one pass masking both; "split": each masked modality meets the other whole
    # share of a paired batch's *rows* that also take the masked pass (MMM + ITM); 1.0 = FLAVA. Not a share of
    # patches: that is mask_ratio (BEiT, the masked pass) or 1 - keep_ratio (FLIP, the contrastive pass)
    masked_pass_share: float = 0.5
    backprop: str = "global"  # "global": gradients through the all_gather (FLAVA); "local": CLIP's
    gc_weight: float = 1.0  # loss weights: all 1.0 in the paper and both public implementations
    itm_weight: float = 1.0
    mmm_image_weight: float = 1.0
    mmm_text_weight: float = 1.0
    mim_weight: float = 1.0
    mlm_weight: float = 1.0

    def __post_init__(self):
        problems = []
        if not 0 < self.keep_ratio <= 1:
            problems.append(f"keep_ratio={self.keep_ratio} must be in (0, 1]")
        if not 0 < self.mask_ratio < 1:
            problems.append(f"mask_ratio={self.mask_ratio} must be in (0, 1)")
        for name in ("mlm_prob", "mmm_text_prob"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be in (0, 1)")
        if not 0 < self.masked_pass_share <= 1:
            problems.append(f"masked_pass_share={self.masked_pass_share} must be in (0, 1]")
        if self.masked_pass not in ("joint", "split"):
            problems.append(f"masked_pass={self.masked_pass!r} must be 'joint' or 'split'")
        if not 0 <= self.itm_neg_prob < 1:
            problems.append(f"itm_neg_prob={self.itm_neg_prob} must be in [0, 1)")
        if self.backprop not in ("global", "local"):
            problems.append(f"backprop={self.backprop!r} must be 'global' or 'local'")
        if problems:
            raise ValueError("LossConfig: " + "; ".join(problems))


def compile_step(step):
    """torch.compile a FLAVA step: its computation (FLAVALoss.step), not its random draws. The draws
    (FLAVALoss.draw) stay eager: BEiT's block masks come from plain Python (random.Random), and a
    compiled frame holding the per-step seed or its generators would recompile at every step. Static
    shapes (dynamic=False) give one graph per kind of batch, and avoid an inductor failure seen with
    dynamic shapes (torch 2.11). Any other callable (bench.py's contrastive pass) is compiled whole."""
    module = getattr(step, "module", step)  # through DistributedDataParallel
    if isinstance(module, FLAVALoss):
        module.step = torch.compile(module.step, dynamic=False)
        return step
    return torch.compile(step, dynamic=False)


class FLAVALoss(nn.Module):
    """The FLAVA step as one module, so DistributedDataParallel sees a single forward.

    Holds the model (trained) and the frozen image tokenizer (whose codes are the image targets). Images
    arrive as uint8 (B, 3, S, S), text as ids and an attention mask (B, L); `seed` makes every
    random choice of the step (masks, kept patches, ITM swaps) a pure function of it, so a
    resumed run draws exactly what an uninterrupted one would have.

    forward = draw (every random choice, eager) then step (the computation: `images`, `texts` or `pairs`,
    compiled by --compile; compile_step says why the two are apart)."""

    def __init__(self, model, image_tokenizer, cfg: LossConfig, mask_id: int, special_ids):
        super().__init__()
        self.model, self.image_tokenizer, self.cfg = model, image_tokenizer.requires_grad_(False).eval(), cfg
        self.mask_id, self.special_ids = mask_id, tuple(special_ids)
        mcfg = model.cfg
        self.n_masked = max(1, round(cfg.mask_ratio * mcfg.num_patches))  # BEiT target per image
        self.min_block = cfg.min_block or masking.default_min_block(mcfg.num_patches)
        self.k_text = masking.max_text_masked(mcfg.text_len, cfg.mlm_prob)  # static bounds per row: MLM, MMM-text
        self.k_mmm = masking.max_text_masked(mcfg.text_len, cfg.mmm_text_prob)

    def forward(self, source: str, batch: dict, seed: int, first_row: int | None = None, draws=None):
        """The named losses and their weighted `total` for one batch of one source (draws: given by accumulate)."""
        return self.step(source, batch, self.draw(source, batch, seed, first_row) if draws is None else draws)

    @torch.compiler.disable  # stays eager even when the step around it is compiled: see compile_step
    def draw(self, source: str, batch: dict, seed: int, first_row: int | None = None) -> dict:
        """Every random choice of the step as tensors (kept patches, ITM swaps, image and text masks), and
        the loss divisors. A row's choices depend on the seed (the same on every rank) and on its place in
        the global batch of W * B rows (this rank's start at first_row, default rank * B): each is drawn for
        the global batch and sliced, or per row, so W ranks draw what one process with all rows draws."""
        x = batch["image" if source == "images" else "ids"]
        B, device = x.size(0), x.device
        world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
        first = rank * B if first_row is None else first_row
        gen = torch.Generator(device).manual_seed(seed)
        if source == "pairs":
            return self.draw_pairs(batch["ids"], batch["attn"], seed, gen, first, world)
        if source == "images":
            patch_masked = self._block_mask(seed, range(first, first + B), device)  # (B, P)
            return {"patch_masked": patch_masked, "divisors": self._divisors(world, mim=patch_masked.sum())}
        if source == "texts":
            masked_ids, labels = self._text_mask(x, gen, (first, world * B), self.cfg.mlm_prob)  # (B, L) each
            return {"masked_ids": masked_ids, "labels": labels,
                    "divisors": self._divisors(world, mlm=labels.ne(IGNORE_INDEX).sum())}
        raise ValueError(f"unknown source {source!r}; expected pairs, images or texts")

    def step(self, source: str, batch: dict, draws: dict) -> dict:
        div = draws["divisors"]
        if source == "pairs":
            losses = self.pairs(batch["image"], batch["ids"], batch["attn"], draws)
        elif source == "images":
            losses = self.images(batch["image"], draws["patch_masked"], div["mim"])
        else:
            losses = self.texts(draws["masked_ids"], batch["attn"], draws["labels"], div["mlm"])
        c = self.cfg
        weights = {"gc": c.gc_weight, "itm": c.itm_weight, "mmm_image": c.mmm_image_weight,
                   "mmm_text": c.mmm_text_weight, "mim": c.mim_weight, "mlm": c.mlm_weight}
        losses["total"] = sum(weights[name] * loss for name, loss in losses.items())
        return losses

    # -- helpers shared by the three kinds of batch ------------------------------------------

    def _block_mask(self, seed, global_rows, device):
        """BEiT masks of the images at these rows of the global batch, each from its own seed: a rank only
        pays for its own images, and an image's mask does not depend on which rank holds it."""
        seeds = [seed * 2**32 + g for g in global_rows]
        m = masking.block_mask(len(seeds), self.model.cfg.grid, self.n_masked, self.min_block, seeds=seeds)
        if device.type == "cuda":
            m = m.pin_memory()  # a pinned source lets the copy run without stalling the host
        return m.to(device, non_blocking=True)  # (B, P) bool

    def _text_mask(self, ids, gen, rows, prob):
        return masking.text_mask(ids, mask_id=self.mask_id, special_ids=self.special_ids, rows=rows,
                                 vocab_size=self.model.cfg.vocab_size, prob=prob, generator=gen)

    def _masked_span(self, first, count, total):
        """(j0, j1, n_all): of the masked pass's n_all rows j (global row j * total // n_all), those with
        j0 <= j < j1 lie in global rows first .. first + count - 1."""
        n_all = max(1, round(total * self.cfg.masked_pass_share))
        return -(-first * n_all // total), -(-(first + count) * n_all // total), n_all  # ceil: first j at or past a row

    @staticmethod
    def _divisors(world, **counts):
        """A masked-prediction loss divides its sum by the labelled positions of the global batch (counts
        all_reduced, no gradient) / W: DDP's average of the W ranks' sum x W / count is then the global mean,
        where rank-local means would weigh positions by how few their rank drew. One process: the mean."""
        total = torch.stack(list(counts.values()))  # (k,) long
        if world > 1:
            dist.all_reduce(total)
        return dict(zip(counts, (total.clamp(min=1) / world).unbind()))

    # -- image-only batch: MIM (FLAVA §3.3, BEiT) ---------------------------------------------

    def images(self, images_u8, patch_masked, divisor):
        images = images_u8.float() / 255  # (B, 3, S, S) in [0, 1], the image tokenizer's input too
        codes = self.image_tokenizer.codebook_indices(images)  # image-tokenizer codes of the *unmasked* image (B, P)
        out = self.model.encode_image(images, patch_masked=patch_masked).out  # (B, N, D), patch_masked (B, P)
        labels = torch.where(patch_masked, codes, IGNORE_INDEX)  # (B, P): predict codes where hidden
        return {"mim": masked_prediction(self.model.mim_head, out[:, 1:], labels, self.n_masked, divisor)}

    # -- text-only batch: MLM (FLAVA §3.3, BERT) ----------------------------------------------

    def texts(self, masked_ids, attn, labels, divisor):
        out = self.model.encode_text(masked_ids, attn).out  # (B, L, D) from the BERT-masked ids (B, L)
        return {"mlm": masked_prediction(self.model.mlm_head, out, labels, self.k_text, divisor)}

    # -- paired batch: GC + ITM + MMM (FLAVA §3.2) --------------------------------------------

    def draw_pairs(self, ids, attn, seed, gen, first, world):
        """The paired step's random choices, in one fixed order (so a seed gives the same step)."""
        c, B, P, device = self.cfg, ids.size(0), self.model.cfg.num_patches, ids.device
        total = world * B
        # FLIP: the patches the contrastive pass keeps (none dropped at keep_ratio 1: FLAVA).
        keep_idx = masking.random_keep(total, P, c.keep_ratio, device=device, generator=gen)[first : first + B] \
            if c.keep_ratio < 1 else None  # (B, K)
        # The masked pass may run on a share of the rows only (masked_pass_share): the contrastive loss gains
        # from every extra negative, MMM and ITM much less, and the masked pass costs more. Its n_all rows
        # j * total // n_all are spread evenly over the global batch; this rank holds those with j0 <= j < j1.
        j0, j1, n_all = self._masked_span(first, B, total)
        rows = torch.arange(j0, j1, device=device) * total // n_all - first  # (n,) local rows of the masked pass
        # ITM negatives: swap a share of captions for another sample's caption. The partner is uniform over
        # the *other* rows of the global batch (every rank's captions are gathered: small int tensors); the
        # label is 0 only if the swapped caption really differs.
        all_ids, all_attn = gather_no_grad(ids), gather_no_grad(attn.to(torch.uint8)).bool()  # (W B, L)
        swap = torch.rand(total, device=device, generator=gen) < c.itm_neg_prob  # (W B,)
        partner = (torch.arange(total, device=device) + torch.randint(1, max(total, 2), (total,), device=device,
                                                                      generator=gen)) % total  # (W B,), != own row
        partner, own_ids = partner[rows + first], ids[rows]  # (n,), (n, L)
        swap = swap[rows + first] & (all_ids[partner] != own_ids).any(dim=1)  # (n,)
        itm_ids = torch.where(swap[:, None], all_ids[partner], own_ids)  # (n, L) the captions ITM judges
        itm_attn = torch.where(swap[:, None], all_attn[partner], attn[rows])  # (n, L)
        patch_masked = self._block_mask(seed, [j * total // n_all for j in range(j0, j1)], device)  # (n, P)
        masked_ids, text_labels = self._text_mask(itm_ids, gen, (j0, n_all), c.mmm_text_prob)  # (n, L) each, 80/10/10
        # MMM learns from the matched rows only (a swapped caption's words are not in its image), except
        # MMM-image in the split pass, which reads every row's own caption.
        image_rows = torch.ones_like(swap) if c.masked_pass == "split" else ~swap  # (n,)
        divisors = self._divisors(world, mmm_image=(patch_masked & image_rows[:, None]).sum(),
                                  mmm_text=(text_labels.ne(IGNORE_INDEX) & ~swap[:, None]).sum())
        divisors["itm"] = n_all / world  # ITM: a mean over the n_all rows, known without asking the other ranks
        return {"keep_idx": keep_idx, "rows": rows, "swap": swap, "image_rows": image_rows, "itm_attn": itm_attn,
                "divisors": divisors,
                "patch_masked": patch_masked, "masked_ids": masked_ids, "text_labels": text_labels}

    def contrastive_pass(self, images, ids, attn, keep_idx):
        """model.forward_contrastive, called through this module: under FSDP its root (this module) gathers the
        projections' weights only for its own methods (train.shard registers this one for accumulate)."""
        return self.model.forward_contrastive(images, ids, attn, keep_idx)

    def pairs(self, images_u8, ids, attn, draws):
        m, c, div = self.model, self.cfg, draws["divisors"]
        P, L = m.cfg.num_patches, ids.size(1)
        images = images_u8.float() / 255  # (B, 3, S, S) in [0, 1]

        # 1. Contrastive pass on unmasked inputs (FLAVA), with FLIP dropping patches of the image.
        whole = self.contrastive_pass(images, ids, attn, draws["keep_idx"])
        image_emb, text_emb = whole.image_emb, whole.text_emb  # (B, E) each
        if "emb_grads" in draws:  # a micro-batch of `accumulate`: GC is known, and so is its gradient w.r.t. the
            # embeddings and logit_scale; <x, dGC/dx> back-propagates exactly GC's gradient to the weights
            gc = sum((x * g).sum() for x, g in zip((image_emb, text_emb, m.logit_scale), draws["emb_grads"]))
        else:
            gc = contrastive_loss(image_emb, text_emb, m.logit_scale, c.backprop)

        # 2. Masked multimodal modeling and ITM on the n rows of draw_pairs, each with the caption ITM judges
        # (its own, or for a negative another row's). FLAVA ("joint") runs one pass of the BEiT-masked image
        # with the BERT-masked caption and reads all three from it. "split" predicts each masked modality from
        # the other one whole: the masked caption meets the contrastive pass's unmasked image states (MMM-text,
        # and ITM on its [CLS_M], as ALBEF's MLM and ITM read whole images), the masked image meets the
        # contrastive pass's states of its own whole caption (MMM-image). One more fusion pass than FLAVA's.
        rows, swap, patch_masked = draws["rows"], draws["swap"], draws["patch_masked"]  # (n,), (n,), (n, P)
        codes = self.image_tokenizer.codebook_indices(images[rows])  # (n, P) the targets of the masked patches
        unmasked = None  # "joint": FLAVA's one fusion of both masked inputs
        if c.masked_pass == "split":  # the same pairs unmasked: the contrastive pass's states
            unmasked = (whole.image.hidden[rows], whole.text.hidden[rows], attn[rows])  # (n, N, D), (n, L, D), (n, L)
        mm = m.forward_masked(images[rows], patch_masked, draws["masked_ids"], draws["itm_attn"], unmasked)  # Fused
        itm = itm_loss(m.itm_head(mm.text[:, 0]), (~swap).long(), div["itm"])

        # The filter of what MMM learns from is applied to the *labels* of every aligned tensor at once (a
        # filtered row's targets become -100), so no tensor can be left unfiltered (Hugging Face's bug #27855)
        # and no shape changes.
        image_labels = torch.where(patch_masked & draws["image_rows"][:, None], codes, IGNORE_INDEX)  # (n, P)
        text_labels = torch.where(~swap[:, None], draws["text_labels"], IGNORE_INDEX)  # (n, L)
        mmm_image = masked_prediction(m.mmm_image_head, mm.image[:, 2 : 2 + P], image_labels, self.n_masked,
                                      div["mmm_image"])  # patches: after [CLS_M] and [CLS_I]
        mmm_text = masked_prediction(m.mmm_text_head, mm.text[:, -L:], text_labels, self.k_mmm, div["mmm_text"])
        return {"gc": gc, "itm": itm, "mmm_image": mmm_image, "mmm_text": mmm_text}


# ---------------------------------------------------------------------------------------------
# Gradient accumulation that keeps every negative (GradCache, Gao et al., arXiv 2101.06983)
# ---------------------------------------------------------------------------------------------


def split(loss_fn, source, batch, draws, size):
    """A local batch and its draws cut into micro-batches of `size` rows -> [(batch, draws)]. Each keeps what
    was drawn for its rows of the whole batch (and of the masked pass, row ranges by FLAVALoss._masked_span),
    and the whole step's divisors, so its masked losses are its share of the whole batch's mean."""
    B = len(batch["image" if source == "images" else "ids"])
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    j0 = loss_fn._masked_span(rank * B, B, world * B)[0]
    parts = []
    for a in range(0, B, size):
        rows = slice(a, a + size)
        if source == "pairs":
            ja, jb, _ = loss_fn._masked_span(rank * B + a, size, world * B)
            part = {k: v[ja - j0 : jb - j0] for k, v in draws.items() if k not in ("keep_idx", "divisors")}
            part["rows"] = part["rows"] - a  # (n,) rows of this micro-batch
            part["keep_idx"] = None if draws["keep_idx"] is None else draws["keep_idx"][rows]  # (size, K)
        else:
            part = {k: v[rows] for k, v in draws.items() if k != "divisors"}
        parts.append(({k: v[rows] for k, v in batch.items()}, {**part, "divisors": draws["divisors"]}))
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

    Masked losses are sums over positions divided by the whole batch's count (FLAVALoss._divisors), so their
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
            embs = [loss_fn.contrastive_pass(b["image"].float() / 255, b["ids"], b["attn"], d["keep_idx"])[2:]
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
            draws["emb_grads"] = grads[0][rows], grads[1][rows], grads[2] * last
        with _gradient_sync(step_fn, last):
            with autocast:
                losses = step_fn(source, micro, seed, draws=draws)
            backward(losses["total"])
        out = {k: out.get(k, 0) + v.detach() for k, v in losses.items()}
    if source == "pairs":  # report GC itself, not the surrogate <x, dGC/dx> the micro-steps back-propagated
        out["total"] = out["total"] + loss_fn.cfg.gc_weight * (gc.detach() - out["gc"])
        out["gc"] = gc.detach()
    return out
