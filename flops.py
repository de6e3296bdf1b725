"""FLOPs per sample of a FLAVA training step, counted from the config: what MFU and bench.py's tables divide by.

Matmul and convolution FLOPs, 2 per multiply-accumulate, training = 3 x forward (PaLM's MFU convention, arXiv
2204.02311 App. B). Companion of train.py (its log's tflops) and bench.py; checked against torch's
FlopCounterMode in `python -m pytest tests/test_model.py -k flops`.
"""
import math

from model import ConvStem, ModelConfig


def encoder_flops(cfg: ModelConfig, depth: int, tokens: int) -> float:
    D, T = cfg.width, tokens
    per_layer = 2 * T * (3 * D * D + D * D + 2 * cfg.mlp_ratio * D * D)  # qkv, proj, MLP
    per_layer += 2 * 2 * T * T * D  # q @ k^T and att @ v
    return depth * per_layer


def stem_flops(cfg: ModelConfig) -> float:
    if cfg.stem == "linear":
        return 2 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.width
    chans = ConvStem.channels(cfg)  # kernel 2, stride 2: stage i has (S / 2**i)**2 outputs
    return sum(2 * (cfg.image_size >> i) ** 2 * 4 * chans[i - 1] * chans[i] for i in range(1, len(chans)))


def dalle_flops(cfg: ModelConfig) -> float:
    """DALL-E's encoder at its 8G-pixel input: the 7x7 conv, every block's four convs (and its 1x1 identity
    path where the width changes), the 1x1 conv to the codebook. ~52 GFLOPs at 112 px: more than a ViT-B/16."""
    h, n, s = cfg.dalle_hidden, cfg.dalle_blocks, 8 * cfg.grid
    widths, total = (h, h, 2 * h, 4 * h, 8 * h), 2 * s * s * 49 * 3 * h
    for g in range(4):  # group g runs at side s / 2**g
        for b in range(n):
            c, w = widths[g + (b > 0)], widths[g + 1]
            total += 2 * (s >> g) ** 2 * (9 * c * w // 4 + 2 * 9 * (w // 4) ** 2 + w // 4 * w + (c * w if c != w else 0))
    return total + 2 * cfg.num_patches * 8 * h * cfg.codebook_size


def contrastive_flops(cfg: ModelConfig, keep_ratio: float = 1.0) -> float:
    """Training FLOPs of one pair's contrastive pass alone: both towers (FLIP keeping a keep_ratio of the patches)
    and both projections, forward + backward."""
    K = max(1, round(cfg.num_patches * keep_ratio))
    image = stem_flops(cfg) + encoder_flops(cfg, cfg.image_layers, 1 + K)
    return 3 * (image + encoder_flops(cfg, cfg.text_layers, cfg.text_len) + 2 * 2 * cfg.width * cfg.embed_dim)


def flops_per_sample(cfg: ModelConfig, source: str, keep_ratio: float = 1.0, mask_ratio: float = 0.383,
                     mlm_prob: float = 0.15, masked_pass_share: float = 1.0, masked_pass: str = "joint",
                     mmm_text_prob: float = 0.15) -> float:
    """Training FLOPs of one sample of a FLAVA step (forward + backward = 3 x forward), counting
    the matmuls and convolutions that dominate (PaLM's MFU convention, arXiv 2204.02311 App. B):
    the patch embedding, every encoder pass, the heads at the positions losses.py applies them
    to, and the image tokenizer's target pass (forward only, no gradient). A paired batch runs its
    masked pass (and the image tokenizer) on a masked_pass_share of its rows: FLAVA's one fusion pass ("joint"), or
    two ("split": the masked caption with the kept image tokens, the masked image with the caption)."""
    D, P, L, V, C = cfg.width, cfg.num_patches, cfg.text_len, cfg.vocab_size, cfg.codebook_size
    K = max(1, round(P * keep_ratio))
    n_img, n_txt = max(1, round(mask_ratio * P)), math.floor(mlm_prob * L) + 1  # as losses.FLAVALoss

    def head(n, vocab):  # dense D x D, then the decoder D x vocab, at n positions
        return 2 * n * (D * D + D * vocab)

    def image(tokens):
        return stem_flops(cfg) + encoder_flops(cfg, cfg.image_layers, tokens)

    codes = dalle_flops(cfg) if cfg.image_tokenizer == "dalle" else 2 * P * 3 * cfg.patch_size**2 * C  # the targets
    text = encoder_flops(cfg, cfg.text_layers, L)
    if source == "images":
        return 3 * (image(1 + P) + head(n_img, C)) + codes
    if source == "texts":
        return 3 * (text + head(n_txt, V))
    if source != "pairs":
        raise ValueError(f"unknown source {source!r}")
    fused = [1 + P] if masked_pass == "joint" else [1 + K, 1 + P]  # image tokens of each fusion pass
    masked = image(1 + P) + text  # both encoders again, on the masked inputs
    masked += sum(2 * (n + L) * D * D + encoder_flops(cfg, cfg.mm_layers, 1 + n + L) for n in fused)  # *_to_mm, fusion
    masked += head(n_img, C) + head(math.floor(mmm_text_prob * L) + 1, V)
    masked += 2 * (D * D + 2 * D)  # ITM pooler + classifier
    return contrastive_flops(cfg, keep_ratio) + 3 * masked_pass_share * masked + masked_pass_share * codes
