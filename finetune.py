"""Fine-tuning: a pretrained FLAVA and a small head trained on a downstream task, the evidence of FLAVA §4.

FLAVA (arXiv 2112.04482) §4 and App. B judge the pretrained model by what it becomes when fine-tuned (Tables 3-5):
a head on one of its three [CLS] states, trained with the encoders below it. VQAv2, SNLI-VE and Hateful Memes put
a 2-layer MLP (hidden 2D) on the multimodal encoder's [CLS_M], VQAv2 over its most frequent answers with soft VQA
scores; GLUE fine-tunes the text encoder with a head on [CLS_T]; vision tasks are linear probes on [CLS_I]. AdamW,
weight decay 1e-2, warmup then cosine; VQAv2 at lr 1e-4 (the others 1e-5), batch 256.

    python shapes_tasks.py vqa data/shapes-vqa      # 40,000 questions about 4,000 64-px scenes
    python finetune.py --init out/ckpt.pt --task vqa --train data/shapes-vqa/train.jsonl \
        --val data/shapes-vqa/val.jsonl --out_dir out/vqa   # --baselines: also image blanked, text blanked
    python finetune.py --init out/ckpt.pt --task image --train data/shapes-images/train --val data/shapes-images/val --freeze
    python finetune.py --init out/ckpt.pt --task text --train glue_rte/train.tsv --val glue_rte/dev.tsv
    torchrun --nproc_per_node=2 finetune.py ...   # DDP: gloo on a CPU, nccl on CUDA; --resume continues exactly
    python finetune.py --init flava-full --task vqa --max_answers 3129 --batch_size 256 --steps 44000 ...

--init is a train.py checkpoint or a Hugging Face FLAVA folder. Images of another size than the model's are
resized to it (manifests.read_image); positions are not interpolated (FLAVA fine-tunes VQAv2 at 480 px, positions
interpolated: pretrained.from_pretrained does that for a Hugging Face folder given another image_size). Words
the vocabulary lacks get pieces of their own (tasks.py). Writes into --out_dir: config.json, log.jsonl, ckpt.pt
(a nanoFLAVA checkpoint, which eval.py reads, plus the head) and finetune.json (val_accuracy, the baselines).
The recipe comes first (config, heads, step, loop, main), setup after; data in tasks.py, engineering in train.py's
companions.
"""
import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import cli
import data
import distributed
import pretrained
import runlog
import tasks
import train
from eval import format_table
from model import FLAVA, ModelConfig
from weightfiles import load_state

# ---------------------------------------------------------------------------------------------
# Config: every field is a flag (cli.add_flags); its comment is its --help
# ---------------------------------------------------------------------------------------------


@dataclass
class FinetuneConfig:  # defaults: the shapes VQA set from the default run in minutes on 2 CPU cores
    init: str = ""  # the pretrained model: a train.py ckpt.pt or a Hugging Face FLAVA folder
    task: str = "vqa"  # vqa | multimodal (a head on [CLS_M]) | image ([CLS_I]) | text ([CLS_T])
    train: str = ""  # training data: JSONL manifest (vqa, multimodal), image folder (image), label<TAB>text (text)
    val: str = ""  # validation data of the same kind
    out_dir: str = "out/finetune"  # where config.json, log.jsonl, ckpt.pt and finetune.json go
    freeze: bool = False  # a linear probe: every encoder frozen, the head one Linear (FLAVA's vision protocol)
    frozen: str = ""  # encoders kept frozen while the rest fine-tunes, comma-separated: image, text, mm
    max_answers: int = 0  # keep the most frequent training answers only (VQAv2: 3129); 0 = every one
    new_words: str = "split"  # words the vocabulary lacks, given pieces of their own: split (several pieces) | unk | none
    min_word_count: int = 2  # ... if they occur at least this often in the training text
    baselines: bool = False  # also the same recipe with the image blanked and with the text blanked
    seed: int = 0  # head init (the same on every rank), data order, crops and the new words' noise
    batch_size: int = 64  # global batch per step, split evenly over ranks (paper: 256)
    epochs: float = 2.5  # passes over the training rows, when --steps is 0 (shapes-vqa: 1.5 -> 0.902, 2.5 -> 0.968)
    steps: int = 0  # optimizer steps; 0 = --epochs over the training rows
    lr: float = 4e-4  # peak lr of the model (paper: 1e-4 VQAv2, 1e-5 SNLI-VE, 44,000 and 24,000 steps)
    head_lr_mult: float = 10.0  # the new head's lr, a multiple of --lr (1: yes/no questions stayed at chance)
    min_lr: float = 0.0  # end of the cosine
    warmup: int = 100  # linear warmup steps (paper: 2,000)
    weight_decay: float = 0.01  # AdamW decay on weight matrices only (paper: 1e-2)
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm (after unscaling)
    device: str = "auto"  # auto | cpu | cuda; auto = cuda when available (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # fp16 | bf16 | fp32; auto = fp16 on CUDA, bf16 on a CPU that supports it, else fp32
    min_loss_scale: float = 1e-4  # fp16: stop when GradScaler's scale falls below this
    workers: int = -1  # DataLoader workers per rank; -1 = 6 on CUDA, 0 on CPU
    threads: int = 0  # CPU threads per process; 0 = torch's (on a busy 2-core machine 1 was 4x faster than 2)
    eval_batch: int = 256  # rows per validation forward
    log_every: int = 25  # steps between log lines
    eval_every: int = 0  # steps between validations (0 = at the end only)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: bool = False  # continue from out_dir/ckpt.pt
    resume_changes: str = "refuse"  # refuse | ok: a resume that would change the run stops, listing how, unless ok
    overwrite: bool = False  # a fresh run in an out_dir holding another run's checkpoints first removes them


TASKS = ("vqa", "multimodal", "image", "text")
ENCODERS = {"image": "image_encoder", "text": "text_encoder", "mm": "mm_encoder"}  # --frozen names
USES = {"vqa": ("image", "text", "mm"), "multimodal": ("image", "text", "mm"), "image": ("image",),
        "text": ("text",)}  # the encoders each task's [CLS] state depends on

# ---------------------------------------------------------------------------------------------
# The task heads (FLAVA App. B) on the [CLS] state of the task's encoder
# ---------------------------------------------------------------------------------------------


class Head(nn.Sequential):
    """FLAVA App. B: the multimodal tasks' classifier is a 2-layer MLP with hidden size 1,536, twice the width D
    = 768, on h_CLS_M; the paper names no activation: GELU, as the encoders. With --freeze one Linear, the
    linear probe of its vision tasks. (B, D) -> (B, A) logits."""

    def __init__(self, width, n_out, linear=False):
        super().__init__(*[nn.Linear(width, n_out)] if linear else [nn.Linear(width, 2 * width), nn.GELU(),
                                                                      nn.Linear(2 * width, n_out)])
        for layer in list(self)[::2]:  # N(0, 0.02) and zero biases, as every FLAVA weight
            nn.init.normal_(layer.weight, std=0.02), nn.init.zeros_(layer.bias)


class FineTuned(nn.Module):
    """FLAVA and a head on the [CLS] state its task reads: [CLS_I] or [CLS_T] after the encoder's final LayerNorm
    (what eval.py's probes read), or [CLS_M], token 0 of the multimodal encoder, which fuses the two encoders'
    states from before their final LayerNorm (FLAVA §3.1)."""

    def __init__(self, flava: FLAVA, head: Head, task: str):
        super().__init__()
        self.flava, self.head, self.task = flava, head, task

    def forward(self, image=None, ids=None, attn=None):
        """image (B, 3, S, S) in [0, 1]; ids, attn (B, L) -> logits (B, A)."""
        m = self.flava
        if self.task == "image":
            cls = m.encode_image(image).out[:, 0]  # (B, D) [CLS_I]
        elif self.task == "text":
            cls = m.encode_text(ids, attn).out[:, 0]  # (B, D) [CLS_T]
        else:
            fused = m.encode_multimodal(m.encode_image(image).hidden, m.encode_text(ids, attn).hidden, attn)  # (B, M, D)
            cls = fused[:, 0]  # (B, D) [CLS_M]
        return self.head(cls)  # (B, A)


def task_loss(task, logits, batch):
    """VQA: binary cross-entropy against the soft scores of every answer (Teney et al., arXiv 1708.02711, as the
    VQA heads of MMF, FLAVA's framework), summed over answers and averaged over rows: a question that annotators
    answered in two ways pulls up both. The other tasks: cross-entropy on the label (-1: an answer beyond
    --max_answers, ignored; 0, not NaN, if a batch has only such rows)."""
    if task == "vqa":
        return F.binary_cross_entropy_with_logits(logits.float(), batch["target"], reduction="sum") / len(logits)
    kept = (batch["label"] >= 0).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), batch["label"], ignore_index=-1, reduction="sum") / kept


def scores(task, logits, batch):
    """Each row's accuracy (B,): VQA's soft score of the predicted answer (an answer outside the vocabulary has
    none, so its row scores 0 whatever is predicted), else 1 if the label is predicted (-1 never is)."""
    pred = logits.argmax(-1)  # (B,)
    if task == "vqa":
        return batch["target"].gather(1, pred[:, None])[:, 0]  # (B,)
    return (pred == batch["label"]).float()  # (B,)

# ---------------------------------------------------------------------------------------------
# The step: a forward of the whole model on one batch, AdamW
# ---------------------------------------------------------------------------------------------


def inputs(run, batch):
    """The model's inputs from a batch; a baseline run blanks one modality: every image black (the model sees the
    question alone), or every text "[CLS] [SEP]" (the image alone)."""
    out = {}
    if "image" in batch:
        out["image"] = batch["image"].float() / 255  # (B, 3, S, S) in [0, 1]; the model normalises
        if run.blank == "image":
            out["image"] = torch.zeros_like(out["image"])
    if "ids" in batch:
        keep = int(batch["attn"].sum(1).max())  # the batch's longest text: the padding after it is cut (exact:
        ids, attn = batch["ids"][:, :keep], batch["attn"][:, :keep]  # (B, L') pads are never attended), 20% faster
        if run.blank == "text":
            tok = run.tokenizer
            ids = torch.tensor([tok.cls_id, tok.sep_id] + [tok.pad_id] * (keep - 2)).expand_as(ids)  # (B, L')
        out.update(ids=ids, attn=attn if run.blank != "text" else ids != run.tokenizer.pad_id)
    return out


def train_step(run, batch, lr):
    """One update -> (loss, gradient norm before clipping), on the device. As train.optimizer_step: one autocast,
    the loss scaled for fp16, unscaled before clipping; GradScaler skips a step whose gradients overflowed."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]  # the head: --head_lr_mult
    with run.autocast:
        logits = run.step_fn(**inputs(run, batch))  # (B_local, A)
    loss = task_loss(run.cfg.task, logits, batch)
    run.scaler.scale(loss).backward()  # DDP averages the gradients over ranks here
    run.scaler.unscale_(run.optimizer)  # clip the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, run.cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@torch.no_grad()
def validate(run):
    """Mean accuracy over the val rows, each rank its rows r, r + world, ...; sums all-reduced; also the accuracy
    of each kind of question where the manifest names them (run.val_by_kind; VQAv2's yes/no, number, other). A
    row whose image cannot be read is dropped (counted in run.counters["val_unreadable"]), never replaced."""
    kinds = run.val_set.kinds()  # a kind name a row, or None (a manifest without kinds, images, texts)
    names = sorted({k for k in kinds if k is not None}) if kinds else []
    index = {k: i for i, k in enumerate(names)}  # the sums: score, rows, unreadable, then two a kind
    model, total = run.model.eval(), torch.zeros(3 + 2 * len(names), device=run.device)
    for batch, unreadable, rows in tasks.val_batches(run.val_set, run.rank, run.world_size, run.cfg.eval_batch):
        batch = train.to_device(batch, run.device)
        with run.autocast:
            logits = model(**inputs(run, batch))  # (b, A)
        score = scores(run.cfg.task, logits, batch)  # (b,)
        total[:3] += torch.stack([score.sum(), score.new_tensor(len(logits)), score.new_tensor(unreadable)])
        if names:  # each row's score and 1 added to its kind's two sums (rows of no kind: a last, dropped slot)
            kind = torch.tensor([index.get(kinds[r], len(names)) for r in rows], device=run.device)  # (b,)
            per = torch.zeros(len(names) + 1, 2, device=run.device).index_add_(
                0, kind, torch.stack([score.float(), torch.ones_like(score, dtype=torch.float)], 1))
            total[3:] += per[:-1].flatten()  # (2K,)
    if run.world_size > 1:
        torch.distributed.all_reduce(total)
    run.counters["val_unreadable"] = int(total[2])
    run.val_by_kind = {k: (total[3 + 2 * i] / total[4 + 2 * i].clamp(min=1)).item() for k, i in index.items()}
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()

# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def fine_tune(run):
    """run.total steps from run.step, a log line every --log_every, a checkpoint every --ckpt_every and at the
    end (a baseline run writes none), validations every --eval_every -> the final val accuracy."""
    cfg = run.cfg
    workers = cfg.workers if cfg.workers >= 0 else (6 if run.device.type == "cuda" else 0)
    batches = tasks.batches(run.train_set, cfg.batch_size, run.rank, run.world_size, cfg.seed, run.step, workers,
                            run.device.type == "cuda")  # exactly from where a resumed run stopped
    bar = tqdm(total=run.total, initial=run.step, desc=run.name, disable=run.rank != 0, dynamic_ncols=True)
    meter = runlog.Meter()
    while run.step < run.total:
        _, batch = next(batches)
        run.log.note_skipped(batch, run.name, run.step + 1)  # unreadable images: counted, the first named
        batch = train.to_device(batch, run.device)
        lr = train.lr_at(cfg, "finetune", run.step, run.total)  # warmup, then cosine to --min_lr
        loss, grad_norm = train_step(run, batch, lr)
        run.step += 1
        bar.update(1)
        meter.add(run.step, {"loss": loss, "grad_norm": grad_norm}, cfg.batch_size, 0.0)
        if run.step % cfg.log_every == 0 or run.step % cfg.ckpt_every == 0 or run.step == run.total:
            bar.set_postfix(loss=f"{log_line(run, meter, lr):.4f}")  # stops the run on a non-finite value
            meter = runlog.Meter()
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total:
            run.log({"run": run.name, "step": run.step, "val_accuracy": validate(run)})
            meter.t0 = time.time()  # the clock pauses during validation
        if run.save and run.step % cfg.ckpt_every == 0 and run.step < run.total:
            save_checkpoint(run)
    bar.close()
    if run.save and run.last_saved != run.step:
        save_checkpoint(run)
    accuracy = validate(run)
    run.log({"run": run.name, "step": run.step, "val_accuracy": accuracy, "val_accuracy_by_kind": run.val_by_kind})
    return accuracy


def log_line(run, meter, lr):
    """The steps since the last line -> their mean loss over every rank (runlog.check_finite first)."""
    means, nonfinite = meter.means()
    runlog.check_finite(run, nonfinite)
    loss = torch.tensor([means["loss"], means["grad_norm"]], device=run.device)
    if run.world_size > 1:
        torch.distributed.all_reduce(loss)
        loss /= run.world_size
    dt = time.time() - meter.t0
    run.log({"run": run.name, "step": run.step, "loss": loss[0].item(), "grad_norm": loss[1].item(), "lr": lr,
             "ms_per_step": 1000 * dt / meter.steps, "samples_per_s": meter.samples / dt, **run.counters})
    return loss[0].item()


def main(argv=None):
    run = setup(argv)  # flags, processes, data, vocabulary, where the run starts, the model, AdamW
    results = {"task": run.cfg.task, "val_accuracy": fine_tune(run), "steps": run.step,
               "wall_seconds": round(time.time() - run.t_start, 1), "new_words": run.new_words,
               **tasks.describe(run.train_set, run.val_set, run.answers), "world_size": run.world_size,
               "dtype": distributed.dtype_name(run.dtype), "baselines": tasks.prior_baselines(run.train_set, run.val_set)}
    by_kind = {"val_accuracy": run.val_by_kind} if run.val_by_kind else {}
    if run.cfg.baselines and run.cfg.task in ("vqa", "multimodal"):
        for blank, name in (("image", "question_only"), ("text", "image_only")):  # the same recipe, one input blank
            t0, base = time.time(), fresh_run(run, blank, name)
            results["baselines"][name] = fine_tune(base)
            by_kind.update({name: base.val_by_kind} if base.val_by_kind else {})
            results[f"{name}_wall_seconds"] = round(time.time() - t0, 1)
    results["total_wall_seconds"] = round(time.time() - run.t_start, 1)
    if by_kind:
        results["by_kind"] = by_kind  # {"val_accuracy": {kind: accuracy}, "question_only": ..., "image_only": ...}
    if run.rank == 0:
        with open(run.path("finetune.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(format_table({**{k: v for k, v in results.items() if not isinstance(v, (dict, list))},
                            **{f"baseline {k}": v for k, v in results["baselines"].items()},
                            **{f"{run} {kind}": v for run, d in by_kind.items() for kind, v in d.items()}}))
    if run.world_size > 1:  # DDP's reducer goes first (as train.main)
        run.step_fn = None
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results

# ---------------------------------------------------------------------------------------------
# Setup: flags, processes, data, vocabulary, where the run starts, the model and its optimizer
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What setup builds and the loop reads (runlog.check_finite reads cfg, scaler, step, log, counters, path)."""
    cfg: FinetuneConfig
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the autocast precision (fp32: autocast off)
    print0: object  # print on rank 0, nothing elsewhere
    log: runlog.Log
    tokenizer: data.Tokenizer  # the init's, grown by the new words
    train_set: object  # a tasks.QuestionManifest, LabelledImages or LabelledTexts
    val_set: object
    answers: list  # the answer (or label) vocabulary, most frequent first: the head's outputs
    new_words: list  # the word pieces appended to the init's vocabulary
    total: int  # optimizer steps of the run
    carry: dict  # what the checkpoint carries on from the init (CARRIED)
    t_start: float = field(default_factory=time.time)
    name: str = "finetune"  # or a baseline's name
    blank: str | None = None  # the modality a baseline blanks
    save: bool = True  # baselines write no checkpoints
    step: int = 0
    last_saved: int | None = None
    counters: dict = field(default_factory=lambda: dict(skipped_samples=0, overflow_steps=0))  # resumes included
    model: FineTuned = None
    step_fn: object = None  # the model as the step calls it: bare or under DDP
    val_by_kind: dict = field(default_factory=dict)  # the last validation's accuracy by kind of question
    trainable: list = None
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None

    def path(self, name):
        return os.path.join(self.cfg.out_dir, name)

    @property
    def autocast(self):
        return distributed.autocast(self.device, self.dtype)


def parse_args(argv=None) -> FinetuneConfig:
    """Flags -> FinetuneConfig (an unknown flag exits through argparse); a missing input or a bad value is refused
    in one line, exit status 2, before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, "fine-tuning", FinetuneConfig)
    given = vars(parser.parse_args(None if argv is None else list(map(str, argv))))
    cfg = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's, before any process group exists
    checks = {f"--{k} is required": not getattr(cfg, k) for k in ("init", "train", "val")} | {
        f"unknown --task {cfg.task!r}: choose one of {', '.join(TASKS)}": cfg.task not in TASKS,
        f"--frozen {cfg.frozen!r} may name image, text, mm only": not set(filter(None, cfg.frozen.split(","))) <= set(ENCODERS),
        f"--new_words {cfg.new_words!r} must be split, unk or none": cfg.new_words not in ("split", "unk", "none"),
        f"--resume_changes {cfg.resume_changes!r} must be refuse or ok": cfg.resume_changes not in ("refuse", "ok"),
        "--resume continues the run in --out_dir and --overwrite replaces it: give one": cfg.resume and cfg.overwrite,
        f"--batch_size {cfg.batch_size} must be a positive multiple of the world size {world_size}":
            cfg.batch_size < 1 or cfg.batch_size % world_size}
    for problem in (p for p, failed in checks.items() if failed):
        cli.fail("finetune.py", problem)
    return cfg


def starting_point(cfg, rank, world_size, device, dtype, print0):
    """-> (the checkpoint resumed, or None; the pretrained init, or None when resumed). Resume is decided by rank 0
    and broadcast (checkpoints.decide_resume, which also refuses a fresh run in an out_dir holding another run's
    checkpoints unless --overwrite); the flags a resume would change are refused on every rank, as train.py's."""
    as_train = SimpleNamespace(out_dir=cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite, init_from=cfg.init,
                               image_tokenizer_ckpt="", resume_changes="ok")  # the flags are compared below
    resume, _ = checkpoints.decide_resume(as_train, {}, rank, world_size, device, print0)
    if resume is None:
        return None, open_init(cfg.init)
    # besides checkpoints.HARMLESS, what cannot change the run's numbers: threads, validation batches, baselines
    saved, current = ({"train_cfg": {k: v for k, v in c.items() if k not in ("threads", "eval_batch", "baselines")},
                       "precision": p} for c, p in ((resume["finetune_cfg"], resume["precision"]),
                                                    (asdict(cfg), checkpoints.precision(device, dtype))))
    for change in checkpoints.check_resume_flags(os.path.join(cfg.out_dir, "ckpt.pt"), saved, current,
                                                 cfg.resume_changes == "ok"):
        print0(f"--resume_changes ok: {change}")
    return resume, None


def open_init(path):
    """A Hugging Face FLAVA folder (converted now) or a nanoFLAVA checkpoint, as checkpoints.load_checkpoint."""
    return pretrained.pretrained_checkpoint(path) if os.path.isdir(path) else checkpoints.load_checkpoint(path)


def setup(argv) -> Run:
    """Flags -> processes -> where the run starts -> data and vocabularies -> config.json and the log -> the model.
    Bad input (a missing or empty file, an unknown task, a refused resume) stops here: one line, exit status 2."""
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    rank, _, world_size, device = distributed.setup_distributed(cfg.device)
    print0 = print if rank == 0 else (lambda *a, **k: None)
    try:  # every input is opened (or refused) here, before any compute
        dtype = distributed.resolve_dtype(cfg.dtype, device)
        os.makedirs(cfg.out_dir, exist_ok=True)
        resume, init = starting_point(cfg, rank, world_size, device, dtype, print0)
        mcfg = ModelConfig(**(resume or init)["model_cfg"])
        train_set, val_set = tasks.open_task(cfg.task, cfg.train, cfg.val, mcfg.image_size, mcfg.text_len)
    except (FileNotFoundError, ValueError) as e:
        cli.fail("finetune.py", e)
    if resume is None:  # the words the checkpoint's vocabulary lacks, and the answers, from the training set
        tokenizer, new = tasks.grow_vocabulary(data.Tokenizer(init["vocab"]), train_set.words(), cfg.new_words,
                                               cfg.min_word_count)
        answers, start = tasks.answer_vocab(train_set, cfg.max_answers), {**init, **tasks.grown_init(init, len(tokenizer), cfg.seed)}
    else:  # a resumed run: both as its checkpoint has them
        tokenizer, new, answers, start = data.Tokenizer(resume["vocab"]), resume["new_words"], resume["answers"], resume
    if new:
        print0(f"vocabulary: {len(new)} words of the training text lack a piece of their own ({', '.join(new[:6])}"
               f"{', ...' if len(new) > 6 else ''}): new ids {len(tokenizer) - len(new)}-{len(tokenizer) - 1}, "
               "their embedding and MLM / MMM-text decoder rows at the mean of the old rows + noise")
    for note in tasks.prepare((train_set, val_set), tokenizer, answers, start.get("preprocess") == "squash"):
        print0(note)  # bad rows: counted, the first named, one line a file
    total = cfg.steps or max(1, round(cfg.epochs * len(train_set) / cfg.batch_size))
    config = {"finetune": asdict(cfg), "model": start["model_cfg"], "steps": total, "world_size": world_size,
              "dtype": distributed.dtype_name(dtype), "answers": len(answers), "new_words": new}
    print0(json.dumps(config))  # the resolved config, once (config.json holds the same)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if cfg.resume:  # the steps after the checkpoint are redone: their log rows go
            checkpoints.trim_log(log_path, resume["step"] if resume else 0, keep_stage1=False)
    run = Run(cfg, rank, world_size, device, dtype, print0, runlog.Log(log_path, rank, append=cfg.resume), tokenizer,
              train_set, val_set, answers, new, total, {k: start[k] for k in CARRIED if k in start})
    build_model(run, start)
    return run


# What a fine-tuned checkpoint carries on from the pretrained one: eval.py reads its image tokenizer, its
# pretraining config (which synthetic world it saw) and how a published model resizes.
CARRIED = ("image_tokenizer", "train_cfg", "preprocess", "converted_from")


def build_model(run, start):
    """FLAVA from start (grown pretrained weights, or the resumed checkpoint with its head, AdamW, scaler, step and
    RNG states), its head, which parameters train, how the step runs it (DDP), AdamW and the GradScaler."""
    cfg, resumed = run.cfg, "head" in start
    torch.manual_seed(cfg.seed)  # the head's initial weights, the same on every rank
    flava = FLAVA(ModelConfig(**start["model_cfg"]))
    load_state(flava, start["model"], f"{cfg.init} model")
    head = Head(flava.cfg.width, len(run.answers), linear=cfg.freeze)
    if resumed:
        load_state(head, start["head"], os.path.join(cfg.out_dir, "ckpt.pt"))
    else:  # the output bias at the training answers' prior: the first steps need not learn it (RetinaNet §4.1)
        p = tasks.answer_prior(run.train_set, run.answers).clamp(1e-4, 1 - 1e-4)  # (A,)
        head[-1].bias.data.copy_(p.log() - (1 - p).log() if cfg.task == "vqa" else p.log())  # sigmoid or softmax
    model = run.model = FineTuned(flava, head, cfg.task).to(run.device)
    # Only what the task's [CLS] depends on trains: the contrastive projections and the pretraining heads never
    # get a gradient, so AdamW need not hold them; --freeze and --frozen keep chosen encoders as they are.
    flava.requires_grad_(False)
    frozen = set(ENCODERS) if cfg.freeze else set(filter(None, cfg.frozen.split(",")))
    for name in set(USES[cfg.task]) - frozen:
        getattr(flava, ENCODERS[name]).requires_grad_(True)
    run.trainable = [p for p in model.parameters() if p.requires_grad]
    # The multimodal tasks read the encoders' states before their final LayerNorm: those never get a gradient.
    run.step_fn = DDP(model, find_unused_parameters=True) if run.world_size > 1 else model
    run.optimizer = make_optimizer(model, cfg)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    if resumed:
        distributed.load_optimizer(run.optimizer, start["optimizer"])
        checkpoints.load_scaler(run.scaler, start["scaler"], run.print0)
        run.step = run.last_saved = start["step"]
        run.counters.update(start["counters"])
        checkpoints.set_rng_state(start["rng"], run.device)
        run.print0(f"resumed from {run.path('ckpt.pt')} at step {run.step} of {run.total}")
    run.print0(f"{run.name}: {cfg.task}, {len(run.answers)} answers, {sum(p.numel() for p in run.trainable) / 1e6:.2f}M"
               f" of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters train, {run.total} steps")


def make_optimizer(model, cfg):
    """train.make_optimizer's AdamW (decay on weight matrices only), the new head's parameters in groups of their own
    at --head_lr_mult times the lr: the head starts from nothing and must first find the answers in [CLS_M], while
    the pretrained encoders need only small moves (the step sets each group's lr to lr x lr_scale)."""
    base, head, groups = train.make_optimizer(model, cfg), {id(p) for p in model.head.parameters()}, []
    for group in base.param_groups:  # (decay, no decay) x (encoders, head)
        rest = {k: v for k, v in group.items() if k != "params"}
        for in_head, scale in ((False, 1.0), (True, cfg.head_lr_mult)):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            groups += [{**rest, "params": params, "lr_scale": scale}] if params else []
    return type(base)(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), **({"fused": True} if base.defaults.get("fused") else {}))


def fresh_run(run, blank, name):
    """A baseline: the same recipe from the same pretrained weights, one modality blanked, no checkpoints."""
    base = replace(run, name=name, blank=blank, save=False, step=0, last_saved=None,
                   counters=dict(skipped_samples=0, overflow_steps=0))
    init = open_init(run.cfg.init)
    build_model(base, {**init, **tasks.grown_init(init, len(run.tokenizer), run.cfg.seed)})
    return base


def save_checkpoint(run):
    """A nanoFLAVA checkpoint (checkpoints.FORMAT: eval.py reads the fine-tuned FLAVA) plus the head, the answers
    and everything a resume needs, written atomically by rank 0 through the raw module."""
    if run.rank == 0:
        model = run.model
        checkpoints.save_atomic({
            "format": checkpoints.FORMAT, "model": model.flava.state_dict(), "model_cfg": asdict(model.flava.cfg),
            "step": run.step, "vocab": run.tokenizer.vocab, "head": model.head.state_dict(), "answers": run.answers,
            "new_words": run.new_words, "finetune_cfg": asdict(run.cfg), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "rng": checkpoints.rng_state(run.device), "counters": dict(run.counters),
            "precision": checkpoints.precision(run.device, run.dtype), "image_tokenizer": None, **run.carry},
            run.path("ckpt.pt"))
    run.last_saved = run.step


if __name__ == "__main__":
    try:
        main()
    except FloatingPointError as e:  # runlog.check_finite stopped the run: one line, not a traceback
        raise SystemExit(f"finetune.py: {e}") from None
