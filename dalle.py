"""DALL-E's dVAE encoder (arXiv 2102.12092 App. A.2): FLAVA's published image tokenizer, whose 8192 codes are the
MIM and MMM-image targets of the published FLAVA. Frozen and without its decoder; pretrained.py loads its weights.

Companion of model.py: image_tokenizer_for picks this or model.KMeansTokenizer (the image tokenizer trained here)
from ModelConfig.image_tokenizer. Exercise it with `python -m pytest tests/test_pretrained.py -k dalle`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import KMeansTokenizer, ModelConfig


class DalleBlock(nn.Module):
    """DALL-E's encoder block (arXiv 2102.12092 App. A.2): an identity path (a 1x1 conv where the width
    changes) plus a residual path ReLU-conv3-ReLU-conv3-ReLU-conv3-ReLU-conv1 at a quarter of the width,
    scaled by the post-gain 1 / (number of blocks)**2 so that the residuals' sum starts small."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int):
        super().__init__()
        h = c_out // 4
        self.id_path = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.res_path = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, h, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(h, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(h, c_out, 1))
        self.post_gain = 1 / n_blocks**2

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """FLAVA's image tokenizer as published (facebook/flava-image-codebook): DALL-E's encoder, frozen, no
    decoder. A 7x7 conv, four groups of blocks at widths h, 2h, 4h, 8h with a 2x max-pool after each of the
    first three, ReLU, a 1x1 conv to codebook logits. It downsamples by 8, so it reads the model's image
    resized to 8 pixels a patch (112 px for FLAVA's 224 px and 14 x 14 patches), mapped from [0, 1] to
    [0.1, 0.9] as DALL-E's logit-Laplace pixels are. The same interface as KMeansTokenizer.codebook_indices."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, n, self.side = cfg.dalle_hidden, cfg.dalle_blocks, 8 * cfg.grid
        widths = (h, h, 2 * h, 4 * h, 8 * h)
        self.input = nn.Conv2d(3, h, 7, padding=3)
        self.groups = nn.ModuleList(  # group g: its first block widens widths[g] -> widths[g + 1]
            nn.Sequential(*(DalleBlock(widths[g + (b > 0)], widths[g + 1], 4 * n) for b in range(n))) for g in range(4))
        self.output = nn.Conv2d(8 * h, cfg.codebook_size, 1)

    def forward(self, pixels):
        """pixels (B, 3, 8G, 8G) in [0.1, 0.9] -> codebook logits (B, C, G, G)."""
        x = self.input(pixels)  # (B, h, 8G, 8G)
        for g, group in enumerate(self.groups):
            x = group(x)
            x = F.max_pool2d(x, 2) if g < 3 else x  # 8G -> 4G -> 2G -> G
        return self.output(F.relu(x))  # (B, C, G, G)

    @torch.no_grad()
    def codebook_indices(self, images01):
        """images01 (B, 3, S, S) in [0, 1] -> codes (B, P) long, row-major like the patches. In fp32 and
        outside autocast: an argmax over 8192 logits in reduced precision flips near-ties."""
        with torch.autocast(images01.device.type, enabled=False):
            x = images01.float()
            if x.size(-1) != self.side:  # 224 -> 112 px for FLAVA (Hugging Face resizes the original, Lanczos)
                x = F.interpolate(x, size=(self.side, self.side), mode="bicubic", antialias=True).clamp(0, 1)
            return self(0.8 * x + 0.1).argmax(dim=1).flatten(1)  # (B, 3, 8G, 8G) -> (B, P)


def image_tokenizer_for(cfg: ModelConfig) -> nn.Module:
    """The module whose codebook_indices are the MIM and MMM-image targets: the k-means tokenizer or DALL-E's encoder."""
    return DalleEncoder(cfg) if cfg.image_tokenizer == "dalle" else KMeansTokenizer(cfg)
