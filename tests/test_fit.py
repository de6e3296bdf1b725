"""bench.py's scaling tools on a tiny config: --fit's activation count agrees with an independent measure of what a
forward keeps, and its estimate follows from it; --micro times the accumulated step; --precision (GPU only) skips
cleanly on a CPU. A benchmark is not a test, so nothing here checks a timing.

    python -m pytest tests/test_fit.py
"""
import json
from dataclasses import replace

import pytest
import torch

from conftest import SMALL
from test_bench import ARGS


def held_after_forward(cfg, loss_cfg, batch):
    """Bytes allocated and not freed during one forward of the paired step (the profiler's allocation records):
    what the graph keeps for backward, plus the few outputs."""
    import runners

    runner = runners.Ours(cfg, torch.device("cpu"), torch.bfloat16)
    runner.objective.cfg = loss_cfg
    inputs = runners.make_batch(cfg, batch, torch.device("cpu"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with runner.autocast:
            out = runner.objective("pairs", inputs, 0)
    del out
    return sum(event.self_cpu_memory_usage for event in prof.events())


def test_saved_activations_are_what_a_forward_keeps(tiny_cfg):
    """Per pair (the slope from 4 to 8 pairs), the saved-tensors count equals the memory the forward leaves
    allocated, with and without --grad_ckpt (measured: within 2% and 4%); checkpointing keeps much less. Deeper
    encoders than SMALL's, so that the blocks' inputs, all that checkpointing keeps of them, weigh in."""
    import bench
    import losses

    loss_cfg = losses.LossConfig(keep_ratio=0.5, masked_pass_share=1.0)
    per_pair = {}
    for ckpt in (False, True):
        cfg = replace(tiny_cfg, grad_ckpt=ckpt, attn="sdpa", image_layers=4, text_layers=4, mm_layers=2)
        saved = (bench.saved_bytes(cfg, loss_cfg, 8) - bench.saved_bytes(cfg, loss_cfg, 4)) / 4
        held = (held_after_forward(cfg, loss_cfg, 8) - held_after_forward(cfg, loss_cfg, 4)) / 4
        assert saved == pytest.approx(held, rel=0.1), ckpt
        per_pair[ckpt] = saved
    assert per_pair[True] < 0.6 * per_pair[False]


def test_fit_estimate_follows_from_the_measured_activations(tiny_cfg, capsys, tmp_path):
    """CPU: largest micro-batch = (90% of the GPU - 18 bytes per parameter, 16 of them / world with --fsdp) /
    activations per pair; more fits with checkpointing and with FSDP."""
    import bench
    import model as M

    rows = bench.main(ARGS + ["--fit", "--gpu_gb", "0.5", "--world_size", "4", "--json", str(tmp_path / "fit.json")])
    n = sum(p.numel() for p in M.FLAVA(tiny_cfg).parameters())
    assert [r["grad_ckpt"] for r in rows] == [False, True]
    for r in rows:
        per_pair = r["per_pair_mib"] * 2**20
        assert r["largest"] == int((0.45e9 - 18 * n) // per_pair) and r["largest_fsdp"] == int((0.45e9 - 6 * n) // per_pair)
    assert rows[1]["largest"] > rows[0]["largest"] > 0
    assert "| True |" in capsys.readouterr().out
    assert json.loads((tmp_path / "fit.json").read_text())["rows"] == rows  # what .ci/gpu's table reads


def test_bench_times_the_accumulated_step(tmp_path):
    import bench

    rows, checks = bench.main(ARGS + ["--micro", "2", "--cases", "pairs", "--pair_keep", "1.0",
                                      "--json", str(tmp_path / "bench.json")])
    assert {(r["case"], r["keep"]) for r in rows} == {("pairs", 1.0), ("accum", 1.0)}
    assert any(c["name"].startswith("GradCache") and c["value"] > 0 for c in checks)


def test_precision_comparison_skips_without_a_gpu(monkeypatch, capsys):
    import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--precision"]) is None
    assert "no GPU here: skipped" in capsys.readouterr().out
