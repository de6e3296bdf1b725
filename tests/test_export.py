"""Export to Hugging Face's format (python pretrained.py export CKPT OUT_DIR) and the safetensors writer under it.

Without transformers (CI): an exported folder imports back (pretrained.from_pretrained, pretrained_checkpoint) to
exactly the same tensors and config; the small and base presets' configs round-trip; what Hugging Face's FLAVA
cannot be is refused in one line; both commands run end to end. With transformers (skipped when absent):
FlavaForPreTraining and FlavaModel load the folder and give nanoFLAVA's outputs to <= 1e-4, BertTokenizer its ids,
FlavaImageProcessor its pixels, and the safetensors library reads the hand-written file as ours does.

    python -m pytest tests/test_export.py
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import dalle
import model as M
import pretrained
import weightfiles
from conftest import ROOT, SMALL
from test_pretrained import CORPUS, VOCAB, assert_same_state, ours_small


def save_ckpt(path, model, image_tokenizer, vocab=VOCAB, **extra):
    """A nanoFLAVA checkpoint as train.py writes one (the keys checkpoints.load_checkpoint needs)."""
    image_tokenizer = None if image_tokenizer is None else image_tokenizer.state_dict()
    checkpoints.save_atomic({"format": checkpoints.FORMAT, "model": model.state_dict(), "model_cfg": asdict(model.cfg),
                             "image_tokenizer": image_tokenizer, "step": 7, "vocab": vocab, **extra}, path)
    return path


def kmeans_small(**overrides):
    """ours_small's shape with the image tokenizer trained here (k-means), a manual attention path, no DALL-E."""
    model, _ = ours_small()
    cfg = M.ModelConfig(**{**asdict(model.cfg), "image_tokenizer": "kmeans", "attn": "manual", **overrides})
    torch.manual_seed(1)
    other = M.FLAVA(cfg)
    other.load_state_dict(model.state_dict())
    tokenizer = M.KMeansTokenizer(cfg)
    tokenizer.codebook.normal_()
    return other.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


def test_the_written_safetensors_file_reads_back_exactly_and_is_aligned(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(2, 3, generator=gen), "f16": torch.randn(5, generator=gen).half(),
               "bf16": torch.randn(3, generator=gen).bfloat16(), "f64": torch.randn(1, generator=gen).double(),
               "i64": torch.arange(-2, 3) * 2**40, "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(3,
               dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.6592),
               "empty": torch.zeros(0, 3), "view": torch.randn(4, 6, generator=gen)[:, ::2]}  # not contiguous
    path = tmp_path / "model.safetensors"
    weightfiles.write_safetensors(path, tensors)
    got = weightfiles.read_weights(tmp_path)
    assert list(got) == list(tensors) and not list(tmp_path.glob("*.tmp"))  # renamed into place
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0 and json.loads(path.read_bytes()[8: 8 + n])["__metadata__"] == {"format": "pt"}
    with pytest.raises(ValueError, match=r"tensor 'c' has dtype torch.complex64"):
        weightfiles.write_safetensors(path, {"c": torch.zeros(2, dtype=torch.complex64)})
    assert torch.equal(weightfiles.read_weights(tmp_path)["f32"], tensors["f32"])  # the refused write left it alone
