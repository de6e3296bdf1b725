"""Shared test setup: the repository root on sys.path and a small model config.

The chapters are imported lazily (inside the fixture), so a half-edited model.py breaks only
the tests that use it, not the collection of the whole suite.
"""
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

# One intra-op thread: the models here are tiny, and on a shared 2-core machine two OpenMP threads that
# compete with another process spin and stall (measured: the same 150 steps took 2.5 s or 44 s).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A model small enough that a forward + backward takes milliseconds on a 2-core CPU, yet with a
# 4 x 4 patch grid, padding room in the text and vocabularies of different sizes (V != C), so an
# index or head mix-up shows.
SMALL = dict(image_size=32, patch_size=8, width=32, heads=2, image_layers=2, text_layers=2, mm_layers=1,
             vocab_size=100, text_len=12, embed_dim=16, codebook_size=64)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs the CUDA paths; skipped where torch sees no GPU (test_gpu.py)")


@pytest.fixture
def tiny_cfg():
    """The `tiny` preset shrunk to SMALL (width 32, 2 + 2 + 1 layers, 32 px, 4 x 4 grid)."""
    from model import ModelConfig

    return ModelConfig.from_preset("tiny", **SMALL)


def join_ranks(worker, args, nprocs, limit, what):
    """nprocs forked ranks running worker(rank, *args) (fork: the children inherit the imported modules instead of
    importing torch again, ~2 s each on a loaded 2-core machine); killed, and the test failed, if they are not all
    done within limit seconds, so that a hang in a collective fails one test instead of stopping the suite."""
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                             start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} ranks did not finish {what} within {limit} s: a hang")
