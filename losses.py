"""What gets learned: FLAVA's objectives and the step that runs them for each kind of batch.

FLAVA (arXiv 2112.04482) §3.2 trains image-text pairs with three multimodal objectives,
- global contrastive (GC): CLIP's InfoNCE (arXiv 2103.00020) whose all_gather passes gradients
  back to *every* rank, where CLIP only back-propagates the local part;
- masked multimodal modeling (MMM): predict the image tokenizer code of each masked patch and the word of
  each masked token from the multimodal encoder;
- image-text matching (ITM): say from [CLS_M] whether image and caption belong together;
and §3.3 adds the unimodal MIM (image-only batches) and MLM (text-only batches). FLIP (arXiv
2212.00794) makes the contrastive pass cheap by dropping patches. The file runs: the gather that keeps
gradients -> the contrastive loss -> masked prediction and ITM -> LossConfig -> the FLAVA step (FLAVALoss: the
random choices of a step, then the losses of each kind of batch; `pairs` reads as FLAVA §3.2's recipe).
Gradient accumulation that keeps every negative is in gradcache.py. Exercise it with
`python -m pytest tests/test_losses.py tests/test_distributed.py`.

Shapes follow model.py's legend. All masked-prediction losses ignore label -100 and are 0, not
NaN, when nothing is masked. Every tensor keeps a static shape (no boolean indexing), so a step
never waits on the GPU to know how many tokens were masked.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import distributed
import masking
from masking import IGNORE_INDEX
from model import LOGIT_SCALE_MAX

# ---------------------------------------------------------------------------------------------
# Global contrastive loss (FLAVA §3.2, CLIP §2.3, open_clip's local-rows x global-columns form)
# ---------------------------------------------------------------------------------------------


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
    return _AllGatherWithGrad.apply(x) if distributed.is_distributed() else x  # (W * n, E)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 without gradient: every rank's captions for the ITM negatives (small int tensors),
    and CLIP's local backprop (backprop="local"), whose gathered embeddings are constants (so W ranks do *not*
    reproduce one big batch; FLAVA §3.2 measured the global form better)."""
    if not distributed.is_distributed():
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
        rank = distributed.rank_and_world()[0]
        labels = torch.arange(n, device=image_emb.device) + rank * n  # (n,)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


# ---------------------------------------------------------------------------------------------
# Masked prediction (MIM, MLM, MMM), ITM and the codebook's health
# ---------------------------------------------------------------------------------------------


def masked_ce(logits, labels, divisor=None):
    """Mean cross-entropy over the positions whose label is not -100; exactly 0 when there are
    none (F.cross_entropy's mean would divide 0 by 0 and give NaN, TorchMultimodal's pitfall).
    `divisor` replaces the local count of labelled positions (FLAVALoss: see divisors)."""
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
class LossConfig:  # defaults: FLAVA's (its paper and TorchMultimodal's code); train.RECIPES["tiny"] sets its own
    keep_ratio: float = 1.0  # FLIP: share of patches the contrastive pass keeps (1.0 = FLAVA's unmasked pass)
    mask_ratio: float = 0.383  # BEiT: share of patches masked for MIM / MMM (FLAVA: 75 of 196)
    min_block: int = 0  # smallest BEiT block in patches; 0 scales BEiT's 16-of-196 to the grid
    mlm_prob: float = 0.15  # BERT: share of real text tokens masked for MLM (text-only batches)
    mmm_text_prob: float = 0.15  # share of a caption's tokens masked for MMM-text (FLAVA: as MLM's)
    itm_neg_prob: float = 0.1  # share of captions swapped for another row's: ITM's negatives (FLAVA's code: 0.1)
    masked_pass: str = "joint"  # "joint": FLAVA's one pass masking both; "split": each masked modality meets the other whole
    # share of a paired batch's *rows* that also take the masked pass (MMM + ITM); 1.0 = FLAVA. Not a share of
    # patches: that is mask_ratio (BEiT, the masked pass) or 1 - keep_ratio (FLIP, the contrastive pass)
    masked_pass_share: float = 1.0
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


class PairDraws(NamedTuple):
    """Every random choice of a paired step (FLAVALoss.draw_pairs), each a function of the step's seed and of a
    row's place in the global batch. n = the rows of this rank that take the masked pass."""
    keep_idx: torch.Tensor | None  # (B, K) FLIP: the patches the contrastive pass keeps (None: all, FLAVA)
    rows: torch.Tensor  # (n,) this rank's rows that take the masked pass (masked_pass_share of the batch)
    swap: torch.Tensor  # (n,) bool: ITM negative, the caption swapped for another row's (which really differs)
    masked_ids: torch.Tensor  # (n, L) the captions ITM judges (own or swapped), BERT-masked for MMM-text
    itm_attn: torch.Tensor  # (n, L) their attention masks
    text_labels: torch.Tensor  # (n, L) MMM-text's targets: the masked words (-100 elsewhere)
    patch_masked: torch.Tensor  # (n, P) bool: BEiT's block mask for MMM-image
    image_rows: torch.Tensor  # (n,) bool: rows whose MMM-image counts (joint: the matched ones; split: all)
    divisors: dict  # what each masked loss divides its sum by: the global batch's count (FLAVALoss.divisors)
    emb_grads: tuple | None = None  # gradcache.accumulate: dGC / d(image_emb, text_emb, logit_scale) of these rows


class ImageDraws(NamedTuple):
    patch_masked: torch.Tensor  # (B, P) bool: BEiT's block mask for MIM
    divisors: dict


class TextDraws(NamedTuple):
    masked_ids: torch.Tensor  # (B, L) BERT-masked ids for MLM
    labels: torch.Tensor  # (B, L) the masked words (-100 elsewhere)
    divisors: dict


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

    forward = draw (every random choice, eager: PairDraws, ImageDraws, TextDraws) then step (the computation:
    `pairs`, `images` or `texts`, compiled by --compile; compile_step says why the two are apart)."""

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
        """The named losses and their weighted `total` for one batch of one source (draws: given by gradcache)."""
        return self.step(source, batch, self.draw(source, batch, seed, first_row) if draws is None else draws)

    def step(self, source: str, batch: dict, draws) -> dict:
        if source == "pairs":
            losses = self.pairs(batch["image"], batch["ids"], batch["attn"], draws)
        elif source == "images":
            losses = self.images(batch["image"], draws)
        else:
            losses = self.texts(batch["attn"], draws)
        c = self.cfg
        weights = {"gc": c.gc_weight, "itm": c.itm_weight, "mmm_image": c.mmm_image_weight,
                   "mmm_text": c.mmm_text_weight, "mim": c.mim_weight, "mlm": c.mlm_weight}
        losses["total"] = sum(weights[name] * loss for name, loss in losses.items())
        return losses

    # -- paired batch: GC + ITM + MMM (FLAVA §3.2) --------------------------------------------

    def pairs(self, images_u8, ids, attn, draws: PairDraws):
        """FLAVA §3.2 on a paired batch: (1) the contrastive pass and GC, (2) the masked pass, (3) ITM, (4) MMM."""
        m, c, div = self.model, self.cfg, draws.divisors
        P, L = m.cfg.num_patches, ids.size(1)
        images = images_u8.float() / 255  # (B, 3, S, S) in [0, 1]

        # 1. Global contrastive loss on the unmasked pass ("without any masking", §3.2), FLIP dropping patches
        # of the image. Every row is a matched pair: ITM's swapped captions never enter these rows.
        whole = self.contrastive_pass(images, ids, attn, draws.keep_idx)  # Contrastive: (B, E) embeddings
        if draws.emb_grads is not None:  # a micro-batch of gradcache.accumulate: GC and its gradient w.r.t. the
            # embeddings and logit_scale are known; <x, dGC/dx> back-propagates exactly GC's gradient to the weights
            gc = sum((x * g).sum() for x, g in zip((whole.image_emb, whole.text_emb, m.logit_scale), draws.emb_grads))
        else:
            gc = contrastive_loss(whole.image_emb, whole.text_emb, m.logit_scale, c.backprop)

        # 2. The masked pass on the n rows of draw_pairs, each with the caption ITM judges (its own or, for a
        # negative, another row's). FLAVA ("joint") fuses the BEiT-masked image with the BERT-masked caption in
        # one pass and reads all three objectives from it. "split" predicts each masked modality from the other
        # one whole: the masked caption meets the contrastive pass's unmasked image states (MMM-text, and ITM,
        # as ALBEF's MLM and ITM read whole images), the masked image its own caption's (MMM-image).
        rows, swap, patch_masked = draws.rows, draws.swap, draws.patch_masked  # (n,), (n,), (n, P)
        codes = self.image_tokenizer.codebook_indices(images[rows])  # (n, P) targets: codes of the unmasked image
        unmasked = None
        if c.masked_pass == "split":  # the same pairs unmasked: the contrastive pass's pre-LN states
            unmasked = (whole.image.hidden[rows], whole.text.hidden[rows], attn[rows])  # (n, N, D), (n, L, D), (n, L)
        mm = m.forward_masked(images[rows], patch_masked, draws.masked_ids, draws.itm_attn, unmasked)  # Fused

        # 3. ITM: does this caption belong to this image? From [CLS_M], 1 = matched, 0 = swapped.
        itm = itm_loss(m.itm_head(mm.text[:, 0]), (~swap).long(), div["itm"])

        # 4. MMM: the codes of the masked patches and the masked words, from the multimodal states. Only matched
        # rows teach it (a swapped caption's words are not in its image); the filter is applied to the *labels*
        # (a filtered row's targets become -100), so no aligned tensor can be left unfiltered (Hugging Face's
        # bug #27855) and no shape changes.
        image_labels = torch.where(patch_masked & draws.image_rows[:, None], codes, IGNORE_INDEX)  # (n, P)
        text_labels = torch.where(~swap[:, None], draws.text_labels, IGNORE_INDEX)  # (n, L)
        mmm_image = masked_prediction(m.mmm_image_head, mm.image[:, 2 : 2 + P], image_labels, self.n_masked,
                                      div["mmm_image"])  # the patches: after [CLS_M] and [CLS_I]
        mmm_text = masked_prediction(m.mmm_text_head, mm.text[:, -L:], text_labels, self.k_mmm, div["mmm_text"])
        return {"gc": gc, "itm": itm, "mmm_image": mmm_image, "mmm_text": mmm_text}

    def contrastive_pass(self, images, ids, attn, keep_idx):
        """model.forward_contrastive, called through this module: under FSDP its root (this module) gathers the
        projections' weights only for its own methods (distributed.shard registers this one for gradcache)."""
        return self.model.forward_contrastive(images, ids, attn, keep_idx)

    # -- image-only batch: MIM (FLAVA §3.3, BEiT) ---------------------------------------------

    def images(self, images_u8, draws: ImageDraws):
        images = images_u8.float() / 255  # (B, 3, S, S) in [0, 1], the image tokenizer's input too
        codes = self.image_tokenizer.codebook_indices(images)  # the codes of the *unmasked* image (B, P)
        out = self.model.encode_image(images, patch_masked=draws.patch_masked).out  # (B, N, D)
        labels = torch.where(draws.patch_masked, codes, IGNORE_INDEX)  # (B, P): predict codes where hidden
        return {"mim": masked_prediction(self.model.mim_head, out[:, 1:], labels, self.n_masked,
                                         draws.divisors["mim"])}

    # -- text-only batch: MLM (FLAVA §3.3, BERT) ----------------------------------------------

    def texts(self, attn, draws: TextDraws):
        out = self.model.encode_text(draws.masked_ids, attn).out  # (B, L, D) from the BERT-masked ids (B, L)
        return {"mlm": masked_prediction(self.model.mlm_head, out, draws.labels, self.k_text, draws.divisors["mlm"])}

    # -- the random choices of a step --------------------------------------------------------

    @torch.compiler.disable  # stays eager even when the step around it is compiled: see compile_step
    def draw(self, source: str, batch: dict, seed: int, first_row: int | None = None):
        """Every random choice of the step (kept patches, ITM swaps, image and text masks) and the loss divisors.
        A row's choices depend on the seed (the same on every rank) and on its place in the global batch of
        W * B rows (this rank's start at first_row, default rank * B): each is drawn for the global batch and
        sliced, or per row, so W ranks draw what one process with all rows draws."""
        x = batch["image" if source == "images" else "ids"]
        B, device = x.size(0), x.device
        rank, world_size = distributed.rank_and_world()
        first = rank * B if first_row is None else first_row
        gen = torch.Generator(device).manual_seed(seed)
        if source == "pairs":
            return self.draw_pairs(batch["ids"], batch["attn"], seed, gen, first, world_size)
        if source == "images":
            patch_masked = self._block_mask(seed, range(first, first + B), device)  # (B, P)
            return ImageDraws(patch_masked, self.divisors(world_size, mim=patch_masked.sum()))
        if source == "texts":
            masked_ids, labels = self._text_mask(x, gen, (first, world_size * B), self.cfg.mlm_prob)  # (B, L) each
            return TextDraws(masked_ids, labels, self.divisors(world_size, mlm=labels.ne(IGNORE_INDEX).sum()))
        raise ValueError(f"unknown source {source!r}; expected pairs, images or texts")

    def draw_pairs(self, ids, attn, seed, gen, first, world_size) -> PairDraws:
        """The paired step's random choices, in one fixed order (so a seed gives the same step)."""
        c, B, P, device = self.cfg, ids.size(0), self.model.cfg.num_patches, ids.device
        total = world_size * B
        # FLIP: the patches the contrastive pass keeps (none dropped at keep_ratio 1: FLAVA).
        keep_idx = masking.random_keep(total, P, c.keep_ratio, device=device, generator=gen)[first : first + B] \
            if c.keep_ratio < 1 else None  # (B, K)
        # The masked pass may run on a share of the rows only (masked_pass_share): the contrastive loss gains
        # from every extra negative, MMM and ITM much less, and the masked pass costs more. Its n_all rows
        # j * total // n_all are spread evenly over the global batch; this rank holds those with j0 <= j < j1.
        j0, j1, n_all = self.masked_span(first, B, total)
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
        # MMM learns from the matched rows only, except MMM-image in the split pass, which reads every row's own
        # caption whole (the swap only changes what the masked caption meets).
        image_rows = torch.ones_like(swap) if c.masked_pass == "split" else ~swap  # (n,)
        divisors = self.divisors(world_size, mmm_image=(patch_masked & image_rows[:, None]).sum(),
                                 mmm_text=(text_labels.ne(IGNORE_INDEX) & ~swap[:, None]).sum())
        divisors["itm"] = n_all / world_size  # ITM: a mean over the n_all rows, known without asking the other ranks
        return PairDraws(keep_idx, rows, swap, masked_ids, itm_attn, text_labels, patch_masked, image_rows, divisors)

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

    def masked_span(self, first, count, total):
        """(j0, j1, n_all): of the masked pass's n_all rows j (global row j * total // n_all), those with
        j0 <= j < j1 lie in global rows first .. first + count - 1."""
        n_all = max(1, round(total * self.cfg.masked_pass_share))
        return -(-first * n_all // total), -(-(first + count) * n_all // total), n_all  # ceil: first j at or past a row

    @staticmethod
    def divisors(world_size, **counts):
        """A masked-prediction loss divides its sum by the labelled positions of the global batch (counts
        all_reduced, no gradient) / W: DDP's average of the W ranks' sum x W / count is then the global mean,
        where rank-local means would weigh positions by how few their rank drew. One process: the mean."""
        total = torch.stack(list(counts.values()))  # (k,) long
        if world_size > 1:
            dist.all_reduce(total)
        return dict(zip(counts, (total.clamp(min=1) / world_size).unbind()))
