"""How FLAVA is trained: the image tokenizer, then (optionally) unimodal pretraining, then joint FLAVA
training with FLIP's patch dropping, then (optionally) FLIP's unmasked tuning.

FLAVA (arXiv 2112.04482) §3.3-3.4: each update draws one whole batch from one source (pairs,
images or texts; paper 0.70 / 0.15 / 0.15); AdamW (0.9, 0.999), weight decay 0.1, warmup then
cosine, FP16 with FP32 LayerNorm. FLIP (arXiv 2212.00794) §3: drop patches in the contrastive
pass, then tune briefly without dropping.

Precision, one rule for every stage: stage 1 (the image tokenizer's k-means) has no gradients and runs in fp32
outside autocast; stages 2-4 run every forward under one autocast of --dtype: fp16 on CUDA (as FLAVA trained)
with a GradScaler, bf16 without one, contrastive logits in fp32. config.json and the log say which.

    python train.py                                # the embedded default: tiny FLAVA on synthetic shapes, CPU, minutes
    python train.py --help                         # every flag, grouped
    torchrun --nproc_per_node=2 train.py           # the same on 2 processes (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node=8 train.py --preset base --pairs pmd.jsonl --images imagenet/train --texts books.txt
    torchrun --nproc_per_node=8 train.py --preset base --shards 'pmd/{00000..07000}.tar' --images imagenet/train
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --preset base ...
    torchrun --nproc_per_node=8 train.py --preset base --fsdp true --micro_batch 256 --grad_ckpt true ...  # README
    python train.py --resume                       # continue from out/ckpt.pt exactly where it stopped (same flags)
    python train.py --preset base --init_from flava-full --pairs pairs.jsonl --lr 1e-5   # from the published FLAVA

Writes into --out_dir: config.json, log.jsonl, image_tokenizer.pt, ckpt.pt (and the last --keep_ckpts as ckpt_<step>.pt), eval.json.
"""
import argparse
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation
from losses import FLAVALoss, LossConfig, accumulate, compile_step
import checkpoints
import flops
import pretrained
from dalle import image_tokenizer_for
from model import FLAVA, KMeansTokenizer, ModelConfig
from weightfiles import load_state

NAMED_SKIPS = 10  # unreadable manifest rows and files named in the log (with the reason); the rest are counted

# ---------------------------------------------------------------------------------------------
# Config: every field is a flag; its comment is its --help
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:  # defaults: the `tiny` recipe, the embedded default run (5 minutes on 2 CPU cores)
    preset: str = "tiny"  # model and recipe preset (tiny | small | base); explicit flags override its values
    out_dir: str = "out"  # where config.json, log.jsonl, image_tokenizer.pt, ckpt.pt and eval.json go
    pairs: str = ""  # JSONL/CSV manifest of image-caption pairs; empty = the synthetic shapes world
    shards: str = ""  # or pairs streamed from WebDataset tar shards: a folder, a glob, or 'dir/{00000..00099}.tar'
    shard_buffer: int = 1000  # shuffle buffer of each shard reader (samples held, per DataLoader worker)
    images: str = ""  # image folder tree for MIM (class = sub-folder); empty = synthetic (or none if pairs given)
    texts: str = ""  # text file for MLM, one passage a line; empty = synthetic (or none if pairs given)
    vocab: str = ""  # a BERT vocab.txt to use instead of building a word-piece vocabulary from the data
    init_from: str = ""  # start from a Hugging Face FLAVA folder or a ckpt.pt: its model, vocabulary, image tokenizer
    tokenizer_size: int = 8192  # vocabulary size when it is built from the data's text
    seed: int = 0  # one seed: model init (same on every rank), data and masks (per step and sample)
    batch_size: int = 128  # global batch per step, split evenly over ranks
    micro_batch: int = 0  # rows per rank and forward; fewer than the rank's batch accumulate gradients (0 = all)
    steps: int = 900  # joint FLAVA steps (stage 3)
    lr: float = 1e-3  # peak learning rate of stages 2-3 (paper: 1e-3 at batch 8192)
    min_lr: float = 1e-4  # end of the cosine
    warmup: int = 150  # linear warmup steps of each stage (paper: 10,000)
    weight_decay: float = 0.1  # AdamW decay on weight matrices only (paper: 0.1)
    beta2: float = 0.98  # AdamW beta2 (paper: 0.999; 0.98 is steadier for short runs)
    grad_clip: float = 1.0  # clip the global gradient norm (after unscaling)
    p_pairs: float = 0.9  # share of steps drawing a paired batch (paper: 0.70)
    p_images: float = 0.05  # share of image-only (MIM) steps (paper: 0.15)
    p_texts: float = 0.05  # share of text-only (MLM) steps (paper: 0.15)
    image_tokenizer_ckpt: str = ""  # a trained image_tokenizer.pt (the image tokenizer) to reuse; stage 1 is skipped
    image_tokenizer_steps: int = 100  # stage 1: mini-batch k-means steps of the image tokenizer's codebook
    unimodal_steps: int = 0  # stage 2: MIM + MLM steps before joint training (0 = skip)
    unmasked_steps: int = 0  # stage 4: FLIP unmasked tuning steps with keep_ratio 1.0 (0 = skip)
    unmasked_lr: float = 1e-4  # stage 4 learning rate (constant)
    device: str = "auto"  # auto | cpu | cuda; auto = cuda when available (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # fp16 | bf16 | fp32; auto = fp16 on CUDA, bf16 on a CPU that supports it, else fp32
    compile: bool = False  # torch.compile the step
    fsdp: bool = False  # shard weights, gradients and AdamW state over the ranks (FSDP2, under torchrun)
    workers: int = -1  # DataLoader workers per rank; -1 = 6 on CUDA, 0 on CPU
    log_every: int = 25  # steps between log lines (the only host-device synchronisation)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from out_dir/ckpt.pt
    resume_changes: str = "refuse"  # refuse | ok: a resume whose flags change the run stops, listing them, unless ok
    keep_ckpts: int = 2  # also keep the last K checkpoints as ckpt_<step>.pt beside ckpt.pt (hard links; 0 = none)
    eval: bool = True  # evaluate on held-out data at the end (eval.json)
    eval_pairs: int = 1000  # retrieval set size for the end-of-run evaluation
    eval_every: int = 0  # steps between zero-shot checks during training (0 = only at the end; synthetic world)


# What a preset changes beyond the model (TrainConfig and LossConfig fields). `tiny` is the
# dataclass defaults, tuned so the default run learns in minutes (README, "Tuning"); `base` is the
# paper's recipe (FLAVA §3.4: batch 8192, lr 1e-3, 10k warmup, AdamW beta2 0.999, 0.70/0.15/0.15)
# with FLIP's 50% patch dropping in the contrastive pass and a short unmasked tuning at the end
# (FLIP §3). `tiny` keeps every patch: its objects cover a few patches of a 64 px image, and
# dropping half of them halved its zero-shot accuracy at equal time (README, "Tuning"). micro_batch: what fits a
# GPU, by `bench.py --fit`'s estimate (README, "Scaling up"): `base` runs 1024 pairs per GPU on 8 GPUs as 8
# micro-batches of 128 (~30 GB of 80), `small` 128 at once (~10 GB) and accumulates on fewer GPUs.
# Flags renamed, old name -> new: the old one still works for one release, with a message naming the new one.
# masked_fraction was a share of a batch's rows, beside mask_ratio and keep_ratio that are shares of patches.
RENAMED = {"masked_fraction": "masked_pass_share", "dvae_ckpt": "image_tokenizer_ckpt",
           "dvae_steps": "image_tokenizer_steps"}  # the image tokenizer was called a dVAE: k-means is no VAE
RECIPES = {
    "tiny": {},
    "tiny_long": dict(steps=2500, masked_pass_share=1.0),  # ~16 minutes on 2 CPU cores: FLAVA's fusion half learns more
    "small": dict(batch_size=1024, steps=50_000, lr=1e-3, warmup=2000, beta2=0.999, p_pairs=0.7, p_images=0.15,
                  p_texts=0.15, masked_pass_share=1.0, keep_ratio=0.5, unmasked_steps=2000, image_tokenizer_steps=5000,
                  log_every=50, ckpt_every=1000, micro_batch=128, masked_pass="joint"),
    "base": dict(batch_size=8192, steps=150_000, lr=1e-3, min_lr=1e-5, warmup=10_000, beta2=0.999, p_pairs=0.7,
                 p_images=0.15, p_texts=0.15, masked_pass_share=1.0, keep_ratio=0.5, unmasked_steps=5000,
                 image_tokenizer_steps=20_000, log_every=100, ckpt_every=2000, micro_batch=128, masked_pass="joint"),
}


def _field_help(cls) -> dict:
    """The `# comment` after each dataclass field, read from the source: one text, two uses."""
    pattern = re.compile(r"^\s+(\w+): [^=]+=.*?#\s*(.*)$")
    return {m[1]: m[2].replace("%", "%%") for line in inspect.getsource(cls).splitlines() if (m := pattern.match(line))}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def new_flag_names(argv, prog):
    """argv with each RENAMED flag under its new name, saying so on stderr (train.py and bench.py both call this)."""
    out = []
    for arg in map(str, argv):
        old = arg[2:].split("=")[0] if arg.startswith("--") else None
        if old in RENAMED:
            if any(a == f"--{RENAMED[old]}" or a.startswith(f"--{RENAMED[old]}=") for a in map(str, argv)):
                raise ValueError(f"--{old} is the old name of --{RENAMED[old]}: give only --{RENAMED[old]}")
            print(f"{prog}: --{old} is now --{RENAMED[old]}; the old name works until the next release",
                  file=sys.stderr)
            arg = arg.replace(old, RENAMED[old], 1)
        out.append(arg)
    return out


def parse_args(argv=None):
    """CLI generated from TrainConfig, ModelConfig and LossConfig. A value comes from the flag if
    given, else from the preset (model fields: PRESETS in model.py; the rest: RECIPES), else from
    the dataclass default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, cls in (("training", TrainConfig), ("model (defaults from --preset)", ModelConfig),
                       ("losses", LossConfig)):
        group, helps = parser.add_argument_group(title), _field_help(cls)
        for f in fields(cls):
            kind = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float}.get(str(f.type), None)
            kind = kind or (f.type if callable(f.type) else str)
            default = "preset" if cls is ModelConfig else f.default
            bare = {"nargs": "?", "const": True} if kind is _parse_bool else {}  # a bare --resume means true
            group.add_argument(f"--{f.name}", type=kind, default=None, metavar=type(f.default).__name__.upper(),
                               help=f"{helps.get(f.name, '')} (default: {default})", **bare)
    try:
        argv = new_flag_names(sys.argv[1:] if argv is None else argv, "train.py")
    except ValueError as e:
        parser.error(str(e))
    args = vars(parser.parse_args(argv))  # an unknown flag exits here (status 2), naming it
    given = {k: v for k, v in args.items() if v is not None}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in RECIPES:
        parser.error(f"unknown preset {preset!r}; choose one of {sorted(RECIPES)}")
    values = {**RECIPES[preset], **given}
    train = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig) if f.name in values})
    overrides = {f.name: values[f.name] for f in fields(ModelConfig) if f.name in values}
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's, read before any process group exists
    try:  # every impossible combination fails here, before any work, naming the fields involved
        loss = LossConfig(**{f.name: values[f.name] for f in fields(LossConfig) if f.name in values})
        ModelConfig.from_preset(train.preset, **overrides)
        if overrides.get("image_tokenizer") == "dalle" and not train.init_from:
            raise ValueError("image_tokenizer=dalle is FLAVA's published codebook, which is loaded, not trained: "
                             "give --init_from (a Hugging Face FLAVA folder or a checkpoint that has it)")
        pick_device(train.device, int(os.environ.get("LOCAL_RANK", 0)))
        if train.batch_size < 1 or train.batch_size % world:
            raise ValueError(f"batch_size={train.batch_size} must be a positive multiple of the world size {world}")
        local = train.batch_size // world
        if train.micro_batch < 0 or 0 < train.micro_batch < local and local % train.micro_batch:
            raise ValueError(f"--micro_batch={train.micro_batch} must divide each process's batch, batch_size / "
                             f"world size = {train.batch_size} / {world} = {local} (or be 0: no accumulation)")
        if train.fsdp and "RANK" not in os.environ:
            raise ValueError("--fsdp shards the model over torchrun's processes: start with torchrun "
                             "(torchrun --nproc_per_node=N train.py ...)")
        if train.pairs and train.shards:
            raise ValueError("give pairs as --pairs (a manifest) or as --shards (tar shards), not both")
        if train.resume_changes not in ("refuse", "ok"):
            raise ValueError(f"--resume_changes={train.resume_changes!r} must be refuse or ok")
    except ValueError as e:
        parser.error(str(e))
    return train, overrides, loss


# ---------------------------------------------------------------------------------------------
# Distributed, precision, optimizer, schedule
# ---------------------------------------------------------------------------------------------


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: cpu, or cuda:LOCAL_RANK (one GPU per torchrun process); auto = cuda when available."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={name!r} must be auto, cpu or cuda")
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError(f"device=cuda, but this torch ({torch.__version__}) sees no GPU; use --device cpu")
    if local_rank >= n:  # rather than asking for a GPU that is not there
        raise ValueError(f"device={name}: process {local_rank} on this node needs cuda:{local_rank}, but {n} GPU(s) "
                         "are visible; start at most that many processes per node (torchrun --nproc_per_node) "
                         "or use --device cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto"):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them this is one process.
    NCCL on CUDA, gloo on CPU (so every multi-process path is testable on a laptop)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, local_rank, world, device


def resolve_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            name = "fp16"
        else:  # bf16 autocast pays on CPUs with native bf16 (AVX512-BF16 / AMX): ~2x here
            name = "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype={name!r} must be one of auto, fp16, bf16, fp32")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype=fp16 needs CUDA; use bf16 or fp32 on a CPU")
    return table[name]


def make_optimizer(model, cfg: TrainConfig):
    """AdamW; weight decay only on weight matrices: never on norms, biases, embeddings, the
    cls/pos/mask tokens or logit_scale (decay would pull the temperature towards 1)."""
    no_decay_names = ("cls_token", "pos_embed", "mask_token", "word_embed", "logit_scale")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or any(n in name for n in no_decay_names) else decay).append(p)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay) + len(no_decay) == n_params, "every parameter must be in exactly one group"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel: one pass over every tensor (CPU too since torch 2.4: 4.6x faster on `small`)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=True)
    except (RuntimeError, ValueError):  # an older torch or another device: the multi-tensor path
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), foreach=True)


def shard(objective, dtype):
    """--fsdp, with FSDP2 (ZeRO-3, as FLAVA trained with FSDP): each transformer block, each encoder, then the rest
    (projections, heads) is a unit whose weights, gradients and AdamW state are sharded over the ranks and gathered
    only while it computes. The gathered weights are in the run's precision (FSDP's mixed-precision policy;
    gradients are reduced in fp32) and autocast still decides each op's precision, as without FSDP. Not sharded:
    the frozen image tokenizer, and logit_scale (FSDP cannot shard a 0-d parameter; main averages its gradient)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    m = objective.model
    for encoder in (m.image_encoder, m.text_encoder, m.mm_encoder):
        for block in encoder.transformer.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(encoder, mp_policy=policy)
    fully_shard(objective, mp_policy=policy, ignored_params={m.logit_scale, *objective.image_tokenizer.parameters()})
    register_fsdp_forward_method(objective, "contrastive_pass")  # losses.accumulate calls it outside forward
    return objective


def _whole(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_states(model, optimizer=None):
    """The state dicts with every FSDP shard gathered into its whole tensor (a collective: every rank calls it), so a
    checkpoint is the same with or without FSDP, and eval, resume and another world size read it alike."""
    model_state = {k: _whole(v) for k, v in model.state_dict().items()}
    if optimizer is None:
        return model_state
    optim_state = optimizer.state_dict()
    optim_state["state"] = {i: {k: _whole(v) for k, v in s.items()} for i, s in optim_state["state"].items()}
    return model_state, optim_state


def load_optimizer(optimizer, state):
    """A checkpoint's (whole) optimizer state; under FSDP each tensor is cut to its parameter's shard."""
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in s.items():
                if k != "step":
                    s[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)  # this rank's part


def unsharded(model, mcfg, device, fsdp, rank):
    """The model that rank 0 evaluates: itself, or under FSDP a whole copy (gathered: every rank calls this)."""
    if not fsdp:
        return model
    state = whole_states(model)
    if rank == 0:
        copy = FLAVA(mcfg).to(device)
        copy.load_state_dict(state)
        return copy


def out_of_memory(cfg, world_size):
    """What to say when a forward + backward runs out of GPU memory."""
    local = cfg.batch_size // world_size
    micro = cfg.micro_batch if 0 < cfg.micro_batch < local else local
    return (f"train.py: out of GPU memory in the forward + backward of a micro-batch of {micro} rows per process "
            f"(--batch_size {cfg.batch_size} over {world_size} process(es), --micro_batch {cfg.micro_batch}). "
            "What helps: a smaller --micro_batch dividing the process's batch (the step stays the same: gradients "
            "accumulate), --grad_ckpt true (blocks recomputed in backward: ~30% more compute), --fsdp true (weights, "
            f"gradients and AdamW state sharded). `python bench.py --fit --preset {cfg.preset} --gpu_gb N` tells "
            "which micro-batch fits.")


def stages(cfg: TrainConfig):
    """(name, first step, number of steps) of the stages that share the optimizer step counter."""
    out, start = [], 0
    for name, n in (("unimodal", cfg.unimodal_steps), ("joint", cfg.steps), ("unmasked", cfg.unmasked_steps)):
        if n > 0:
            out.append((name, start, n))
            start += n
    return out


def lr_at(cfg: TrainConfig, stage: str, t: int, n: int) -> float:
    """Linear warmup then cosine to min_lr within a stage; stage 4 is FLIP's small constant lr."""
    if stage == "unmasked":
        return cfg.unmasked_lr
    if t < cfg.warmup:
        return cfg.lr * (t + 1) / cfg.warmup
    progress = (t - cfg.warmup) / max(1, n - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def stage_probs(cfg: TrainConfig, stage: str, available) -> dict:
    probs = {"pairs": cfg.p_pairs, "images": cfg.p_images, "texts": cfg.p_texts}
    if stage == "unimodal":
        probs = {"images": 0.5, "texts": 0.5}
    probs = {k: v for k, v in probs.items() if k in available and v > 0}
    if not probs:
        raise ValueError(f"stage {stage!r} has no source to draw from (available: {sorted(available)})")
    return probs


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


def step_seed(seed: int, step: int) -> int:
    """The seed of every random choice of a step (losses.FLAVALoss.draw). The same on every rank: each
    choice depends on a sample's row in the global batch, not on the rank that holds it."""
    return (seed * 1_000_003 + step) * 4099


def trim_log(path, step, keep_stage1):
    """On resume: drop the rows of the steps after the checkpoint (they are redone) and a torn last line."""
    rows = [json.loads(line) for line in open(path) if line.endswith("\n")] if os.path.exists(path) else []
    with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows
                     if (keep_stage1 if r.get("stage") == "image_tokenizer" else r.get("step", 0) <= step))
    os.replace(f"{path}.tmp", path)


# Flags that cannot change what a resumed run computes: where it writes, how often it logs, saves and evaluates,
# how fast it loads, compiles and attends, what it recomputes. Any other difference from the checkpoint's flags is
# refused (or accepted: --resume_changes ok).
HARMLESS = {"out_dir", "log_every", "ckpt_every", "keep_ckpts", "workers", "compile", "device", "resume",
            "resume_changes", "eval", "eval_pairs", "eval_every", "attn", "grad_ckpt", "micro_batch", "fsdp"}


def fail(error):
    """Bad input at the start: one line naming the path and what was expected, exit status 2 (as argparse's)."""
    print(f"train.py: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_resume_flags(path, ckpt, current, accept):
    """current: {"train_cfg": ..., "model_cfg": ..., "loss_cfg": ...} of this run, as the checkpoint stores them.
    -> the differences, as '--flag old -> new'; a ValueError listing them unless accept."""
    ckpt = {part: {RENAMED.get(k, k): v for k, v in ckpt.get(part, {}).items()} for part in current}  # old names
    changes = [f"--{k} {ckpt[part][k]!r} -> {v!r}" for part, now in current.items() for k, v in now.items()
               if k not in HARMLESS and k in ckpt.get(part, {}) and ckpt[part][k] != v]  # absent: an older format
    if changes and not accept:
        raise ValueError(f"{path} was saved with other flags, and resuming would change the run: {'; '.join(changes)}. "
                         "Resume with its flags, or pass --resume_changes ok to continue with these")
    return changes


def broadcast_bytes(blob, rank, device, chunk=1 << 28):
    """Rank 0's bytes (a bytearray, or None) on every rank, in chunks through the process group."""
    size = torch.tensor([-1 if blob is None else len(blob)], device=device)
    dist.broadcast(size, 0)
    if size.item() < 0:
        return None
    buf = torch.frombuffer(blob, dtype=torch.uint8) if rank == 0 else torch.empty(size.item(), dtype=torch.uint8)
    for i in range(0, len(buf), chunk):
        part = buf[i: i + chunk].to(device)  # NCCL moves device tensors only; gloo's device is the CPU
        dist.broadcast(part, 0)
        buf[i: i + chunk] = part.cpu()
    return buf.numpy().tobytes()


def decide_resume(cfg, current, ckpt_path, image_tokenizer_path, rank, world_size, device, print0):
    """Resume is decided once, by rank 0, which alone reads the disk: resume from ckpt.pt; else reuse image_tokenizer.pt
    (stage 1 finished, no checkpoint yet) or --image_tokenizer_ckpt; else start afresh. Its flags are checked there, and
    the decision and the file's bytes are broadcast: on node-local disks the other ranks may not see the files
    (each deciding alone, rank 0 would resume at step s while the others start at 0, and the run would hang or
    diverge). -> (checkpoint or None, image tokenizer state or None); a bad file or a refusal stops every rank alike."""
    ckpt, image_tokenizer, path, error = None, None, None, None
    if rank == 0:
        try:
            if cfg.resume and os.path.exists(ckpt_path):
                path, ckpt = ckpt_path, checkpoints.load_checkpoint(ckpt_path)
                for change in check_resume_flags(path, ckpt, current, cfg.resume_changes == "ok"):
                    print0(f"--resume_changes ok: {change}")
            elif cfg.image_tokenizer_ckpt or cfg.resume and os.path.exists(image_tokenizer_path):
                path = cfg.image_tokenizer_ckpt or image_tokenizer_path
                try:
                    image_tokenizer = torch.load(path, map_location="cpu", weights_only=True)
                except FileNotFoundError:
                    raise FileNotFoundError(f"image tokenizer checkpoint {path} does not exist") from None
                except Exception as e:
                    raise ValueError(f"cannot read image tokenizer checkpoint {path}: {type(e).__name__}: {e}") from None
            elif cfg.resume:
                print0(f"--resume: no {ckpt_path} yet, so training starts at step 0")
        except (FileNotFoundError, ValueError) as e:
            error = str(e)
    if world_size > 1:
        decision = [error, ckpt is not None, image_tokenizer is not None, path]
        dist.broadcast_object_list(decision, 0)
        error, has_ckpt, has_image_tokenizer, path = decision
        if not error and (has_ckpt or has_image_tokenizer):
            blob = None
            if rank == 0:
                blob = bytearray(os.path.getsize(path))
                with open(path, "rb") as f:
                    f.readinto(blob)
            blob = broadcast_bytes(blob, rank, device)
            if rank != 0:
                state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
                ckpt, image_tokenizer = (state, None) if has_ckpt else (None, state)
    if error:
        fail(error)
    return ckpt, image_tokenizer


def prune_checkpoints(ckpt_path, step, keep):
    """ckpt_<step>.pt beside ckpt.pt (a hard link: no second copy on disk), and only the newest `keep` of them."""
    if keep <= 0:
        return
    folder, numbered = os.path.dirname(ckpt_path), re.compile(r"ckpt_(\d+)\.pt")
    path = os.path.join(folder, f"ckpt_{step:07d}.pt")
    if os.path.exists(path):
        os.remove(path)
    try:
        os.link(ckpt_path, path)
    except OSError:  # a file system without hard links
        shutil.copyfile(ckpt_path, path)
    found = sorted((int(m[1]), name) for name in os.listdir(folder) if (m := numbered.fullmatch(name)))
    for _, name in found[:-keep]:
        os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def build_data(cfg: TrainConfig, mcfg: ModelConfig, vocab=None):
    """The sources a run draws from (files where given, else the synthetic shapes world) and the
    tokenizer: from the checkpoint's vocabulary, a BERT vocab.txt, or built from the data's text."""
    if cfg.pairs or cfg.shards:
        if cfg.pairs:
            sources = {"pairs": data.FilePairs(cfg.pairs, mcfg.image_size, None, mcfg.text_len)}
            corpus = [sources["pairs"].pair(i)[1] for i in range(min(len(sources["pairs"]), 200_000))
                      if vocab is None and not cfg.vocab]
        else:
            sources = {"pairs": data.TarShards(cfg.shards, mcfg.image_size, None, mcfg.text_len, cfg.shard_buffer)}
            corpus = sources["pairs"].captions(200_000) if vocab is None and not cfg.vocab else []
        if cfg.images:
            sources["images"] = data.ImageFolder(cfg.images, mcfg.image_size)
        if cfg.texts:
            sources["texts"] = data.TextFile(cfg.texts, None, mcfg.text_len)
        world, corpus = None, corpus + (sources["texts"].lines[:200_000] if cfg.texts else [])
    else:
        world = data.ShapesWorld(image_size=mcfg.image_size, seed=cfg.seed)
        sources = {"pairs": data.SyntheticPairs(world, "train", None, mcfg.text_len),
                   "images": data.SyntheticImages(world, "train"),
                   "texts": data.SyntheticTexts(world, "train", None, mcfg.text_len)}
        corpus = world.vocabulary()
    if vocab is not None:
        tokenizer = data.Tokenizer(vocab)
    elif cfg.vocab:
        tokenizer = data.Tokenizer.from_vocab_file(cfg.vocab)
    else:
        tokenizer = data.Tokenizer.from_corpus(corpus, vocab_size=cfg.tokenizer_size)
    for source in sources.values():
        if hasattr(source, "tokenizer"):
            source.tokenizer = tokenizer
    return sources, world, tokenizer


def loader_for(cfg, mixture, probs, rank, world_size, start_step, device, streams=None):
    """(source, batch) per step (data.Batches); a source without a length (tar shards) is streamed, from the
    saved state of its readers where given."""
    sizes = {k: len(v) if hasattr(v, "__len__") else None for k, v in mixture.sources.items()}
    sampler = data.MixtureBatchSampler(sizes, probs, cfg.batch_size, rank, world_size, cfg.seed, start_step,
                                       seeds=True)  # each crop a function of (seed, source, stream position)
    workers = cfg.workers if cfg.workers >= 0 else (6 if device.type == "cuda" else 0)
    return data.Batches(mixture, sampler, workers, device.type == "cuda", streams)


def stream_states(batches, world_size):
    """The streamed sources' reader states for a checkpoint: each rank knows only its own readers."""
    states = batches.state() if batches is not None else {}
    if world_size > 1 and states:  # every rank has the same streamed sources, so every rank is here
        parts = [None] * world_size
        dist.all_gather_object(parts, states)
        for part in parts:
            for name, state in part.items():
                states[name]["readers"].update(state["readers"])
    return states


def load_init(cfg: TrainConfig, model_overrides: dict):
    """--init_from: a Hugging Face FLAVA folder (converted on the fly) or a nanoFLAVA checkpoint, and its model
    config with the model flags given on the command line (the preset's are not used)."""
    if os.path.isdir(cfg.init_from):
        init = pretrained.pretrained_checkpoint(cfg.init_from, **model_overrides)
    else:
        init = checkpoints.load_checkpoint(cfg.init_from)
    if init["image_tokenizer"] is None:
        raise ValueError(f"--init_from {cfg.init_from} has no image tokenizer: convert it with its codebook first "
                         "(python model.py convert FOLDER out/ckpt.pt --codebook facebook/flava-image-codebook)")
    return init, replace(ModelConfig(**init["model_cfg"]), **model_overrides)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Stage 1: the image tokenizer (its codes are the targets of MIM and MMM-image)
# ---------------------------------------------------------------------------------------------


def train_image_tokenizer(cfg, mcfg, mixture, rank, world_size, device, log):
    """Stage 1: the image tokenizer's codebook by mini-batch k-means over the patches of image batches
    (model.KMeansTokenizer explains why). No gradients, fp32 throughout; the EMA of the codes follows the data
    closely early (decay 0.5) and averages over more batches later (0.99), and dead codes are re-seeded
    in the first 80% of the stage only, so that the last codes have settled."""
    image_tokenizer = KMeansTokenizer(mcfg).to(device)
    source = "images" if "images" in mixture.sources else "pairs"
    batches = loader_for(cfg, mixture, {source: 1.0}, rank, world_size, 0, device)
    gen = torch.Generator(device).manual_seed(cfg.seed)  # the re-seeding draws (rank 0's are used)
    bar = tqdm(range(cfg.image_tokenizer_steps), desc="stage 1: image tokenizer", disable=rank != 0, dynamic_ncols=True)
    for step in bar:
        _, batch = next(batches)
        log.note_skipped(batch, "image_tokenizer", step)
        images = to_device(batch, device)["image"].float() / 255  # (B, 3, S, S) in [0, 1]
        t = step / max(1, cfg.image_tokenizer_steps - 1)
        stats = image_tokenizer.learn(images, decay=0.5 + 0.49 * t, reseed=t < 0.8, generator=gen)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.image_tokenizer_steps - 1):
            bar.set_postfix(mse=f"{stats['recon_mse']:.4f}", base=f"{stats['mean_image_mse']:.4f}",
                            ppl=f"{stats['perplexity']:.0f}")
            log({"stage": "image_tokenizer", "step": step, **{k: round(v, 6) for k, v in stats.items()}})
    return image_tokenizer.eval()


# ---------------------------------------------------------------------------------------------
# Setup: flags, processes, data, the image tokenizer, FLAVA and its optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What setup builds and the training loop reads, and where the run stands."""
    cfg: TrainConfig
    mcfg: ModelConfig
    loss_cfg: LossConfig
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the autocast precision of stages 2-4 (fp32: autocast off)
    print0: object  # print on rank 0, nothing elsewhere
    log: "Log"
    sources: dict  # "pairs" / "images" / "texts" -> its dataset
    mixture: data.Mixture  # the sources behind one index: what the loaders read
    world: object  # the synthetic shapes world (None when the data are files): the zero-shot checks use it
    tokenizer: data.Tokenizer
    resume: dict | None  # the checkpoint this run continues, if any
    init: dict | None  # --init_from's model, vocabulary and image tokenizer, if any
    t_start: float = 0.0
    step: int = 0  # optimizer steps done, over stages 2-4
    last_saved: int | None = None  # the step of the last checkpoint written (or resumed from)
    counters: dict = None  # skipped_samples, overflow_steps: over the whole run, resumes included
    image_tokenizer: KMeansTokenizer = None
    model: FLAVA = None
    objective: FLAVALoss = None  # model + image tokenizer -> named losses
    step_fn: object = None  # the objective as the step calls it: bare, under DDP or FSDP, maybe compiled
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None

    def path(self, name):  # ckpt.pt, image_tokenizer.pt, log.jsonl, eval.json
        return os.path.join(self.cfg.out_dir, name)

    @property
    def autocast(self):  # AMP written once: every forward of stages 2-4 and of the evaluations runs under it
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def setup(argv) -> Run:
    """Flags -> processes -> inputs (data, vocabulary, a resumed or initial checkpoint) -> config.json and the log.
    Bad input (a missing or empty manifest, shard folder, vocabulary, init or checkpoint) stops here: one line,
    exit status 2. The flags define the model, resumed or not; a resumed run takes its vocabulary from the
    checkpoint. Killed before the first checkpoint, --resume starts at step 0 (reusing image_tokenizer.pt if stage 1 finished)."""
    cfg, model_overrides, loss_cfg = parse_args(argv)  # a bad flag or combination stops here, before any work
    rank, _, world_size, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dtype = resolve_dtype(cfg.dtype, device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path, image_tokenizer_path, log_path = (os.path.join(cfg.out_dir, f) for f in ("ckpt.pt", "image_tokenizer.pt", "log.jsonl"))
    print0 = print if rank == 0 else (lambda *a, **k: None)
    mcfg = ModelConfig.from_preset(cfg.preset, **model_overrides)
    try:  # every input file is opened (or refused) here, before any compute
        init, mcfg = load_init(cfg, model_overrides) if cfg.init_from else (None, mcfg)
        # what a checkpoint stores, to compare with a resumed one (vocab_size: the tokenizer's, unless a flag set it)
        current = {"train_cfg": asdict(cfg), "loss_cfg": asdict(loss_cfg), "model_cfg": {
            k: v for k, v in asdict(mcfg).items() if k != "vocab_size" or k in model_overrides}}
        resume, image_tokenizer_state = decide_resume(cfg, current, ckpt_path, image_tokenizer_path, rank, world_size, device, print0)
        if resume is not None:
            mcfg = replace(mcfg, vocab_size=model_overrides.get("vocab_size", resume["model_cfg"]["vocab_size"]))
        sources, world, tokenizer = build_data(cfg, mcfg, (resume or init or {}).get("vocab"))
    except (FileNotFoundError, ValueError) as e:
        fail(e)
    if resume is None and init is None and "vocab_size" not in model_overrides:  # a fresh run: as its tokenizer
        mcfg = replace(mcfg, vocab_size=len(tokenizer))
    if mcfg.vocab_size < len(tokenizer):
        raise ValueError(f"--vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = {"train": asdict(cfg), "model": asdict(mcfg), "loss": asdict(loss_cfg), "world_size": world_size,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""), "grad_scaler": dtype == torch.float16}
    print0(json.dumps(config, indent=1))  # the resolved config, once; config.json holds the same
    if rank == 0 and cfg.resume:  # the steps after the checkpoint are redone: their log rows go
        trim_log(log_path, resume["step"] if resume else 0, keep_stage1=resume is not None or os.path.exists(image_tokenizer_path))
    log = Log(log_path, rank)
    for name, source in sources.items():  # manifest rows that could not be read: counted, the first ones named
        if getattr(source, "num_skipped", 0):
            first = source.skipped[:NAMED_SKIPS]  # (line, reason)
            print0(f"{name}: skipped {source.num_skipped} manifest rows, first: {first}")
            log({"event": "skipped_rows", "source": name, "count": source.num_skipped, "first": first})
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    run = Run(cfg, mcfg, loss_cfg, rank, world_size, device, dtype, print0, log, sources, data.Mixture(sources), world,
              tokenizer, resume, init, t_start=time.time(), counters={"skipped_samples": 0, "overflow_steps": 0})
    run.image_tokenizer = prepare_image_tokenizer(run, image_tokenizer_state)  # stage 1 (or its result, loaded)
    build_model(run)  # after stage 1, which draws from the global generator: FLAVA's init is reseeded
    return run


def prepare_image_tokenizer(run, image_tokenizer_state):
    """Stage 1, or what replaces it: a checkpoint's own tokenizer (the image tokenizer or DALL-E's encoder), a image_tokenizer.pt, or
    the image tokenizer trained now. Frozen from here on: its codes are fixed targets."""
    cfg, mcfg, device = run.cfg, run.mcfg, run.device
    if run.resume is not None or run.init is not None:
        image_tokenizer = image_tokenizer_for(mcfg).to(device)
        load_state(image_tokenizer, (run.resume or run.init)["image_tokenizer"],
                   f"{run.path('ckpt.pt')} image tokenizer" if run.resume else f"{cfg.init_from} image tokenizer")
    elif image_tokenizer_state is not None:
        image_tokenizer = KMeansTokenizer(mcfg).to(device)
        load_state(image_tokenizer, image_tokenizer_state, cfg.image_tokenizer_ckpt or run.path("image_tokenizer.pt"))
        run.print0(f"stage 1: image tokenizer loaded from {cfg.image_tokenizer_ckpt or run.path('image_tokenizer.pt')}")
    else:
        image_tokenizer = train_image_tokenizer(cfg, mcfg, run.mixture, run.rank, run.world_size, device, run.log)
        if run.rank == 0:
            checkpoints.save_atomic(image_tokenizer.state_dict(), run.path("image_tokenizer.pt"))
    return image_tokenizer.requires_grad_(False).eval()


def build_model(run):
    """FLAVA (fresh, from --init_from or resumed), its loss, how the step runs it (DDP, FSDP, compiled), AdamW and
    the GradScaler (on for fp16 only)."""
    cfg, resume = run.cfg, run.resume
    torch.manual_seed(cfg.seed)  # FLAVA's initial weights, whatever stage 1 drew from the generator
    model = run.model = FLAVA(run.mcfg).to(run.device)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    run.log({"event": "precision", "dtype": str(run.dtype).replace("torch.", ""),
             "grad_scaler": run.scaler.is_enabled(), "image_tokenizer": "fp32, no gradients"})
    if run.init is not None and resume is None:
        load_state(model, run.init["model"], f"{cfg.init_from} model")
        run.print0(f"initialised from {cfg.init_from}")
    if resume is not None:
        load_state(model, resume["model"], f"{run.path('ckpt.pt')} model")
        run.scaler.load_state_dict(resume["scaler"])
        run.step = run.last_saved = resume["step"]
        run.counters.update(resume.get("counters", {}))
        set_rng_state(resume["rng"], run.device)
        run.print0(f"resumed from {run.path('ckpt.pt')} at step {run.step}")
    tokenizer = run.tokenizer
    run.objective = FLAVALoss(model, run.image_tokenizer, run.loss_cfg, tokenizer.mask_id, tokenizer.special_ids)
    # Different sources leave different parameters unused in a step (an image batch never
    # touches the text encoder): DDP must look for them instead of waiting for their gradients.
    if cfg.fsdp:
        run.step_fn = shard(run.objective, run.dtype)
    else:
        run.step_fn = DDP(run.objective, find_unused_parameters=True) if run.world_size > 1 else run.objective
    run.optimizer = make_optimizer(model, cfg)  # after sharding: FSDP replaces the parameters by their shards
    if resume is not None:
        load_optimizer(run.optimizer, resume["optimizer"])
    if cfg.compile:
        run.step_fn = compile_step(run.step_fn)
    run.print0(f"FLAVA: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"{run.world_size} process(es) on {run.device}, {str(run.dtype).replace('torch.', '')}")


# ---------------------------------------------------------------------------------------------
# The step: forward and backward of one batch (FLAVA §3.2-3.3), then AdamW
# ---------------------------------------------------------------------------------------------


def optimizer_step(run, source, batch, seed, lr):
    """One update on one batch of one source -> (named losses, gradient norm before clipping), on the device.
    In micro-batches of --micro_batch rows where it is set (losses.accumulate); fp16 scales the loss."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr

    def backward(loss):
        scaler.scale(loss).backward()

    try:
        losses = accumulate(run.step_fn, source, batch, seed, run.cfg.micro_batch, backward, run.autocast)
    except torch.OutOfMemoryError:
        raise SystemExit(out_of_memory(run.cfg, run.world_size)) from None
    if run.cfg.fsdp and model.logit_scale.grad is not None:  # not sharded (see shard): averaged as DDP would
        dist.all_reduce(model.logit_scale.grad)
        model.logit_scale.grad /= run.world_size
    scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    grad_norm = _whole(torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip))
    scaler.step(optimizer)  # fp16: skipped when the gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale_()
    return losses, grad_norm


# ---------------------------------------------------------------------------------------------
# Logging: log.jsonl, skipped files, and each log line's check for non-finite values
# ---------------------------------------------------------------------------------------------


class Log:
    """out_dir/log.jsonl (written by rank 0: one JSON object a line), and the files the batches skipped."""

    def __init__(self, path, rank):
        self.rank, self.file = rank, open(path, "a") if rank == 0 else None
        self.named, self.new_skips = set(), 0  # files named so far; files skipped since the last log line

    def __call__(self, row: dict):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def note_skipped(self, batch, stage, step):
        """Skip accounting: unreadable files are left out of a batch (data.collate lists them under "skipped").
        Each is counted; the first NAMED_SKIPS are named with the reason, on the console and in the log."""
        for path, reason in batch.pop("skipped", []):
            self.new_skips += 1
            if len(self.named) < NAMED_SKIPS and path not in self.named:
                self.named.add(path)
                print(f"rank {self.rank}, {stage} step {step}: skipped {path}: {reason}")
                self({"event": "skipped_file", "stage": stage, "step": step, "path": path, "reason": reason})


class Meter:
    """The values of the steps since the last log line. They stay on the device until a log step reads them
    back, the only host-device synchronisation (every checkpoint step is a log step, so that no checkpoint is
    written before its losses are checked)."""

    def __init__(self):
        self.values, self.steps, self.samples, self.flops, self.t0 = {}, 0, 0, 0.0, time.time()

    def add(self, step, values: dict, samples, flops):
        for k, v in values.items():
            at, vs = self.values.setdefault(k, ([], []))  # (steps, values)
            at.append(step)
            vs.append(v.detach().float())
        self.steps, self.samples, self.flops = self.steps + 1, self.samples + samples, self.flops + flops

    def means(self):
        """-> ({term: mean of its finite values}, {term: (first step with a non-finite value, how many)})."""
        means, nonfinite = {}, {}
        for k, (at, values) in self.values.items():
            values = torch.stack(values).tolist()  # one read per term and interval
            good = [v for v in values if math.isfinite(v)]
            means[k] = sum(good) / len(good) if good else math.nan
            if len(good) < len(values):
                nonfinite[k] = next(t for t, v in zip(at, values) if not math.isfinite(v)), len(values) - len(good)
        return means, nonfinite


def check_finite(run, nonfinite):
    """Non-finite accounting, over every rank in one all_reduce (with the skipped samples). fp16: the scaler
    skipped exactly the steps whose unscaled gradient overflowed; they are counted. Otherwise a non-finite value
    stops every rank before the model can be saved, naming the last good checkpoint."""
    totals = torch.tensor([run.log.new_skips, bool(nonfinite) and run.dtype != torch.float16], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(totals)  # summed over ranks: skipped samples, ranks that must stop
    if totals[1]:
        where = ", ".join(f"{k} at step {t}" for k, (t, _) in nonfinite.items()) or "a value on another rank"
        kept = f"{run.path('ckpt.pt')}, step {run.last_saved}" if run.last_saved is not None else "none"
        raise FloatingPointError(f"non-finite {where}; stopped. The last good checkpoint is {kept}")
    run.counters["skipped_samples"] += int(totals[0])
    run.counters["overflow_steps"] += nonfinite.get("grad_norm", (0, 0))[1]
    run.log.new_skips = 0


def log_line(run, meter, stage, lr):
    """The log line of the steps since the last one -> their mean losses (after the non-finite check)."""
    means, nonfinite = meter.means()
    check_finite(run, nonfinite)
    if run.device.type == "cuda":
        torch.cuda.synchronize()  # the clock reads the time the GPU finished, not the time it was asked
    dt = time.time() - meter.t0
    run.log({"stage": stage, "step": run.step, **{k: round(v, 5) for k, v in means.items()}, "lr": lr,
             "logit_scale": run.model.scale().item(), "ms_per_step": 1000 * dt / meter.steps,
             "samples_per_s": meter.samples / dt, **run.counters, "tflops": meter.flops / dt / 1e12,
             **({"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {})})
    return means


def zero_shot_check(run):
    """--eval_every: zero-shot accuracy on the synthetic world's held-out scenes, by rank 0."""
    judged = unsharded(run.model, run.mcfg, run.device, run.cfg.fsdp, run.rank)  # under FSDP a collective
    if run.rank == 0:
        judged.eval()
        top1 = evaluation.quick_eval(judged, run.tokenizer, run.world, run.device, run.autocast, n_pairs=0,
                                     per_class=10)["zeroshot_top1"]
        run.log({"step": run.step, "zeroshot_top1": top1, "elapsed_s": round(time.time() - run.t_start, 1)})
        judged.train()


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything a resume needs, written atomically by rank 0
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run, stage, batches):
    streams = {"stage": stage, "sources": stream_states(batches, run.world_size)}  # where tar shards were read to
    model_state, optimizer_state = whole_states(run.model, run.optimizer)  # a collective under FSDP
    if run.rank == 0:
        checkpoints.save_atomic({"format": checkpoints.FORMAT, "model": model_state, "image_tokenizer": run.image_tokenizer.state_dict(),
                     "optimizer": optimizer_state, "scaler": run.scaler.state_dict(), "step": run.step,
                     "model_cfg": asdict(run.mcfg), "loss_cfg": asdict(run.loss_cfg), "train_cfg": asdict(run.cfg),
                     "vocab": run.tokenizer.vocab, "rng": rng_state(run.device), "counters": dict(run.counters),
                     "streams": streams}, run.path("ckpt.pt"))
        prune_checkpoints(run.path("ckpt.pt"), run.step, run.cfg.keep_ckpts)
    run.last_saved = run.step


# ---------------------------------------------------------------------------------------------
# Stages 2-4: the training loop
# ---------------------------------------------------------------------------------------------


def start_stage(run, stage, first, n):
    """A stage's loss settings (FLIP's unmasked stage keeps every patch) and its batches, from where it stands."""
    run.objective.cfg = run.loss_cfg if stage != "unmasked" else replace(run.loss_cfg, keep_ratio=1.0)
    probs = stage_probs(run.cfg, stage, run.sources)
    saved = run.resume.get("streams", {}) if run.resume else {}  # a stage resumed mid-way continues its streams
    batches = loader_for(run.cfg, run.mixture, probs, run.rank, run.world_size, run.step - first,
                         run.device, saved.get("sources") if saved.get("stage") == stage else None)
    run.print0(f"stage {['unimodal', 'joint', 'unmasked'].index(stage) + 2}: {stage}, steps {first}-{first + n - 1}, "
               f"sources {probs}")
    return batches


def train(run):
    """Stages 2-4 on one optimizer step counter: each step draws one batch of one source, runs the step, and
    every --log_every steps writes a log line; every --ckpt_every steps a checkpoint."""
    cfg, loss_cfg, plan = run.cfg, run.loss_cfg, stages(run.cfg)
    total = sum(n for _, _, n in plan)
    costs = {(stage, src): flops.flops_per_sample(run.mcfg, src, 1.0 if stage == "unmasked" else loss_cfg.keep_ratio,
                                            loss_cfg.mask_ratio, loss_cfg.mlm_prob, loss_cfg.masked_pass_share,
                                            loss_cfg.masked_pass, loss_cfg.mmm_text_prob)
             for stage, _, _ in plan for src in data.SOURCES}  # per sample, for the log's tflops
    bar = tqdm(total=total, initial=run.step, desc="FLAVA", disable=run.rank != 0, dynamic_ncols=True)
    meter, stage, batches = Meter(), None, None
    for stage, first, n in plan:
        if run.step >= first + n:  # a stage a resumed run has finished
            continue
        batches = start_stage(run, stage, first, n)
        while run.step < first + n:
            source, batch = next(batches)
            run.log.note_skipped(batch, stage, run.step + 1)
            batch = to_device(batch, run.device)
            lr = lr_at(cfg, stage, run.step - first, n)
            losses, grad_norm = optimizer_step(run, source, batch, step_seed(cfg.seed, run.step), lr)
            run.step += 1
            bar.update(1)
            meter.add(run.step, {**losses, "grad_norm": grad_norm}, cfg.batch_size,
                      cfg.batch_size * costs[stage, source])
            if run.step % cfg.log_every == 0 or run.step % cfg.ckpt_every == 0 or run.step == total:
                means = log_line(run, meter, stage, lr)
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("total", "gc", "itm", "mim", "mlm")})
                meter = Meter()
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.world is not None:
                zero_shot_check(run)
                meter.t0 = time.time()  # the clock pauses during evaluation
            if run.step % cfg.ckpt_every == 0 and run.step < total:
                save_checkpoint(run, stage, batches)
    bar.close()
    save_checkpoint(run, stage, batches)


def main(argv=None):
    run = setup(argv)  # flags, processes, data, stage 1, FLAVA, its optimizer; a resumed run's state
    train(run)  # stages 2-4
    train_time = time.time() - run.t_start
    run.print0(f"training done in {train_time:.0f} s; {run.counters}")
    judged = unsharded(run.model, run.mcfg, run.device, run.cfg.fsdp, run.rank) if run.cfg.eval else None
    if run.cfg.eval and run.rank == 0:  # end of run: evaluate on held-out data (eval.json)
        judged.eval()
        results = evaluation.quick_eval(judged, run.tokenizer, run.world, run.device, run.autocast,
                                        n_pairs=run.cfg.eval_pairs)
        results.update(train_seconds=round(train_time, 1), wall_seconds=round(time.time() - run.t_start, 1))
        with open(run.path("eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(evaluation.format_table(results))
    if run.world_size > 1:  # DDP's reducer goes first: freeing the process group, it could deadlock gloo on the GIL
        run.step_fn = None
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
