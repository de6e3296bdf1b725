"""Checkpoints: written atomically, read safely, and the models rebuilt from them.

Companion of train.py (save, resume) and eval.py (load). A checkpoint is one torch file holding plain containers
and tensors only: the model, its frozen image tokenizer, the config, the step and the vocabulary, and for a
resume the optimizer, the GradScaler, the RNG states and the readers of streamed data. It is written to a
temporary file, flushed and renamed, so a crash never leaves a torn one; it is read with weights_only=True, so a
file that carries pickled code is refused, not run. Files written before the image tokenizer was renamed
(format nanoflava-1: key "dvae", image_tokenizer="dvae"; dvae.pt) load as they are.

A resume is decided once, by rank 0, which alone reads the disk, and broadcast (decide_resume): the flags, the
precision and the device kind it would change are refused with their list unless --resume_changes ok, and a
fresh run never writes into a folder that holds another run's checkpoints unless --overwrite says so.
Exercise it with `python -m pytest tests/test_reliability.py tests/test_resume.py`.
"""
import io
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

import cli
import distributed
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


# ---------------------------------------------------------------------------------------------
# What a resume restores besides the weights: RNG states, the GradScaler, the log
# ---------------------------------------------------------------------------------------------


def rng_state(device):
    """Every global generator, in types that weights_only=True loading accepts (no numpy arrays). CUDA's
    only when the run uses it: touching it would initialise CUDA in a CPU run (and fail in a forked one)."""
    kind, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, keys.tolist(), *rest), "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], np.uint32), *state["numpy"][2:]))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_scaler(scaler, state, print0):
    """The GradScaler's state, when this run has one (fp16) and the checkpoint has one to give: a checkpoint saved
    in bf16 or fp32 has none (an empty dict), so a resume in fp16 (--resume_changes ok) starts a fresh scaler."""
    if scaler.is_enabled() and not state:
        print0(f"the checkpoint has no GradScaler state (it did not train in fp16): a fresh one starts at scale "
               f"{scaler.get_scale():g}")
    elif scaler.is_enabled():
        scaler.load_state_dict(state)


def trim_log(path, step, keep_stage1):
    """On resume: drop the rows of the steps after the checkpoint (they are redone) and a torn last line."""
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")] if os.path.exists(path) else []
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows
                     if (keep_stage1 if r.get("stage") == "image_tokenizer" else r.get("step", 0) <= step))
    os.replace(f"{path}.tmp", path)


def prune_checkpoints(ckpt_path, step, keep):
    """ckpt_<step>.pt beside ckpt.pt (a hard link: no second copy on disk), and only the newest `keep` of them."""
    if keep <= 0:
        return
    folder = os.path.dirname(ckpt_path)
    path = os.path.join(folder, f"ckpt_{step:07d}.pt")
    if os.path.exists(path):
        os.remove(path)
    try:
        os.link(ckpt_path, path)
    except OSError:  # a file system without hard links
        shutil.copyfile(ckpt_path, path)
    found = sorted((int(m[1]), name) for name in os.listdir(folder) if (m := NUMBERED.fullmatch(name)))
    for _, name in found[:-keep]:
        os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------
# The resume decision, once, on rank 0
# ---------------------------------------------------------------------------------------------

NUMBERED = re.compile(r"ckpt_(\d+)\.pt")
STAGE1_FILES = ("image_tokenizer.pt", "dvae.pt")  # stage 1's result; dvae.pt: its name before the rename
# Flags that cannot change what a resumed run computes: where it writes, how often it logs, saves and evaluates,
# how fast it loads, compiles and attends, what it recomputes. (workers also sets the layout of tar-shard readers:
# a resume that changes it says so in one line, shards.Batches.) The device kind and the precision are compared
# as they resolve ("auto" is fp16 on a GPU and bf16 or fp32 on a CPU), the --dtype text only where a checkpoint
# predates that record: see changes().
HARMLESS = {"out_dir", "log_every", "ckpt_every", "keep_ckpts", "workers", "compile", "device", "resume",
            "resume_changes", "overwrite", "eval", "eval_pairs", "eval_every", "attn", "grad_ckpt", "micro_batch",
            "fsdp"}


def precision(device, dtype) -> dict:
    """What a checkpoint records of the hardware it trained on, to be compared on resume."""
    return {"device": device.type, "dtype": distributed.dtype_name(dtype)}


def changes(ckpt, current) -> list:
    """How resuming `ckpt` would change the run: '--flag old -> new' for each flag of current ({"train_cfg": ...,
    "model_cfg": ..., "loss_cfg": ...} as a checkpoint stores them) outside HARMLESS, and the resolved precision
    and device kind (current["precision"]; absent in checkpoints that predate it)."""
    saved = {part: {cli.RENAMED.get(k, k): v for k, v in ckpt.get(part, {}).items()} for part in current}  # old names
    then, now = ckpt.get("precision") or {}, current.get("precision", {})
    harmless = HARMLESS | ({"dtype"} if then else set())
    out = [f"--{k} {saved[part][k]!r} -> {v!r}" for part in ("train_cfg", "model_cfg", "loss_cfg")
           for k, v in current.get(part, {}).items()
           if k not in harmless and k in saved.get(part, {}) and saved[part][k] != v]  # absent: an older format
    out += [f"{what} {then[key]} -> {now[key]}" for key, what in (("device", "device kind"), ("dtype", "precision"))
            if key in then and key in now and then[key] != now[key]]
    return out


def check_resume_flags(path, ckpt, current, accept):
    """-> the changes (see changes()); a ValueError listing them unless accept."""
    found = changes(ckpt, current)
    if found and not accept:
        raise ValueError(f"{path} was saved with other flags, and resuming would change the run: {'; '.join(found)}. "
                         "Resume with its flags, or pass --resume_changes ok to continue with these")
    return found


def earlier_run(folder, inputs=()) -> list:
    """The checkpoints of a run already in folder (ckpt.pt, ckpt_<step>.pt, stage 1's file), except the input files
    this run reads (--init_from, --image_tokenizer_ckpt)."""
    if not os.path.isdir(folder):
        return []
    inputs = {os.path.abspath(p) for p in inputs if p}
    names = sorted(n for n in os.listdir(folder) if n == "ckpt.pt" or NUMBERED.fullmatch(n) or n in STAGE1_FILES)
    return [n for n in names if os.path.abspath(os.path.join(folder, n)) not in inputs]


def make_room(cfg, print0):
    """A fresh run (no --resume) in a folder that holds another run's checkpoints: refused, or with --overwrite the
    earlier run's checkpoints, log and evaluation are removed first (said in one line), so that its steps, its
    last-K checkpoints and its log rows never mix with this run's."""
    found = earlier_run(cfg.out_dir, (cfg.init_from, cfg.image_tokenizer_ckpt))
    if found and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} holds another run's checkpoints ({', '.join(found)}): pass --resume to "
                         "continue it, --overwrite true to replace it, or choose another --out_dir")
    if found:
        gone = found + [n for n in ("log.jsonl", "eval.json") if os.path.exists(os.path.join(cfg.out_dir, n))]
        for name in gone:
            os.remove(os.path.join(cfg.out_dir, name))
        print0(f"--overwrite: removed the earlier run's {', '.join(gone)} from {cfg.out_dir}")


def stage1_file(out_dir, given=""):
    """The image tokenizer a run reuses instead of stage 1: --image_tokenizer_ckpt, else the out_dir's own
    (image_tokenizer.pt, or dvae.pt as it was called before), else None."""
    if given:
        return given
    return next((p for p in (os.path.join(out_dir, n) for n in STAGE1_FILES) if os.path.exists(p)), None)


def _read_on_rank0(cfg, current, print0):
    """Rank 0's half of decide_resume -> (checkpoint, image tokenizer state, path read)."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.resume:
        make_room(cfg, print0)
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        for change in check_resume_flags(ckpt_path, ckpt, current, cfg.resume_changes == "ok"):
            print0(f"--resume_changes ok: {change}")
        return ckpt, None, ckpt_path
    path = stage1_file(cfg.out_dir, cfg.image_tokenizer_ckpt) if cfg.resume else cfg.image_tokenizer_ckpt or None
    if cfg.resume:
        print0(f"--resume: no {ckpt_path} yet, so training starts at step 0"
               + (f" (stage 1 reused from {path})" if path else ""))
    if path is None:
        return None, None, None
    try:
        return None, torch.load(path, map_location="cpu", weights_only=True), path
    except FileNotFoundError:
        raise FileNotFoundError(f"image tokenizer checkpoint {path} does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read image tokenizer checkpoint {path}: {type(e).__name__}: {e}") from None


def decide_resume(cfg, current, rank, world_size, device, print0):
    """Where a run starts, decided once by rank 0, which alone reads the disk: from ckpt.pt (--resume); else from a
    saved image tokenizer (stage 1 finished before the first checkpoint, or --image_tokenizer_ckpt); else afresh.
    The decision and the file's bytes are broadcast: on node-local disks the other ranks may not see the files
    (each deciding alone, rank 0 would resume at step s while the others start at 0, and the run would hang or
    diverge). -> (checkpoint or None, image tokenizer state or None). A bad file or a refusal raises the same
    ValueError on every rank."""
    ckpt, stage1, path, error = None, None, None, None
    if rank == 0:
        try:
            ckpt, stage1, path = _read_on_rank0(cfg, current, print0)
        except (FileNotFoundError, ValueError) as e:
            error = str(e)
    if world_size > 1:
        decision = [error, ckpt is not None, stage1 is not None, path]
        dist.broadcast_object_list(decision, 0)
        error, has_ckpt, has_stage1, path = decision
        if not error and (has_ckpt or has_stage1):
            blob = None
            if rank == 0:
                blob = bytearray(os.path.getsize(path))
                with open(path, "rb") as f:
                    f.readinto(blob)
            blob = distributed.broadcast_bytes(blob, rank, device)
            if rank != 0:
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                ckpt, stage1 = (upgrade(state), None) if has_ckpt else (None, state)
    if error:
        raise ValueError(error)
    return ckpt, stage1
