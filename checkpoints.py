"""Checkpoints: written atomically, read safely, and the models rebuilt from them.

Companion of train.py (save, resume) and eval.py (load). A checkpoint is one torch file holding plain containers
and tensors only: the model, its frozen image tokenizer, the config, the step and the vocabulary, and for a
resume the optimizer, the GradScaler, the RNG states and the readers of streamed data. It is written to a
temporary file, flushed and renamed, so a crash never leaves a torn one; it is read with weights_only=True, so a
file that carries pickled code is refused, not run. Files written before the image tokenizer was renamed
(format nanoflava-1: key "dvae", image_tokenizer="dvae") load as they are. Exercise it with
`python -m pytest tests/test_reliability.py tests/test_resume.py`.
"""
import os
import pickle

import torch

from dalle import image_tokenizer_for
from model import FLAVA, ModelConfig
from weightfiles import load_state

FORMAT = "nanoflava-2"  # nanoflava-1: the same, with the image tokenizer under "dvae"
KEYS = ("format", "model", "image_tokenizer", "model_cfg", "step", "vocab")


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash mid-write leaves the
    previous file intact (rename is atomic on POSIX)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def upgrade(ckpt: dict) -> dict:
    """A nanoflava-1 checkpoint in today's names: its "dvae" is the image tokenizer, "dvae" the k-means one."""
    if ckpt.get("format") == "nanoflava-1" and "dvae" in ckpt:
        ckpt = {**{k: v for k, v in ckpt.items() if k != "dvae"}, "image_tokenizer": ckpt["dvae"], "format": FORMAT}
        if ckpt["model_cfg"].get("image_tokenizer") == "dvae":
            ckpt["model_cfg"] = {**ckpt["model_cfg"], "image_tokenizer": "kmeans"}
    return ckpt


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a nanoFLAVA checkpoint *safely*: `weights_only=True` unpickles tensors and plain
    containers only, so a file carrying a pickled object with code is refused, not executed."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: it holds pickled objects beyond tensors and plain "
                         f"containers (possibly code), which weights_only=True forbids ({str(e).splitlines()[0]})") from None
    except Exception as e:  # truncated, not a torch file, ...
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    ckpt = upgrade(ckpt) if isinstance(ckpt, dict) else ckpt
    missing = [k for k in KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a nanoFLAVA checkpoint (missing {missing or f'format={FORMAT}'})")
    return ckpt


def models_from_checkpoint(ckpt: dict, device="cpu"):
    """FLAVA and its frozen image tokenizer (k-means or DALL-E's encoder; None if the checkpoint has none)
    rebuilt from the config stored in the checkpoint itself."""
    cfg = ModelConfig(**ckpt["model_cfg"])
    model = FLAVA(cfg)
    load_state(model, ckpt["model"], "checkpoint model weights")
    if ckpt["image_tokenizer"] is None:
        return model.to(device), None
    image_tokenizer = image_tokenizer_for(cfg)
    load_state(image_tokenizer, ckpt["image_tokenizer"], "checkpoint image tokenizer weights")
    return model.to(device), image_tokenizer.to(device).requires_grad_(False).eval()
