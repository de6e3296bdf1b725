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
    python train.py --overwrite                    # start afresh in an out_dir that holds an earlier run
    python train.py --preset base --init_from flava-full --pairs pairs.jsonl --lr 1e-5   # from the published FLAVA

Writes into --out_dir: config.json, log.jsonl, image_tokenizer.pt, ckpt.pt (and the last --keep_ckpts as
ckpt_<step>.pt), eval.json. The recipe comes first in this file (config, schedule, stage 1, the step, the
loop); setup (processes, data, where the run starts) after it. The companions: cli.py (flags), distributed.py
(devices, processes, FSDP), checkpoints.py (save, resume), runlog.py (log.jsonl, the non-finite check),
gradcache.py (--micro_batch), manifests.py and shards.py (data on disk), shapes.py (the embedded world).
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import cli
import data
import distributed
import eval as evaluation
import flops
import gradcache
import manifests
import pretrained
import runlog
import shapes
import shards
from dalle import image_tokenizer_for
from losses import FLAVALoss, LossConfig, compile_step
from model import FLAVA, KMeansTokenizer, ModelConfig
from weightfiles import load_state

# ---------------------------------------------------------------------------------------------
# Config: every field is a flag (cli.py); its comment is its --help
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
    image_tokenizer_ckpt: str = ""  # an image_tokenizer.pt to reuse (stage 1 is skipped)
    image_tokenizer_steps: int = 100  # stage 1: mini-batch k-means steps of the image tokenizer's codebook
    unimodal_steps: int = 0  # stage 2: MIM + MLM steps before joint training (0 = skip)
    unmasked_steps: int = 0  # stage 4: FLIP unmasked tuning steps with keep_ratio 1.0 (0 = skip)
    unmasked_lr: float = 1e-4  # stage 4 learning rate (constant)
    device: str = "auto"  # auto | cpu | cuda; auto = cuda when available (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # fp16 | bf16 | fp32; auto = fp16 on CUDA, bf16 on a CPU that supports it, else fp32
    min_loss_scale: float = 1e-4  # fp16: stop when GradScaler's scale falls below this (fairseq's floor)
    compile: bool = False  # torch.compile the step
    fsdp: bool = False  # shard weights, gradients and AdamW state over the ranks (FSDP2, under torchrun)
    workers: int = -1  # DataLoader workers per rank; -1 = 6 on CUDA, 0 on CPU (with --shards: its readers' layout)
    log_every: int = 25  # steps between log lines (the only host-device synchronisation)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from out_dir/ckpt.pt
    resume_changes: str = "refuse"  # refuse | ok: a resume that would change the run stops, listing how, unless ok
    overwrite: bool = False  # a fresh run in an out_dir holding another run's checkpoints first removes them
    keep_ckpts: int = 2  # also keep the last K checkpoints as ckpt_<step>.pt beside ckpt.pt (hard links; 0 = none)
    eval: bool = True  # evaluate on held-out data at the end (eval.json)
    eval_pairs: int = 1000  # retrieval set size for the end-of-run evaluation
    eval_every: int = 0  # steps between zero-shot checks during training (0 = only at the end; synthetic world)


# What a preset changes beyond the model (TrainConfig and LossConfig fields; LossConfig's defaults are FLAVA's).
# `tiny` is TrainConfig's defaults plus three loss choices, tuned so the default run learns in minutes (README):
# the split masked pass on half of each paired batch and ITM negatives at 0.5 (ALBEF, ViLT), where FLAVA's one
# joint masked pass with 10% negatives left ITM at chance in 900 steps. `base` is the paper's recipe (FLAVA §3.4:
# batch 8192, lr 1e-3, 10k warmup, AdamW beta2 0.999, 0.70/0.15/0.15) with FLIP's 50% patch dropping in the
# contrastive pass and a short unmasked tuning at the end (FLIP §3). `tiny` keeps every patch: its objects cover a
# few patches of a 64 px image, and dropping half of them halved its zero-shot accuracy at equal time. micro_batch:
# what fits a GPU, by `bench.py --fit`'s estimate: `base` runs 1024 pairs per GPU on 8 GPUs as 8 micro-batches of
# 128 (~30 GB of 80), `small` 128 at once (~10 GB) and accumulates on fewer GPUs.
TINY_LOSSES = dict(masked_pass="split", masked_pass_share=0.5, itm_neg_prob=0.5)
RECIPES = {
    "tiny": TINY_LOSSES,
    "tiny_long": dict(TINY_LOSSES, steps=2500, masked_pass_share=1.0),  # ~16 minutes on 2 CPU cores
    "small": dict(batch_size=1024, steps=50_000, lr=1e-3, warmup=2000, beta2=0.999, p_pairs=0.7, p_images=0.15,
                  p_texts=0.15, keep_ratio=0.5, unmasked_steps=2000, image_tokenizer_steps=5000, log_every=50,
                  ckpt_every=1000, micro_batch=128),
    "base": dict(batch_size=8192, steps=150_000, lr=1e-3, min_lr=1e-5, warmup=10_000, beta2=0.999, p_pairs=0.7,
                 p_images=0.15, p_texts=0.15, keep_ratio=0.5, unmasked_steps=5000, image_tokenizer_steps=20_000,
                 log_every=100, ckpt_every=2000, micro_batch=128),
}


def parse_args(argv=None):
    """-> (TrainConfig, the ModelConfig fields given or set by the recipe, LossConfig); a bad flag exits here."""
    return cli.parse_train_args(argv, TrainConfig, RECIPES, __doc__)


# ---------------------------------------------------------------------------------------------
# Schedule: the stages, the learning rate, the sources each step draws from
# ---------------------------------------------------------------------------------------------


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
    """FLAVA §3.4: each step draws one source; stage 2 (unimodal pretraining) draws images and texts only."""
    probs = {"pairs": cfg.p_pairs, "images": cfg.p_images, "texts": cfg.p_texts}
    if stage == "unimodal":
        probs = {"images": 0.5, "texts": 0.5}
    probs = {k: v for k, v in probs.items() if k in available and v > 0}
    if not probs:
        raise ValueError(f"stage {stage!r} has no source to draw from (available: {sorted(available)})")
    return probs


def step_seed(seed: int, step: int) -> int:
    """The seed of every random choice of a step (losses.FLAVALoss.draw). The same on every rank: each
    choice depends on a sample's row in the global batch, not on the rank that holds it."""
    return (seed * 1_000_003 + step) * 4099


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


# ---------------------------------------------------------------------------------------------
# Stage 1: the image tokenizer (its codes are the targets of MIM and MMM-image)
# ---------------------------------------------------------------------------------------------


def train_image_tokenizer(run):
    """Stage 1: the codebook by mini-batch k-means over the patches of image batches (model.KMeansTokenizer says
    why k-means). No gradients, fp32 throughout; the EMA of the codes follows the data closely early (decay 0.5)
    and averages over more batches later (0.99), and dead codes are re-seeded in the first 80% of the stage only,
    so that the last codes have settled."""
    cfg = run.cfg
    tokenizer = KMeansTokenizer(run.mcfg).to(run.device)
    source = "images" if "images" in run.mixture.sources else "pairs"
    batches = loader_for(run, {source: 1.0}, 0)
    gen = torch.Generator(run.device).manual_seed(cfg.seed)  # the re-seeding draws (rank 0's are used)
    bar = tqdm(range(cfg.image_tokenizer_steps), desc="stage 1: image tokenizer", disable=run.rank != 0,
               dynamic_ncols=True)
    for step in bar:
        _, batch = next(batches)
        run.log.note_skipped(batch, "image_tokenizer", step)
        images = to_device(batch, run.device)["image"].float() / 255  # (B, 3, S, S) in [0, 1]
        t = step / max(1, cfg.image_tokenizer_steps - 1)
        stats = tokenizer.learn(images, decay=0.5 + 0.49 * t, reseed=t < 0.8, generator=gen)
        if run.rank == 0 and (step % cfg.log_every == 0 or step == cfg.image_tokenizer_steps - 1):
            bar.set_postfix(mse=f"{stats['recon_mse']:.4f}", base=f"{stats['mean_image_mse']:.4f}",
                            ppl=f"{stats['perplexity']:.0f}")
            run.log({"stage": "image_tokenizer", "step": step, **{k: round(v, 6) for k, v in stats.items()}})
    return tokenizer.eval()


# ---------------------------------------------------------------------------------------------
# The step: forward and backward of one batch (FLAVA §3.2-3.3), then AdamW
# ---------------------------------------------------------------------------------------------


def optimizer_step(run, source, batch, seed, lr):
    """One update on one batch of one source -> (named losses, gradient norm before clipping), on the device.
    In micro-batches of --micro_batch rows where it is set (gradcache.accumulate); fp16 scales the loss first, and
    GradScaler skips the update of a step whose gradients overflowed (runlog.check_finite counts those)."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr

    def backward(loss):
        scaler.scale(loss).backward()

    try:
        losses = gradcache.accumulate(run.step_fn, source, batch, seed, run.cfg.micro_batch, backward, run.autocast)
    except torch.OutOfMemoryError:
        raise SystemExit(distributed.out_of_memory(run.cfg, run.world_size)) from None
    if run.cfg.fsdp and model.logit_scale.grad is not None:  # not sharded (distributed.shard): averaged as DDP does
        torch.distributed.all_reduce(model.logit_scale.grad)
        model.logit_scale.grad /= run.world_size
    scaler.unscale_(optimizer)  # clip the true gradient, not the scaled one
    grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.grad_clip))
    scaler.step(optimizer)  # fp16: skipped when the gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    model.clamp_logit_scale_()
    return losses, grad_norm


# ---------------------------------------------------------------------------------------------
# The loop: stages 2-4 on one step counter
# ---------------------------------------------------------------------------------------------


def start_stage(run, stage, first, n):
    """A stage's loss settings (FLIP's unmasked stage keeps every patch) and its batches, from where it stands."""
    run.objective.cfg = run.loss_cfg if stage != "unmasked" else replace(run.loss_cfg, keep_ratio=1.0)
    probs = stage_probs(run.cfg, stage, run.sources)
    saved = run.resume.get("streams", {}) if run.resume else {}  # a stage resumed mid-way continues its streams
    batches = loader_for(run, probs, run.step - first, saved.get("sources") if saved.get("stage") == stage else None)
    run.print0(f"stage {['unimodal', 'joint', 'unmasked'].index(stage) + 2}: {stage}, steps {first}-{first + n - 1}, "
               f"sources {probs}")
    return batches


def train(run):
    """Stages 2-4 on one optimizer step counter: each step draws one batch of one source (FLAVA §3.4), runs the
    step, and every --log_every steps writes a log line; every --ckpt_every steps a checkpoint."""
    cfg, loss_cfg, plan = run.cfg, run.loss_cfg, stages(run.cfg)
    total = sum(n for _, _, n in plan)
    costs = {(stage, src): flops.flops_per_sample(run.mcfg, src, 1.0 if stage == "unmasked" else loss_cfg.keep_ratio,
                                                  loss_cfg.mask_ratio, loss_cfg.mlm_prob, loss_cfg.masked_pass_share,
                                                  loss_cfg.masked_pass, loss_cfg.mmm_text_prob)
             for stage, _, _ in plan for src in data.SOURCES}  # per sample, for the log's tflops
    bar = tqdm(total=total, initial=run.step, desc="FLAVA", disable=run.rank != 0, dynamic_ncols=True)
    meter, stage, batches = runlog.Meter(), None, None
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
                means = runlog.log_line(run, meter, stage, lr)  # stops the run on a non-finite value
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("total", "gc", "itm", "mim", "mlm")})
                meter = runlog.Meter()
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.world is not None:
                zero_shot_check(run)
                meter.t0 = time.time()  # the clock pauses during evaluation
            if run.step % cfg.ckpt_every == 0 and run.step < total:
                save_checkpoint(run, stage, batches)
    bar.close()
    save_checkpoint(run, stage, batches)


def main(argv=None):
    run = setup(argv)  # flags, processes, data, where the run starts, stage 1, FLAVA and its optimizer
    train(run)  # stages 2-4
    train_time = time.time() - run.t_start
    run.print0(f"training done in {train_time:.0f} s; {run.counters}")
    judged = distributed.unsharded(run.model, run.device, run.cfg.fsdp, run.rank) if run.cfg.eval else None
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
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Setup: processes, data, where the run starts, the image tokenizer, FLAVA and its optimizer
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
    log: runlog.Log
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
    image_tokenizer: torch.nn.Module = None
    model: FLAVA = None
    objective: FLAVALoss = None  # model + image tokenizer -> named losses
    step_fn: object = None  # the objective as the step calls it: bare, under DDP or FSDP, maybe compiled
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None

    def path(self, name):  # ckpt.pt, image_tokenizer.pt, log.jsonl, eval.json
        return os.path.join(self.cfg.out_dir, name)

    @property
    def autocast(self):  # every forward of stages 2-4 and of the evaluations runs under it
        return distributed.autocast(self.device, self.dtype)


class Start(NamedTuple):
    """Where a run starts (starting_point)."""
    mcfg: ModelConfig  # the model config: the flags', the published model's, or the resumed checkpoint's vocabulary
    resume: dict | None  # ckpt.pt of this out_dir: everything continues from its step
    init: dict | None  # --init_from: published or trained weights and their image tokenizer, step 0
    stage1: dict | None  # a saved image tokenizer (image_tokenizer.pt or --image_tokenizer_ckpt): stage 1 skipped


def starting_point(cfg, overrides, current, rank, world_size, device, print0) -> Start:
    """The one decision of where a run starts, as nanoGPT's init_from block. (1) --init_from: a Hugging Face folder
    (converted now) or a nanoFLAVA checkpoint gives the model, its vocabulary and its image tokenizer (where it has
    none, an export that left its k-means codebook out: --image_tokenizer_ckpt's), and training
    starts at step 0 (the model flags given on the command line apply to it; the preset's do not). (2) --resume
    with out_dir/ckpt.pt: the checkpoint's weights, optimizer, scaler, RNG states, step and data position; the
    flags, precision and device kind it would change are refused unless --resume_changes ok. (3) A saved image
    tokenizer without a checkpoint (a run stopped after stage 1, or --image_tokenizer_ckpt): stage 1 is skipped.
    (4) Otherwise from scratch, in an out_dir with no other run's checkpoints (or --overwrite). Rank 0 alone reads
    the disk for (2)-(4) and broadcasts (checkpoints.decide_resume). Bad input raises one ValueError."""
    mcfg, init = ModelConfig.from_preset(cfg.preset, **overrides), None
    if cfg.init_from:
        init = (pretrained.pretrained_checkpoint(cfg.init_from, **overrides) if os.path.isdir(cfg.init_from)
                else checkpoints.load_checkpoint(cfg.init_from))
        mcfg = replace(ModelConfig(**init["model_cfg"]), **overrides)
    # what a checkpoint stores, to compare with a resumed one (vocab_size: the tokenizer's, unless a flag set it)
    current = {**current, "model_cfg": {k: v for k, v in asdict(mcfg).items() if k != "vocab_size" or k in overrides}}
    resume, stage1 = checkpoints.decide_resume(cfg, current, rank, world_size, device, print0)
    if resume is None and init is not None and init["image_tokenizer"] is None:  # e.g. an export without k-means
        if stage1 is None:
            raise ValueError(f"--init_from {cfg.init_from} has no image tokenizer: give the one it was trained with "
                             "(--image_tokenizer_ckpt out/image_tokenizer.pt), or convert it with a codebook (python "
                             "pretrained.py convert FOLDER out/ckpt.pt --codebook facebook/flava-image-codebook)")
        init = {**init, "image_tokenizer": stage1}
        print0(f"--init_from {cfg.init_from}: image tokenizer from {checkpoints.stage1_file(cfg.out_dir, cfg.image_tokenizer_ckpt)}")
    if resume is not None:
        mcfg = replace(mcfg, vocab_size=overrides.get("vocab_size", resume["model_cfg"]["vocab_size"]))
    return Start(mcfg, resume, init, stage1)


def setup(argv) -> Run:
    """Flags -> processes -> where the run starts -> data and vocabulary -> config.json and the log -> stage 1 ->
    FLAVA. Bad input (a missing or empty manifest, shard folder, vocabulary, init or checkpoint, a refused resume)
    stops here: one line, exit status 2. The flags define the model, resumed or not; a resumed run takes its
    vocabulary from the checkpoint."""
    cfg, overrides, loss_cfg = parse_args(argv)  # a bad flag or combination stops here, before any work
    rank, _, world_size, device = distributed.setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dtype = distributed.resolve_dtype(cfg.dtype, device)
    os.makedirs(cfg.out_dir, exist_ok=True)
    print0 = print if rank == 0 else (lambda *a, **k: None)
    current = {"train_cfg": asdict(cfg), "loss_cfg": asdict(loss_cfg), "precision": checkpoints.precision(device, dtype)}
    try:  # every input file is opened (or refused) here, before any compute
        start = starting_point(cfg, overrides, current, rank, world_size, device, print0)
        sources, world, tokenizer = build_data(cfg, start.mcfg, (start.resume or start.init or {}).get("vocab"))
    except (FileNotFoundError, ValueError) as e:
        cli.fail("train.py", e)
    mcfg = start.mcfg
    if start.resume is None and start.init is None and "vocab_size" not in overrides:  # a fresh run: as its tokenizer
        mcfg = replace(mcfg, vocab_size=len(tokenizer))
    if mcfg.vocab_size < len(tokenizer):
        cli.fail("train.py", f"--vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = {"train": asdict(cfg), "model": asdict(mcfg), "loss": asdict(loss_cfg), "world_size": world_size,
              "device": str(device), "dtype": distributed.dtype_name(dtype), "grad_scaler": dtype == torch.float16}
    print0(json.dumps(config, indent=1))  # the resolved config, once; config.json holds the same
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rank == 0 and cfg.resume:  # the steps after the checkpoint are redone: their log rows go
        checkpoints.trim_log(log_path, start.resume["step"] if start.resume else 0,
                             keep_stage1=start.resume is not None or start.stage1 is not None)
    log = runlog.Log(log_path, rank, append=cfg.resume)
    for name, source in sources.items():  # manifest rows that could not be read: counted, the first ones named
        if getattr(source, "num_skipped", 0):
            first = source.skipped[:runlog.NAMED_SKIPS]  # (line, reason)
            print0(f"{name}: skipped {source.num_skipped} manifest rows, first: {first}")
            log({"event": "skipped_rows", "source": name, "count": source.num_skipped, "first": first})
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    run = Run(cfg, mcfg, loss_cfg, rank, world_size, device, dtype, print0, log, sources, data.Mixture(sources),
              world, tokenizer, start.resume, start.init, t_start=time.time(),
              counters={"skipped_samples": 0, "overflow_steps": 0})
    run.image_tokenizer = prepare_image_tokenizer(run, start.stage1)  # stage 1 (or its result, loaded)
    build_model(run)  # after stage 1, which draws from the global generator: FLAVA's init is reseeded
    return run


def build_data(cfg: TrainConfig, mcfg: ModelConfig, vocab=None):
    """The sources a run draws from (files where given, else the synthetic shapes world) and the
    tokenizer: from the checkpoint's vocabulary, a BERT vocab.txt, or built from the data's text."""
    world, corpus = None, []
    if cfg.pairs:
        sources = {"pairs": manifests.FilePairs(cfg.pairs, mcfg.image_size, None, mcfg.text_len)}
        if vocab is None and not cfg.vocab:
            corpus = [sources["pairs"].pair(i)[1] for i in range(min(len(sources["pairs"]), 200_000))]
    elif cfg.shards:
        sources = {"pairs": shards.TarShards(cfg.shards, mcfg.image_size, None, mcfg.text_len, cfg.shard_buffer)}
        corpus = sources["pairs"].captions(200_000) if vocab is None and not cfg.vocab else []
    else:
        world = shapes.ShapesWorld(image_size=mcfg.image_size, seed=cfg.seed)
        sources = {"pairs": data.SyntheticPairs(world, "train", None, mcfg.text_len),
                   "images": data.SyntheticImages(world, "train"),
                   "texts": data.SyntheticTexts(world, "train", None, mcfg.text_len)}
        corpus = world.vocabulary()
    if world is None and cfg.images:
        sources["images"] = manifests.ImageFolder(cfg.images, mcfg.image_size)
    if world is None and cfg.texts:
        sources["texts"] = manifests.TextFile(cfg.texts, None, mcfg.text_len)
        corpus += sources["texts"].lines[:200_000]
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


def loader_for(run, probs, start_step, streams=None):
    """(source, batch) per step (shards.Batches); a source without a length (tar shards) is streamed, from the
    saved state of its readers where given."""
    cfg, device = run.cfg, run.device
    sizes = {k: len(v) if hasattr(v, "__len__") else None for k, v in run.mixture.sources.items()}
    sampler = data.MixtureBatchSampler(sizes, probs, cfg.batch_size, run.rank, run.world_size, cfg.seed, start_step,
                                       seeds=True)  # each crop a function of (seed, source, stream position)
    workers = cfg.workers if cfg.workers >= 0 else (6 if device.type == "cuda" else 0)
    batches = shards.Batches(run.mixture, sampler, workers, device.type == "cuda", streams)
    for note in batches.notes:  # a resume that changed how the shards are read, said once
        run.print0(note)
        run.log({"event": "shard_readers", "note": note})
    return batches


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def prepare_image_tokenizer(run, stage1_state):
    """Stage 1, or what replaces it: a checkpoint's own tokenizer (k-means or DALL-E's encoder), a saved
    image_tokenizer.pt, or the k-means tokenizer trained now. Frozen from here on: its codes are fixed targets."""
    cfg, mcfg, device = run.cfg, run.mcfg, run.device
    if run.resume is not None or run.init is not None:
        tokenizer = image_tokenizer_for(mcfg).to(device)
        load_state(tokenizer, (run.resume or run.init)["image_tokenizer"],
                   f"{run.path('ckpt.pt')} image tokenizer" if run.resume else f"{cfg.init_from} image tokenizer")
    elif stage1_state is not None:
        tokenizer = KMeansTokenizer(mcfg).to(device)
        where = checkpoints.stage1_file(cfg.out_dir, cfg.image_tokenizer_ckpt)
        load_state(tokenizer, stage1_state, where)
        run.print0(f"stage 1: image tokenizer loaded from {where}")
    else:
        tokenizer = train_image_tokenizer(run)
        if run.rank == 0:
            checkpoints.save_atomic(tokenizer.state_dict(), run.path("image_tokenizer.pt"))
    return tokenizer.requires_grad_(False).eval()


def build_model(run):
    """FLAVA (fresh, from --init_from or resumed), its loss, how the step runs it (DDP, FSDP, compiled), AdamW and
    the GradScaler (on for fp16 only)."""
    cfg, resume = run.cfg, run.resume
    torch.manual_seed(cfg.seed)  # FLAVA's initial weights, whatever stage 1 drew from the generator
    model = run.model = FLAVA(run.mcfg).to(run.device)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    run.log({"event": "precision", "dtype": distributed.dtype_name(run.dtype),
             "grad_scaler": run.scaler.is_enabled(), "image_tokenizer": "fp32, no gradients"})
    if run.init is not None and resume is None:
        load_state(model, run.init["model"], f"{cfg.init_from} model")
        run.print0(f"initialised from {cfg.init_from}")
    if resume is not None:
        load_state(model, resume["model"], f"{run.path('ckpt.pt')} model")
        checkpoints.load_scaler(run.scaler, resume["scaler"], run.print0)
        run.step = run.last_saved = resume["step"]
        run.counters.update(resume.get("counters", {}))
        checkpoints.set_rng_state(resume["rng"], run.device)
        run.print0(f"resumed from {run.path('ckpt.pt')} at step {run.step}")
    tokenizer = run.tokenizer
    run.objective = FLAVALoss(model, run.image_tokenizer, run.loss_cfg, tokenizer.mask_id, tokenizer.special_ids)
    # Different sources leave different parameters unused in a step (an image batch never
    # touches the text encoder): DDP must look for them instead of waiting for their gradients.
    if cfg.fsdp:
        run.step_fn = distributed.shard(run.objective)
    else:
        run.step_fn = DDP(run.objective, find_unused_parameters=True) if run.world_size > 1 else run.objective
    run.optimizer = make_optimizer(model, cfg)  # after sharding: FSDP replaces the parameters by their shards
    if resume is not None:
        distributed.load_optimizer(run.optimizer, resume["optimizer"])
    if cfg.compile:
        run.step_fn = compile_step(run.step_fn)
    run.print0(f"FLAVA: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
               f"{run.world_size} process(es) on {run.device}, {distributed.dtype_name(run.dtype)}")


def save_checkpoint(run, stage, batches):
    """Everything a resume needs, written atomically by rank 0 (every rank gathers under FSDP)."""
    streams = {"stage": stage, "sources": shards.stream_states(batches, run.world_size)}  # where shards were read to
    model_state, optimizer_state = distributed.whole_states(run.model, run.optimizer)  # a collective under FSDP
    if run.rank == 0:
        checkpoints.save_atomic({
            "format": checkpoints.FORMAT, "model": model_state, "image_tokenizer": run.image_tokenizer.state_dict(),
            "optimizer": optimizer_state, "scaler": run.scaler.state_dict(), "step": run.step,
            "model_cfg": asdict(run.mcfg), "loss_cfg": asdict(run.loss_cfg), "train_cfg": asdict(run.cfg),
            "precision": checkpoints.precision(run.device, run.dtype), "vocab": run.tokenizer.vocab,
            "rng": checkpoints.rng_state(run.device), "counters": dict(run.counters), "streams": streams},
            run.path("ckpt.pt"))
        checkpoints.prune_checkpoints(run.path("ckpt.pt"), run.step, run.cfg.keep_ckpts)
    run.last_saved = run.step


def zero_shot_check(run):
    """--eval_every: zero-shot accuracy on the synthetic world's held-out scenes, by rank 0."""
    judged = distributed.unsharded(run.model, run.device, run.cfg.fsdp, run.rank)  # under FSDP a collective
    if run.rank == 0:
        judged.eval()
        top1 = evaluation.quick_eval(judged, run.tokenizer, run.world, run.device, run.autocast, n_pairs=0,
                                     per_class=10)["zeroshot_top1"]
        run.log({"step": run.step, "zeroshot_top1": top1, "elapsed_s": round(time.time() - run.t_start, 1)})
        judged.train()


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # runlog.check_finite stopped the run: one line, not a traceback
        raise SystemExit(f"train.py: {e}") from None
