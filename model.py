"""The networks of FLAVA: three ViT-style encoders, their heads, and the image tokenizer.

FLAVA (Singh et al., arXiv 2112.04482) §3.1: an image encoder (ViT), a text encoder with *the same*
architecture over word pieces, and a multimodal encoder that fuses the two through learned
projections and its own [CLS_M] token. The masked-image targets are the codes of an image tokenizer:
FLAVA takes DALL-E's discrete VAE (arXiv 2102.12092; as BEiT, arXiv 2106.08254), nanoFLAVA learns a
patch quantiser by k-means (or loads DALL-E's encoder: pretrained.py). FLIP (Li et al., arXiv
2212.00794) adds one thing here: the image encoder can drop patches, so the contrastive pass only
pays for the patches it keeps.

This file runs from small parts to large ones: config -> attention, MLP, block -> encoders -> heads
-> FLAVA -> the image tokenizer -> presets. What is *hidden* lives in masking.py, what is *learned*
in losses.py; the published weights (import, export, DALL-E's encoder) in pretrained.py, FLOP counts
in flops.py, checkpoint files in checkpoints.py. Exercise it with `python -m pytest tests/test_model.py`.

Shape legend (used in every shape comment):
    B batch, P image patches (grid G x G), N = 1 + P image tokens (or 1 + K with FLIP keeping K),
    L text tokens, M = 1 + N + L multimodal tokens, D width, H heads, Dh = D / H head width,
    E contrastive embedding width, V text vocabulary, C image-tokenizer codebook size (MIM vocabulary).
Mask polarity: `*_masked` / `*_drop` are True where a token is hidden; `*_attn_mask` is True
where a token is real and may be attended (the convention of F.scaled_dot_product_attention).
"""
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    image_size: int = 64  # input resolution (square); must be divisible by patch_size
    patch_size: int = 8  # ViT patch side; one image-tokenizer code per patch
    stem: str = "conv"  # "linear": one Conv2d(k=p, s=p) (the paper); "conv": a small patch-local conv stem
    width: int = 128  # D, shared by all three encoders (FLAVA uses 768 everywhere)
    heads: int = 4  # H; width must be divisible by heads
    mlp_ratio: int = 4  # MLP hidden = mlp_ratio * D
    image_layers: int = 2  # depth of the image encoder (paper: 12)
    text_layers: int = 2  # depth of the text encoder (paper: 12)
    mm_layers: int = 2  # depth of the multimodal encoder (paper: 6); in 1, [CLS_M] reads tokens that never met
    vocab_size: int = 512  # V: word-piece vocabulary (set from the tokenizer at run time)
    text_len: int = 24  # L: fixed text length with padding (FLIP: 32, CLIP: 77; the world's captions: <= 23)
    embed_dim: int = 128  # E: contrastive embedding width (paper: 512; public code: 768)
    image_pool: str = "cls"  # contrastive image feature: "cls" = [CLS_I] (FLAVA), "mean" = mean of patch tokens (FLIP)
    codebook_size: int = 256  # C: image tokenizer codes = MIM / MMM-image vocabulary (DALL-E: 8192)
    image_tokenizer: str = "kmeans"  # MIM targets: "kmeans" (KMeansTokenizer, stage 1) or "dalle" (FLAVA's published)
    dalle_hidden: int = 256  # width of DALL-E's encoder (the published codebook: 256)
    dalle_blocks: int = 2  # residual blocks per group of DALL-E's encoder (the published codebook: 2)
    attn: str = "auto"  # "sdpa": F.scaled_dot_product_attention; "manual": explicit softmax; "auto": see Attention
    grad_ckpt: bool = False  # recompute each block in backward: less activation memory, ~30% more compute
    ln_eps: float = 1e-12  # LayerNorm epsilon (both public FLAVA implementations)
    init_std: float = 0.02  # N(0, 0.02) for weights (BERT / ViT / FLAVA)

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.width % self.heads:
            problems.append(f"width={self.width} is not divisible by heads={self.heads}")
        if self.stem not in ("linear", "conv"):
            problems.append(f"stem={self.stem!r} must be 'linear' or 'conv'")
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            problems.append(f"stem='conv' needs a power-of-two patch_size, got patch_size={self.patch_size}")
        if self.image_pool not in ("cls", "mean"):
            problems.append(f"image_pool={self.image_pool!r} must be 'cls' or 'mean'")
        if self.attn not in ("auto", "sdpa", "manual"):
            problems.append(f"attn={self.attn!r} must be 'auto', 'sdpa' or 'manual'")
        if self.image_tokenizer not in ("kmeans", "dalle"):
            problems.append(f"image_tokenizer={self.image_tokenizer!r} must be 'kmeans' or 'dalle'")
        for name in ("image_layers", "text_layers", "mm_layers", "width", "heads", "vocab_size", "text_len",
                     "embed_dim", "codebook_size", "dalle_hidden", "dalle_blocks"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.text_len < 3:
            problems.append(f"text_len={self.text_len} must leave room for [CLS], a word and [SEP]")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:  # G: patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:  # P
        return self.grid**2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"ModelConfig has no field(s) {bad}")
        return cls(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Transformer parts: attention, MLP, pre-LN block, encoder stack
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention honouring a key-padding mask, by SDPA or by an explicit softmax.

    "auto" takes SDPA (flash / memory-efficient kernels on CUDA) except for reduced precision on
    a CPU, where torch's CPU flash kernel is far slower than the three explicit ops (bf16 forward
    + backward at B=64, T=65, Dh=40: 47 ms vs 5 ms, measured on torch 2.13)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.mode = cfg.heads, cfg.attn
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)  # FLAVA keeps the qkv bias
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, Dh)
        # A key-padding mask (B, T) broadcasts over heads and queries: (B, 1, 1, T). Every sequence
        # here has a real [CLS] at position 0, so no query row is ever fully masked (no NaN rows).
        mask = attn_mask[:, None, None, :] if attn_mask is not None else None  # (B, 1, 1, T)
        manual = self.mode == "manual" or (self.mode == "auto" and q.is_cpu and q.dtype != torch.float32)
        if manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(dim=-1) @ v  # (B, H, T, Dh)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in ViT/BERT/FLAVA


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)). FLAVA §3.4 chose
    pre-norm because it stays stable at lr 1e-3 where BERT's post-norm does not."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))  # (B, T, D)


class Encoded(NamedTuple):
    """What an encoder returns: two views of its last states, each (B, T, D)."""
    hidden: torch.Tensor  # before the final LayerNorm: what the multimodal encoder fuses (FLAVA §3.1)
    out: torch.Tensor  # after it: what the heads and the contrastive projections read


class Transformer(nn.Module):
    """A stack of blocks plus the final LayerNorm -> Encoded(hidden, out)."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(depth))
        self.ln_f = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, x, attn_mask=None):
        for block in self.blocks:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return Encoded(x, self.ln_f(x))  # (B, T, D) pre-LN, (B, T, D) post-LN


# ---------------------------------------------------------------------------------------------
# The three encoders
# ---------------------------------------------------------------------------------------------


class ConvStem(nn.Module):
    """Patch embedding by a few stride-2 convolutions with kernel = stride, ending at the patch grid.

    Early convolutions make small ViTs learn shape much sooner (Xiao et al., arXiv 2106.14881).
    Kernel = stride keeps every patch's embedding a function of that patch's pixels alone, exactly
    like the paper's linear patch embedding, so a masked or dropped patch leaks nothing into its
    neighbours. Such a conv is a Linear on each 2 x 2 block of pixels (space-to-depth), which is how
    it runs here: as matmuls, 3-4x faster than a 2 x 2 convolution on a CPU. Channels double per
    stage, from D / 2**(stages-1) up to D."""

    @staticmethod
    def channels(cfg: ModelConfig):
        stages = int(math.log2(cfg.patch_size))
        return [3] + [max(cfg.width >> (stages - i), 16) for i in range(1, stages)] + [cfg.width]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        chans = self.channels(cfg)
        self.stages = nn.ModuleList(nn.Linear(4 * c_in, c_out) for c_in, c_out in zip(chans, chans[1:]))

    def forward(self, images):
        x = images.permute(0, 2, 3, 1)  # (B, S, S, 3) channels last
        for i, stage in enumerate(self.stages):
            B, H, W, C = x.shape
            x = x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(2, 3).reshape(B, H // 2, W // 2, 4 * C)  # 2 x 2 -> channels
            x = stage(x)  # (B, H / 2, W / 2, C_out)
            if i < len(self.stages) - 1:
                x = F.gelu(x)
        return x.permute(0, 3, 1, 2)  # (B, D, G, G)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # FLAVA normalises images with CLIP's statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(nn.Module):
    """ViT over patches with [CLS_I] and learned positions; BEiT masking and FLIP dropping.
    Takes pixels in [0, 1] (the image tokenizer's input too) and normalises them itself."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p, D = cfg.patch_size, cfg.width
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = ConvStem(cfg) if cfg.stem == "conv" else nn.Conv2d(3, D, kernel_size=p, stride=p)
        # Drawn from N(0, 0.02) in _init_weights (BEiT / timm), not zero as in FLAVA's code: see there.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.transformer = Transformer(cfg, cfg.image_layers)

    def forward(self, images, patch_masked=None, keep_idx=None):
        """images (B, 3, S, S) in [0, 1]; patch_masked (B, P) bool: BEiT replacement by the mask
        token; keep_idx (B, K) long: FLIP keeps only these patches. -> Encoded, (B, N, D) each."""
        images = (images - self.pixel_mean) / self.pixel_std  # (B, 3, S, S)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        B, P, D = x.shape
        if patch_masked is not None:
            # BEiT: a masked patch's embedding is *replaced* before positions are added, so the
            # model still knows where the hidden patch is and must say what it was.
            x = torch.where(patch_masked[..., None], self.mask_token.to(x.dtype), x)  # (B, P, D)
        x = x + self.pos_embed[:, 1:]  # (B, P, D)
        if keep_idx is not None:
            # FLIP/MAE: positions are added first, then the dropped patches leave the sequence,
            # so each kept token carries its own place and the encoder pays only for K tokens.
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, D))  # (B, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        return self.transformer(torch.cat([cls, x], dim=1))  # Encoded: 2 x (B, N, D)


class TextEncoder(nn.Module):
    """The same transformer over word pieces: word + position embeddings, LayerNorm (BERT's
    embedding), [CLS] at position 0 is the text's [CLS_T]; padding is never attended."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.text_len, cfg.width))
        self.ln_embed = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.transformer = Transformer(cfg, cfg.text_layers)

    def forward(self, ids, attn_mask):
        """ids (B, L) long, attn_mask (B, L) bool (True on real tokens)."""
        x = self.ln_embed(self.word_embed(ids) + self.pos_embed[:, : ids.size(1)])  # (B, L, D)
        return self.transformer(x, attn_mask)  # Encoded: 2 x (B, L, D)


class MultimodalEncoder(nn.Module):
    """Fuses the two modalities (FLAVA §3.1): each unimodal state goes through its own Linear,
    the lists are concatenated behind a learned [CLS_M], and self-attention mixes them. Output
    index map: 0 = CLS_M, 1 = CLS_I, 2 .. 1+P = patches, the last L = text."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_to_mm = nn.Linear(cfg.width, cfg.width)
        self.text_to_mm = nn.Linear(cfg.width, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.transformer = Transformer(cfg, cfg.mm_layers)

    def forward(self, image_hidden, text_hidden, text_attn_mask):
        """image_hidden (B, N, D), text_hidden (B, L, D): pre-final-LN states; text_attn_mask (B, L)."""
        B, N, _ = image_hidden.shape
        cls = self.cls_token.expand(B, -1, -1).to(image_hidden.dtype)  # (B, 1, D)
        x = torch.cat([cls, self.image_to_mm(image_hidden), self.text_to_mm(text_hidden)], dim=1)  # (B, M, D)
        # Text padding stays masked in the fusion too (TorchMultimodal forgets it, issue #530).
        real = torch.ones(B, 1 + N, dtype=torch.bool, device=x.device)  # (B, 1 + N)
        return self.transformer(x, torch.cat([real, text_attn_mask], dim=1)).out  # (B, M, D) post-LN


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


class MaskedPredictionHead(nn.Module):
    """Linear -> GELU -> LayerNorm -> Linear to the vocabulary (BERT's MLM head). FLAVA has four
    of these and ties none of them to an embedding."""

    def __init__(self, cfg: ModelConfig, vocab: int):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.decoder = nn.Linear(cfg.width, vocab)

    def forward(self, x):
        return self.decoder(self.ln(F.gelu(self.dense(x))))  # (..., vocab)


class ITMHead(nn.Module):
    """Image-text matching: BERT-style pooler (Linear + tanh) on CLS_M, then two logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooler = nn.Linear(cfg.width, cfg.width)
        self.classifier = nn.Linear(cfg.width, 2)

    def forward(self, cls_m):
        return self.classifier(torch.tanh(self.pooler(cls_m)))  # (B, 2)


# ---------------------------------------------------------------------------------------------
# FLAVA
# ---------------------------------------------------------------------------------------------

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's temperature 0.07
LOGIT_SCALE_MAX = math.log(100.0)  # clamp to [0, ln 100]: the scale stays in [1, 100]


class Contrastive(NamedTuple):
    """FLAVA.forward_contrastive: both towers on the unmasked inputs."""
    image: Encoded  # (B, N, D) each; N = 1 + K when FLIP keeps K patches
    text: Encoded  # (B, L, D) each
    image_emb: torch.Tensor  # (B, E) L2-normalised, fp32
    text_emb: torch.Tensor  # (B, E)


class Fused(NamedTuple):
    """FLAVA.forward_masked: the multimodal encoder's states that each masked objective reads."""
    image: torch.Tensor  # (n, M, D): MMM-image reads the masked patches from it
    text: torch.Tensor  # (n, M, D): MMM-text reads the masked words, ITM its [CLS_M] (split: N may be 1 + K)


class FLAVA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.mm_encoder = MultimodalEncoder(cfg)
        # Global contrastive (§3.2): token 0 of each final-LN output -> Linear -> L2 normalise.
        self.image_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        # Masked prediction (§3.2-3.3): unimodal MIM / MLM and multimodal MMM-image / MMM-text.
        self.mim_head = MaskedPredictionHead(cfg, cfg.codebook_size)
        self.mlm_head = MaskedPredictionHead(cfg, cfg.vocab_size)
        self.mmm_image_head = MaskedPredictionHead(cfg, cfg.codebook_size)
        self.mmm_text_head = MaskedPredictionHead(cfg, cfg.vocab_size)
        self.itm_head = ITMHead(cfg)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # BERT/ViT/FLAVA: N(0, 0.02) weights, zero biases, unit LayerNorms. `apply` visits children
        # before their parent, so the module-level rules below override the generic ones.
        std = self.cfg.init_std
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ConvStem):
            # A CNN stem keeps its activations' scale only with fan-in (He) init; N(0, 0.02) would
            # shrink them ~10x per stage and leave the patch tokens near zero.
            for stage in m.stages:
                nn.init.kaiming_normal_(stage.weight, nonlinearity="relu")
        elif isinstance(m, (ImageEncoder, TextEncoder, MultimodalEncoder)):
            # FLAVA's code starts [CLS_I], [CLS_M], the mask token and the image positions at zero.
            # A token that enters the first LayerNorm as an exact zero vector gets a gradient scaled by
            # 1 / sqrt(eps) = 1e6 (eps 1e-12): at init the mask token's gradient norm was 8e4, and
            # clipping that total norm to 1 froze every other parameter. BEiT / timm's N(0, 0.02) avoids it.
            for name in ("cls_token", "pos_embed", "mask_token"):
                if hasattr(m, name):
                    nn.init.normal_(getattr(m, name), std=std)

    # The three encoders, exposed for the losses and for evaluation.
    def encode_image(self, images, patch_masked=None, keep_idx=None) -> Encoded:
        return self.image_encoder(images, patch_masked, keep_idx)  # 2 x (B, N, D)

    def encode_text(self, ids, attn_mask) -> Encoded:
        return self.text_encoder(ids, attn_mask)  # 2 x (B, L, D)

    def encode_multimodal(self, image_hidden, text_hidden, text_attn_mask):
        return self.mm_encoder(image_hidden, text_hidden, text_attn_mask)  # (B, M, D)

    # Contrastive embeddings from a final-LN output; normalised in fp32 (fp16 normalise can NaN).
    def image_embed(self, image_out):
        # FLAVA reads [CLS_I]; FLIP averages the (kept) patch tokens instead (global average pooling).
        feature = image_out[:, 1:].mean(dim=1) if self.cfg.image_pool == "mean" else image_out[:, 0]  # (B, D)
        return F.normalize(self.image_projection(feature).float(), dim=-1)  # (B, E)

    def text_embed(self, text_out):
        return F.normalize(self.text_projection(text_out[:, 0]).float(), dim=-1)  # (B, E)

    # The two passes of a paired batch (FLAVA §3.2); losses.FLAVALoss turns them into named losses.
    def forward_contrastive(self, images, ids, attn_mask, keep_idx=None) -> Contrastive:
        """The contrastive pass: images (B, 3, S, S) in [0, 1] and their captions, unmasked; FLIP's keep_idx
        (B, K) keeps only those patches. Its unimodal states also serve the split masked pass."""
        image = self.encode_image(images, keep_idx=keep_idx)  # 2 x (B, N, D)
        text = self.encode_text(ids, attn_mask)  # 2 x (B, L, D)
        return Contrastive(image, text, self.image_embed(image.out), self.text_embed(text.out))

    def forward_masked(self, images, patch_masked, masked_ids, attn_mask, whole=None) -> Fused:
        """The masked multimodal pass of n pairs: images (n, 3, S, S) with BEiT's patch_masked (n, P), captions
        BERT-masked (masked_ids, attn_mask: (n, L)). FLAVA fuses the two masked inputs in one pass (whole=None).
        With whole = (image states, caption states, caption attn_mask) of the same pairs unmasked (pre-LN, from
        the contrastive pass), each masked modality meets the other one whole instead, in two passes: the
        masked caption with the whole image (MMM-text and ITM), the masked image with the whole caption."""
        masked_image = self.encode_image(images, patch_masked=patch_masked).hidden  # (n, N, D) pre-LN
        masked_text = self.encode_text(masked_ids, attn_mask).hidden  # (n, L, D) pre-LN
        if whole is None:
            mm = self.encode_multimodal(masked_image, masked_text, attn_mask)  # (n, M, D)
            return Fused(image=mm, text=mm)
        whole_image, whole_text, whole_attn = whole
        mm_text = self.encode_multimodal(whole_image, masked_text, attn_mask)  # (n, M, D), M = 1 + (1 + K) + L
        return Fused(image=self.encode_multimodal(masked_image, whole_text, whole_attn), text=mm_text)

    def image_embeddings(self, images):
        """Unmasked, L2-normalised image embeddings for evaluation (FLIP: infer on the full image)."""
        return self.image_embed(self.encode_image(images).out)  # (B, E)

    def text_embeddings(self, ids, attn_mask):
        return self.text_embed(self.encode_text(ids, attn_mask).out)  # (B, E)

    def scale(self):
        """exp(logit_scale), clamped so the multiplier stays in [1, 100]."""
        return self.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self):  # after each optimizer step, as CLIP / open_clip do
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


# ---------------------------------------------------------------------------------------------
# The image tokenizer: its codes are the targets of MIM and MMM-image
# ---------------------------------------------------------------------------------------------


class KMeansTokenizer(nn.Module):
    """Turns each patch into one of C discrete codes, the labels MIM and MMM-image predict.

    FLAVA and BEiT take these codes from DALL-E's discrete VAE (arXiv 2102.12092 §2.1), trained for
    hundreds of thousands of steps with a Gumbel-softmax relaxation, a temperature and a KL schedule.
    At our scale that recipe collapses: a per-cell KL to the uniform prior raises each cell's entropy
    but not the use of codes *across* cells, the relaxed soft mixtures reconstruct while the hard
    argmax sits on a handful of codes (measured: 7% of 256 codes in use, reconstructions worse than
    the mean image), and a conv autoencoder does not learn to draw in the seconds stage 1 has.

    So the image tokenizer here is the vector quantiser at the heart of a VQ-VAE (van den Oord et al.,
    arXiv 1711.00937), with the identity as encoder and decoder: a patch's code is its nearest
    codebook vector in pixel space, and decoding a code pastes that vector back. VQ-VAE's EMA
    codebook update (its App. A.1) is mini-batch k-means (Sculley 2010), which is how stage 1
    trains it (`learn`): assign every patch of a batch to its nearest code, move each code towards
    the mean of its patches, and re-seed codes that no patch uses any more at the patches they
    would serve best (k-means++'s squared-error sampling). Every code stays in use by construction.
    The codebook is data (buffers), not parameters: nothing here has a gradient, so no precision
    can make it underflow, and codes are always computed in fp32, outside autocast.
    Images come in [0, 1]; one code per ViT patch, in the patches' row-major order."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        dim = 3 * cfg.patch_size**2  # a patch's pixels, flattened
        self.register_buffer("codebook", torch.zeros(cfg.codebook_size, dim))  # (C, 3 p p)
        self.register_buffer("usage", torch.zeros(cfg.codebook_size))  # (C,) EMA of patches per code and step

    def patches(self, images01):
        """(B, 3, S, S) -> (B, P, 3 p p) in fp32, row-major like the ViT's patch embedding."""
        B, _, S, _ = images01.shape
        p, G = self.patch_size, S // self.patch_size
        x = images01.float().reshape(B, 3, G, p, G, p).permute(0, 2, 4, 1, 3, 5)  # (B, G, G, 3, p, p)
        return x.reshape(B, G * G, 3 * p * p)  # (B, P, 3 p p)

    def nearest(self, x, chunk=65536):
        """x (n, 3 p p) -> (index (n,), squared distance (n,)) of the nearest code, in fp32 chunks
        (n x C distances at once would be 6 GB for 1,024 images of `base`)."""
        with torch.autocast("cuda" if x.is_cuda else "cpu", enabled=False):  # ("meta" has no autocast)
            c = self.codebook.float()
            c2 = c.pow(2).sum(1)  # (C,)
            out = [((part.pow(2).sum(1, keepdim=True) - 2 * part @ c.T) + c2).min(1) for part in x.split(chunk)]
        squared, index = torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])
        return index, squared.clamp(min=0)  # (n,), (n,)

    @torch.no_grad()
    def codebook_indices(self, images01):
        """Hard codes, the MIM targets: (B, 3, S, S) in [0, 1] -> (B, P) long."""
        x = self.patches(images01)  # (B, P, 3 p p)
        return self.nearest(x.flatten(0, 1))[0].view(x.shape[:2])  # (B, P)

    @torch.no_grad()
    def decode_indices(self, codes):
        """(B, P) codes -> (B, 3, S, S): each patch replaced by its code's vector."""
        B, P = codes.shape
        p, G = self.patch_size, math.isqrt(P)
        x = self.codebook[codes].view(B, G, G, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, G, p, G, p)
        return x.reshape(B, 3, G * p, G * p)  # (B, 3, S, S)

    @torch.no_grad()
    def learn(self, images01, decay: float = 0.9, reseed: bool = True, generator=None) -> dict:
        """One step of mini-batch k-means on a batch's patches, the same on every rank (counts and
        sums are summed over ranks). The first call seeds the codebook with random patches."""
        x = self.patches(images01).flatten(0, 1)  # (n, 3 p p), n = B P
        world_size = distributed.rank_and_world()[1]
        C = self.codebook.size(0)
        per_code = world_size * x.size(0) / C  # patches a code would get if all were used evenly
        if not self.usage.any():  # the first step: C random patches of the batch
            self._reseed(torch.ones(C, dtype=torch.bool, device=x.device), x, torch.ones_like(x[:, 0]), per_code,
                         generator)
        index, err = self.nearest(x)  # (n,), (n,) squared error of each patch's code
        counts = torch.bincount(index, minlength=C).float()  # (C,)
        sums = torch.zeros_like(self.codebook).index_add_(0, index, x)  # (C, 3 p p)
        if world_size > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        # EMAs of each code's patch count N (`usage`) and patch sum M (VQ-VAE App. A.1); a code is M / N.
        total = decay * self.codebook * self.usage[:, None] + (1 - decay) * sums  # (C, 3 p p)
        self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        self.codebook.copy_(total / self.usage.clamp(min=1e-12)[:, None])
        dead = self.usage < 0.03 * per_code  # codes that (almost) no patch picks any more
        if reseed and dead.any():
            self._reseed(dead, x, err, per_code, generator)
        p = counts / counts.sum()
        images = images01.float()
        return {"recon_mse": err.mean().item() / x.size(1), "codes_used": (counts > 0).float().mean().item(),
                "perplexity": torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item(), "reseeded": int(dead.sum()),
                "mean_image_mse": (images - images.mean(0)).pow(2).mean().item()}  # this rank's batch

    def _reseed(self, which, x, weight, per_code, generator):
        """Move the codes in `which` to patches drawn with probability ~ weight (k-means++: the patches
        served worst); rank 0's choice is sent to every rank, so that all keep one codebook."""
        k = int(which.sum())
        pick = torch.multinomial(weight.float() + 1e-12, k, replacement=k > x.size(0), generator=generator)  # (k,)
        self.codebook[which] = x[pick]
        self.usage[which] = per_code
        if distributed.is_distributed():
            dist.broadcast(self.codebook, 0)
            dist.broadcast(self.usage, 0)



# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# Presets are plain dicts of ModelConfig fields. `tiny` trains the whole pipeline on a 2-core CPU
# in minutes; `small` has a ViT-S/16 image encoder and, as in FLIP (Table 9), a lighter text tower
# (where compute, not overhead, dominates a CPU step: the benchmark's FLIP preset); `base` is the
# paper's ViT-B/16 with 12 text layers, a 6-layer multimodal encoder and DALL-E's 8192 codes.
PRESETS = {
    "tiny": dict(),
    "tiny_long": dict(),  # the same model, a longer recipe (train.py RECIPES)
    "small": dict(image_size=224, patch_size=16, stem="linear", width=384, heads=6, image_layers=12,
                  text_layers=6, mm_layers=3, text_len=32, embed_dim=384, codebook_size=8192, vocab_size=30522),
    "base": dict(image_size=224, patch_size=16, stem="linear", width=768, heads=12, image_layers=12,
                 text_layers=12, mm_layers=6, text_len=77, embed_dim=768, codebook_size=8192, vocab_size=30522),
}


if __name__ == "__main__":  # python model.py convert|export ...: the published FLAVA in and out (pretrained.py)
    import pretrained

    pretrained.main()
