"""Gradient accumulation that keeps every negative (gradcache.accumulate, GradCache): W processes (W = 1, 2, gloo,
real DDP, reducing at the last micro-step only) each splitting its rows into 1, 2 or 4 micro-batches must give
the losses and the gradients of one process with the whole batch in one forward, for the paired step (GC + ITM +
MMM, FLIP keep 0.5, ITM negatives, a masked pass on 3 of 8 rows, ITM read from either pass) and the image-only
(MIM) and text-only (MLM) steps. The negative control, naive accumulation (each micro-batch's contrastive loss
over its own rows), must fail the same comparison. Then train.py's flags and its out-of-memory message.

    python -m pytest tests/test_accumulation.py
"""
import gc

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradcache
import losses
from model import KMeansTokenizer, FLAVA, ModelConfig
from test_distributed import (CFG, LOSS, N_GLOBAL, SEED, initial_state, join_gloo, max_rel_err, rank_batch,
                              run_ranks, step_batch)

RUNS = [(source, masked_pass) for source in ("pairs", "images", "texts") for masked_pass in ("joint", "split")
        if source == "pairs" or masked_pass == "joint"]
MICRO_STEPS = (1, 2, 4)


def loss_fn(state, masked_pass):
    """losses.FLAVALoss (fp32) on the model of `state`, with an image tokenizer whose codes vary (a random codebook)."""
    model = FLAVA(ModelConfig.from_preset("tiny", **CFG))
    model.load_state_dict(state)
    torch.manual_seed(1)
    image_tokenizer = KMeansTokenizer(model.cfg)
    with torch.no_grad():
        image_tokenizer.codebook.uniform_()
    return losses.FLAVALoss(model, image_tokenizer, losses.LossConfig(**LOSS, masked_pass=masked_pass), mask_id=4, special_ids=range(5))


def grads_of(fn):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in fn.model.parameters()]


def reference(state, source, masked_pass):
    """One process, the whole batch, one forward: losses and every parameter's gradient."""
    fn = loss_fn(state, masked_pass)
    out = fn(source, step_batch(), SEED)
    out["total"].backward()
    return {k: v.item() for k, v in out.items()}, grads_of(fn)


def accumulated(state, source, masked_pass, batch, micro, wrap=lambda fn: fn):
    fn = loss_fn(state, masked_pass)
    out = gradcache.accumulate(wrap(fn), source, batch, SEED, micro, backward=lambda loss: loss.backward())
    return {k: v.item() for k, v in out.items()}, grads_of(fn)


def assert_same(got_values, got_grads, ref_values, ref_grads, what):
    for key, ref in ref_values.items():
        assert got_values[key] == pytest.approx(ref, rel=1e-5, abs=1e-7), (what, key)
    assert sum(bool(g.any()) for g in ref_grads) > 10
    names = [name for name, _ in FLAVA(ModelConfig.from_preset("tiny", **CFG)).named_parameters()]
    for name, got, ref in zip(names, got_grads, ref_grads):
        assert max_rel_err(got, ref) < 1e-5 if ref.any() else not got.any(), (what, name)  # measured: 1.4e-6 at most


def test_one_process_in_micro_batches_matches_one_big_batch():
    """W = 1: the 8 rows in 1, 2 and 4 micro-batches, every kind of step; then the negative control."""
    state, batch = initial_state(), step_batch()
    for source, masked_pass in RUNS:
        ref = reference(state, source, masked_pass)
        for k in MICRO_STEPS:
            assert_same(*accumulated(state, source, masked_pass, batch, N_GLOBAL // k), *ref, (source, masked_pass, k))

    # Naive accumulation: the same micro-batches and draws, each with its own contrastive loss (2 rows, 1 negative).
    fn, k = loss_fn(state, "joint"), 4
    parts = gradcache.split(fn, "pairs", batch, fn.draw("pairs", batch, SEED), N_GLOBAL // k)
    for micro, draws in parts:
        out = fn("pairs", micro, SEED, draws=draws)
        (out["total"] - out["gc"] * (1 - 1 / k)).backward()  # the mean of the k micro-batches' GC
    _, ref_grads = reference(state, "pairs", "joint")
    names = [name for name, _ in fn.model.named_parameters()]
    wrong = {name for name, got, ref in zip(names, grads_of(fn), ref_grads) if max_rel_err(got, ref) > 1e-2}
    assert {"image_projection.weight", "text_projection.weight", "logit_scale"} <= wrong


class CountingDDP(DDP):
    """DDP that counts the backward passes it was told not to synchronise."""
    unsynced = 0

    def no_sync(self):
        self.unsynced += 1
        return super().no_sync()


def _worker(rank, world, port, state, out_path):
    join_gloo(rank, world, port)
    try:
        (n, local), results = rank_batch(rank, world), {}
        for source, masked_pass in RUNS:
            for k in MICRO_STEPS:  # real DDP: its no_sync on all but the last micro-step, then its averaging
                ddp = []
                values, grads = accumulated(state, source, masked_pass, local, n // k, wrap=lambda fn: ddp.append(
                    CountingDDP(fn, find_unused_parameters=True)) or ddp[0])
                gathered = [None] * world
                dist.all_gather_object(gathered, values)
                results[source, masked_pass, k] = (gathered, grads, ddp.pop().unsynced)
                gc.collect()  # every DDP reducer freed while the process group lives (else gloo can deadlock)
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_two_ranks_in_micro_batches_match_one_big_batch(tmp_path):
    """W = 2 under DDP: 4 rows per rank in 1, 2 and 4 micro-batches (micro-batches of 1 row, some without a
    masked-pass row): the mean of the ranks' losses and the DDP-averaged gradients are one process's."""
    state = initial_state()
    results = run_ranks(2, state, tmp_path / "ranks.pt", worker=_worker)
    for source, masked_pass in RUNS:
        ref_values, ref_grads = reference(state, source, masked_pass)
        for k in MICRO_STEPS:
            gathered, grads, unsynced = results[source, masked_pass, k]
            assert unsynced == k - 1  # DDP reduces once, at the last micro-step
            mean = {key: sum(v[key] for v in gathered) / 2 for key in ref_values}
            assert_same(mean, grads, ref_values, ref_grads, (source, masked_pass, k))


# ---------------------------------------------------------------------------------------------
# train.py: the flags, and a micro-batch that does not fit


@pytest.mark.parametrize("args, names", [
    (["--batch_size", "8", "--micro_batch", "3"], ["--micro_batch=3", "8 / 2 = 4"]),
    (["--micro_batch", "-1"], ["--micro_batch=-1"]),
    (["--fsdp", "true"], ["--fsdp", "torchrun"]),
], ids=["not_a_divisor", "negative", "fsdp_without_torchrun"])
def test_bad_accumulation_flags_fail_before_any_work(args, names, tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it (but no RANK: the check comes before the group)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        train.main([*args, "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not (tmp_path / "out").exists() and all(name in err for name in names), err


def test_out_of_memory_names_the_micro_batch_and_what_helps(tmp_path, monkeypatch):
    """A forward that runs out of GPU memory (simulated: the CPU has no such error) stops the run with one message."""
    import train
    from test_reliability import TINY

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(losses.FLAVALoss, "step", oom)
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--image_tokenizer_steps", "1", "--micro_batch", "2", "--out_dir", str(tmp_path)])
    message = str(exit_.value.code)
    assert "micro-batch of 2 rows" in message and "--batch_size 8 over 1 process" in message
    assert all(flag in message for flag in ("--micro_batch", "--grad_ckpt true", "--fsdp true", "bench.py --fit"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_micro_batches_match_one_big_batch_in_reduced_precision_on_a_gpu(dtype):
    """fp16 (its GradScaler scaling every micro-step's loss) and bf16 autocast on CUDA: the paired step in 4
    micro-batches gives one forward's gradients, to the precision's rounding."""
    state, batch, grads = initial_state(), {k: v.cuda() for k, v in step_batch().items()}, []
    for micro in (0, 2):
        fn = loss_fn(state, "joint").cuda()
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        gradcache.accumulate(fn, "pairs", batch, SEED, micro, lambda loss: scaler.scale(loss).backward(),
                          torch.autocast("cuda", dtype=dtype))
        grads.append([g / scaler.get_scale() for g in grads_of(fn)])
    assert max(max_rel_err(a, b) for a, b in zip(*grads) if b.any()) < 0.05
