"""Weight files with torch alone: safetensors parsed and written by hand, pytorch_model.bin, sharded indexes, and
a state dict loaded into a module with a message that names every mismatch.

Companion of model.py: pretrained.py reads Hugging Face's FLAVA through it and writes nanoFLAVA's exports with it,
checkpoints.py loads nanoFLAVA's own checkpoints with load_state. Nothing here knows FLAVA. A weight file is data
from anywhere: a safetensors header is checked whole, against the file's size, before one tensor byte is read.
Exercise it with `python -m pytest tests/test_weightfiles.py tests/test_export.py tests/test_pretrained.py`.
"""
import json
import math
import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _count(x) -> bool:
    """A JSON number that can count bytes or elements: an int >= 0 (not a float, not a bool)."""
    return type(x) is int and x >= 0


def _entry(where: str, info, data_bytes: int):
    """(dtype, shape, start, end) of one header entry, every field checked against the others and against the
    data_bytes the file really holds after its header: a header is data from anywhere, so no number in it is
    trusted before it is checked (a claimed 4 TiB would otherwise be allocated before its absence is noticed)."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: its header entry is not a JSON object but a {type(info).__name__}")
    missing = [k for k in ENTRY_KEYS if k not in info]
    if missing:
        raise ValueError(f"{where}: its header entry has no {', '.join(missing)}")
    dtype, shape, offsets = (info[k] for k in ENTRY_KEYS)
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is none of {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(map(_count, shape)):
        raise ValueError(f"{where}: shape {shape!r} is not a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_count, offsets)):
        raise ValueError(f"{where}: data_offsets {offsets!r} are not two byte offsets >= 0")
    (start, end), nbytes = offsets, math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end < start:
        raise ValueError(f"{where}: data_offsets {offsets} put its end before its start")
    if end > data_bytes:
        raise ValueError(f"{where}: data_offsets {offsets}: it ends at byte {end} of {data_bytes} after the "
                         f"header (the file is truncated or its header lies)")
    if nbytes != end - start:
        raise ValueError(f"{where}: shape {shape} {dtype} is {nbytes} bytes, but data_offsets {offsets} hold "
                         f"{end - start}")
    return SAFETENSORS_DTYPES[dtype], shape, start, end


def _header(path, f, size: int):
    """The checked header of an open .safetensors file of `size` bytes: {name: (dtype, shape, start, end)} and
    the byte where the tensors begin. Everything is checked here, before one tensor byte is read."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: {size} bytes, shorter than the 8 bytes of a safetensors header length")
    n = int.from_bytes(head, "little")
    if n > size - 8:  # f.read(n) of a corrupt length would try to allocate it
        raise ValueError(f"{path}: header length {n} is more than the file's {size - 8} bytes after it "
                         f"(not a safetensors file, or a truncated one)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError):  # not UTF-8 (UnicodeDecodeError is a ValueError), not JSON, too deep
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object but a {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):  # the format's rule
        raise ValueError(f"{path}: the header's __metadata__ is not a JSON object of strings")
    data_bytes = size - 8 - n
    return {name: _entry(f"{path}: tensor {name!r}", info, data_bytes) for name, info in header.items()}, 8 + n


def _read_safetensors(path, keep) -> dict:
    """A .safetensors file by hand: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}} (byte offsets into what follows), then the raw little-endian tensors. The whole header is
    checked first (_header); a bad file is refused in one line naming it and the tensor."""
    with open(path, "rb") as f:
        entries, base = _header(path, f, os.fstat(f.fileno()).st_size)
        state = {}
        for name, (dtype, shape, start, end) in entries.items():
            if not keep(name):
                state[name] = None  # listed, not read
                continue
            f.seek(base + start)
            buf = bytearray(f.read(end - start))  # writable, as torch.frombuffer wants; the tensor shares it
            if len(buf) != end - start:  # the size was checked: only a file shrinking under us gets here
                raise ValueError(f"{path}: tensor {name!r} is truncated (the file changed while it was read)")
            state[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.zeros(shape, dtype=dtype)
    return state


def write_safetensors(path, tensors: dict, metadata=None):
    """Write {name: tensor} as a .safetensors file by hand, which _read_safetensors and the safetensors library
    both read: the header padded with spaces to 8 bytes (as that library writes it, so every tensor starts
    aligned), then each tensor's bytes back to back in the header's order. Written to a temporary file, flushed
    and renamed, so a crash leaves no torn file. Bytes in the host's order: little-endian, as the format wants,
    on every platform torch ships for."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold here")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # (numel * itemsize,) raw bytes
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
