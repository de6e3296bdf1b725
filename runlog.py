"""What a training run says while it runs: log.jsonl, the files it skipped, and the check that stops it when a
number stops being finite.

Companion of train.py. Rank 0 writes one JSON object a line to out_dir/log.jsonl (the same values as the
console's postfix). The losses stay on the device between log lines (Meter): a log line is the only
host-device synchronisation, and every checkpoint step is a log step, so no checkpoint is written before its
losses were checked (check_finite). Exercise it with `python -m pytest tests/test_reliability.py`.
"""
import json
import math
import time

import torch
import torch.distributed as dist

NAMED_SKIPS = 10  # unreadable manifest rows and files named in the log (with the reason); the rest are counted


class Log:
    """out_dir/log.jsonl (written by rank 0: one JSON object a line), and the files the batches skipped. A fresh
    run starts the file anew (checkpoints.make_room made sure that no earlier run's checkpoints need it); a
    resumed one appends (checkpoints.trim_log first dropped the rows of the steps it redoes)."""

    def __init__(self, path, rank, append=True):
        self.rank, self.file = rank, open(path, "a" if append else "w") if rank == 0 else None
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
    """The values of the steps since the last log line, kept on the device until a log line reads them back."""

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


def stop_reason(nonfinite, fp16, scale, min_scale, step):
    """Why a run must stop, from this rank's log interval, or "" when it may go on. A non-finite loss is a forward
    that diverged, in every precision. A non-finite gradient norm stops fp32 and bf16; in fp16 it is what
    GradScaler exists for: that step was skipped and the scale halved, so it is counted, not fatal, until the scale
    falls below min_scale. A run whose every step overflows halves its scale each step and, ~166 skips after
    2**16, reaches exactly 0, where growth cannot lift it and every update is 0: it would train nothing and say so
    only in loss_scale."""
    losses = {k: v for k, v in nonfinite.items() if k != "grad_norm" or not fp16}
    if losses:
        return "non-finite " + ", ".join(f"{k} at step {t}" for k, (t, _) in losses.items())
    if fp16 and scale < min_scale:
        skipped = nonfinite.get("grad_norm", (step, 0))[1]
        return (f"the fp16 loss scale fell to {scale:.3g}, below --min_loss_scale {min_scale:g}, by step {step} "
                f"({skipped} overflowing steps since the last log line): the gradients overflow fp16 at any scale")
    return ""


def check_finite(run, nonfinite):
    """Non-finite accounting, over every rank in one all_reduce (with the skipped samples): a stop on any rank
    stops every rank, before the model can be saved, naming the last good checkpoint (FloatingPointError)."""
    fp16 = run.scaler.is_enabled()
    reason = stop_reason(nonfinite, fp16, run.scaler.get_scale() if fp16 else 1.0, run.cfg.min_loss_scale, run.step)
    totals = torch.tensor([run.log.new_skips, bool(reason)], device=run.device)
    if run.world_size > 1:
        dist.all_reduce(totals)  # summed over ranks: skipped samples, ranks that must stop
    if totals[1]:
        kept = f"{run.path('ckpt.pt')}, step {run.last_saved}" if run.last_saved is not None else "none"
        raise FloatingPointError(f"{reason or 'a non-finite value on another rank'}; stopped. "
                                 f"The last good checkpoint is {kept}")
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
