"""Weight files read with torch alone: safetensors parsed by hand, pytorch_model.bin, sharded indexes, and a
state dict loaded into a module with a message that names every mismatch.

Companion of model.py: pretrained.py reads Hugging Face's FLAVA through it, checkpoints.py loads nanoFLAVA's
own checkpoints with load_state. Nothing here knows FLAVA. Exercise it with
`python -m pytest tests/test_pretrained.py`.
"""
import json
import math
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path, keep) -> dict:
    """A .safetensors file by hand: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} (byte offsets into what follows), then the raw little-endian tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (ValueError, MemoryError, OverflowError):
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
        header.pop("__metadata__", None)
        state = {}
        for name, info in header.items():
            if not keep(name):
                state[name] = None  # listed, not read
                continue
            (start, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES.get(info["dtype"])
            f.seek(8 + n + start)
            buf = bytearray(f.read(end - start))  # writable, as torch.frombuffer wants; the tensor shares it
            if dtype is None or len(buf) != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"{path}: tensor {name} is truncated or of an unknown dtype {info['dtype']}")
            state[name] = torch.frombuffer(buf, dtype=dtype).reshape(info["shape"]) if buf else \
                torch.zeros(info["shape"], dtype=dtype)
    return state


def read_weights(folder, keep=lambda name: True) -> dict:
    """name -> tensor from a Hugging Face folder: model.safetensors or pytorch_model.bin, sharded or not
    (*.index.json). Names that `keep` rejects map to None: listed, never read (a .bin is memory-mapped)."""
    folder, files = Path(folder), []
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            break
    files = files or [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()][:1]
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or *.index.json")
    state = {}
    for file in (folder / f for f in files):
        if file.suffix == ".safetensors":
            state |= _read_safetensors(file, keep)
            continue
        try:  # a zip-format file is memory-mapped (only what is kept gets read); a legacy one loads whole
            part = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # truncated, not a torch file, or pickled code (which weights_only refuses)
            raise ValueError(f"cannot read {file}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        state |= {k: v if keep(k) else None for k, v in part.items()}
    return state


def load_state(module: nn.Module, state: dict, what: str):
    """load_state_dict with a message that names every mismatching shape (another preset?)."""
    own = module.state_dict()
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if bad or missing or unexpected:
        raise ValueError(f"{what} does not fit this model config; shape mismatches: {bad[:6]}, missing: "
                         f"{missing[:6]}, unexpected: {unexpected[:6]}")
    module.load_state_dict(state)
