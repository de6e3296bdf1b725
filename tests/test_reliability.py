"""Reliability of training (train.py + data.py): exact resume after SIGKILL, atomic checkpoints, hostile
data, numerics, safe loading, configuration errors, and multi-process runs under torchrun (gloo, CPU).

Most runs are train.main() on a tiny model in this process, or in a forked child that SIGKILLs itself at
a chosen point; the multi-process ones start torchrun. Run under torchrun, this file is a probe that
records every step's source and batch size and the first step's gradients (see the end of the file).

    python -m pytest tests/test_reliability.py
"""
import io
import json
import math
import multiprocessing
import os
import random
import re
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "32", "--heads", "2", "--image_layers", "1", "--text_layers", "1", "--mm_layers", "1",
        "--image_size", "32", "--patch_size", "8", "--codebook_size", "32", "--batch_size", "8", "--image_tokenizer_steps", "4", "--eval", "false", "--dtype", "fp32",
        "--workers", "0", "--log_every", "1", "--device", "cpu"]  # the CPU, whatever the machine has
TIMING = ("ms_per_step", "samples_per_s", "tflops")  # the only fields of a log row allowed to differ


def run(out_dir, *args):
    import train

    train.main([*TINY, "--out_dir", str(out_dir), *map(str, args)])


def log_rows(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "log.jsonl")]


def trajectory(out_dir):
    """The log without its timings: image tokenizer rows, every FLAVA step's losses, lr, grad norm, scale, counters."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in log_rows(out_dir)
            if "stage" in row and "event" not in row]


def ckpt(out_dir, name="ckpt.pt"):
    from checkpoints import load_checkpoint

    return load_checkpoint(Path(out_dir) / name)


# ---------------------------------------------------------------------------------------------
# Exact resume: SIGKILL during a checkpoint write, SIGKILL mid-step, resume, compare bit for bit
# ---------------------------------------------------------------------------------------------


def _run_and_die(out_dir, args, how, at):
    """In a forked child: train, and SIGKILL this process halfway through writing the checkpoint of step
    `at` (how="write") or in the middle of step `at`, after its batch was read (how="step")."""
    import losses
    import train

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if how == "write":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == at:
                buf = io.BytesIO()
                real_save(obj, buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a checkpoint reaches the disk
                f.flush()
                die()
            return real_save(obj, f, *a, **k)

        torch.save = save
    else:
        real_forward = losses.FLAVALoss.forward

        def forward(self, source, batch, seed):
            if seed == train.step_seed(0, at - 1):  # step `at` (1-based) of a run with --seed 0
                die()
            return real_forward(self, source, batch, seed)

        losses.FLAVALoss.forward = forward
    run(out_dir, *args)


def run_and_die(out_dir, args, how, at):
    child = multiprocessing.get_context("fork").Process(target=_run_and_die, args=(out_dir, args, how, at))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, f"the child should have been SIGKILLed, exit code {child.exitcode}"


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """Killed while writing the step-6 checkpoint, resumed, killed in the middle of step 11, resumed: the
    same weights, optimizer state and log trajectory, bit for bit, as a run never stopped (fp32, one thread:
    conftest.py). The checkpoints resumed from sit on stage boundaries (3: unimodal -> joint, 9: joint ->
    unmasked), so the stage, its learning rate and its loss config are restored too."""
    args = ["--unimodal_steps", 3, "--steps", 6, "--unmasked_steps", 3, "--ckpt_every", 3]
    run(tmp_path / "ref", *args)

    out = tmp_path / "killed"
    run_and_die(out, args, "write", 6)
    assert ckpt(out)["step"] == 3  # the previous checkpoint survived the crash mid-write ...
    assert (out / "ckpt.pt.tmp").stat().st_size < (out / "ckpt.pt").stat().st_size  # ... beside the torn one
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        ckpt(out, "ckpt.pt.tmp")
    run_and_die(out, [*args, "--resume"], "step", 11)
    assert ckpt(out)["step"] == 9
    run(out, *args, "--resume")

    ref, got = ckpt(tmp_path / "ref"), ckpt(out)
    assert ref["step"] == got["step"] == 12 and ref["model"].keys() == got["model"].keys()
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    for name, tensor in ref["image_tokenizer"].items():
        assert torch.equal(tensor, got["image_tokenizer"][name]), name
    for i, state in ref["optimizer"]["state"].items():
        assert all(torch.equal(v, got["optimizer"]["state"][i][k]) for k, v in state.items()), i
    assert trajectory(out) == trajectory(tmp_path / "ref")  # the rows of the lost steps were dropped on resume
    assert [r["step"] for r in trajectory(out) if r["stage"] != "image_tokenizer"] == list(range(1, 13))


def test_resume_without_a_checkpoint_starts_over(tmp_path):
    """Killed before the first checkpoint (after stage 1 wrote image_tokenizer.pt): --resume reuses image_tokenizer.pt and
    starts at step 0, ending exactly where a run never stopped ends."""
    run(tmp_path / "ref", "--steps", 4, "--ckpt_every", 100)
    out = tmp_path / "killed"
    run_and_die(out, ["--steps", 4, "--ckpt_every", 100], "step", 2)
    assert (out / "image_tokenizer.pt").exists() and not (out / "ckpt.pt").exists()
    run(out, "--steps", 4, "--ckpt_every", 100, "--resume")
    ref, got = ckpt(tmp_path / "ref"), ckpt(out)
    assert all(torch.equal(v, got["model"][k]) for k, v in ref["model"].items())
    assert trajectory(out) == trajectory(tmp_path / "ref")


def test_file_crops_depend_only_on_seed_and_stream_position(tmp_path):
    """Random crops of file datasets are a function of (seed, source, position in the stream): the same
    with 0 or 2 loader workers and whatever the global `random` holds, and different in the next epoch."""
    import data
    import manifests

    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"picture {i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows))
    tok = data.Tokenizer.from_corpus([f"picture {i}" for i in range(5)])
    mixture = data.Mixture({"pairs": manifests.FilePairs(tmp_path / "pairs.jsonl", 16, tok, 8)})

    def images(workers, python_seed):
        random.seed(python_seed)
        sampler = data.MixtureBatchSampler({"pairs": 5}, {"pairs": 1.0}, 5, seed=3, steps=2, seeds=True)
        return [batch["image"] for _, batch in data.make_loader(mixture, sampler, num_workers=workers)]

    main, workers = images(0, 1), images(2, 2)
    assert all(torch.equal(a, b) for a, b in zip(main, workers))
    sampler = data.MixtureBatchSampler({"pairs": 5}, {"pairs": 1.0}, 5, seed=3, steps=2)
    order = [[i for _, i in batch] for batch in sampler]  # each step is one epoch: every image once
    first, second = (dict(zip(o, imgs)) for o, imgs in zip(order, main))
    assert not all(torch.equal(first[i], second[i]) for i in range(5))  # epoch 2 crops each image afresh


# ---------------------------------------------------------------------------------------------
# Hostile data
# ---------------------------------------------------------------------------------------------


def png_header(path, width, height):
    """A valid PNG signature and header that declares width x height pixels, with a few bytes of data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


BAD_FILES = {"zero.png", "truncated.png", "text.png", "random.png", "missing.png", "bomb.png", "bomb_warn.png"}


@pytest.fixture
def hostile(tmp_path):
    """A manifest mixing good pairs, odd-but-valid images and every kind of bad file and row; a text file
    with blank lines, invalid UTF-8 and a 25,000-character line."""
    root = tmp_path / "set"
    root.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rgb.save(root / "rgb.jpg")
    Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16)).save(root / "grey16.png")
    rgb.convert("RGBA").save(root / "rgba.png")
    rgb.convert("P").save(root / "palette.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one.png")
    Image.new("L", (3000, 20), 90).save(root / "wide.png")
    good = ["rgb.jpg", "grey16.png", "rgba.png", "palette.png", "cmyk.jpg", "one.png", "wide.png"]
    (root / "zero.png").write_bytes(b"")
    (root / "truncated.png").write_bytes((root / "grey16.png").read_bytes()[:200])
    (root / "text.png").write_text("this is text, not a PNG")
    (root / "random.png").write_bytes(rng.integers(0, 256, 700, dtype=np.uint8).tobytes())
    png_header(root / "bomb.png", 100_000, 100_000)  # 10^10 px > 2 x MAX_IMAGE_PIXELS: Pillow raises
    png_header(root / "bomb_warn.png", 10_000, 9_000)  # 9 x 10^7 px > MAX_IMAGE_PIXELS: Pillow warns, we refuse
    captions = ["a red thing", "ein Bild: café, 東京, 🙂 ñ", "word " * 600, "a grey square", "a cmyk photo",
                "one pixel", "a very wide strip"]
    rows = [json.dumps({"image": name, "caption": cap}) for name, cap in zip(good, captions)]
    rows += [json.dumps({"image": name, "caption": f"bad file {name}"}) for name in sorted(BAD_FILES)]
    bad_rows = [json.dumps({"image": "../outside.png", "caption": "x"}), json.dumps({"image": "/etc/hostname",
                "caption": "x"}), json.dumps({"image": "rgb.jpg", "caption": " \t "}),
                json.dumps({"image": "rgb.jpg", "caption": ""}), '{"image": "rgb.jpg", "caption": ',
                json.dumps({"img": "rgb.jpg", "text": "x"}), json.dumps(["rgb.jpg", "x"]),
                json.dumps({"image": 3, "caption": "x"}), json.dumps({"image": "rgb.jpg", "caption": None})]
    (root / "pairs.jsonl").write_text("\n".join(rows[:5] + bad_rows + rows[5:]) + "\n\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (root / "texts.txt").write_bytes(b"some text\n\n  \nbroken \xff\xfe utf-8\n" + b"long " * 5000 + b"\nlast line")
    return root, good, len(bad_rows)


def test_hostile_data_trains_and_names_what_it_skips(hostile, tmp_path):
    root, good, n_bad_rows = hostile
    out = tmp_path / "out"
    run(out, "--pairs", root / "pairs.jsonl", "--texts", root / "texts.txt", "--steps", 6, "--image_tokenizer_steps", 2)
    rows = log_rows(out)
    [manifest] = [r for r in rows if r.get("event") == "skipped_rows"]
    assert manifest["count"] == n_bad_rows and len(manifest["first"]) == n_bad_rows
    reasons = " | ".join(reason for _, reason in manifest["first"])
    for why in ("escapes", "blank caption", "malformed JSON", "wrong keys", "wrong types"):
        assert why in reasons
    files = {Path(r["path"]).name: r["reason"] for r in rows if r.get("event") == "skipped_file"}
    assert set(files) == BAD_FILES  # every bad file is named once with its reason; no odd-but-valid image is
    assert "DecompressionBomb" in files["bomb.png"] and "DecompressionBomb" in files["bomb_warn.png"]
    assert "No such file" in files["missing.png"]
    last = [r for r in rows if r.get("stage") == "joint"][-1]
    assert last["step"] == 6 and last["skipped_samples"] >= len(BAD_FILES) and math.isfinite(last["total"])
    assert ckpt(out)["step"] == 6


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """Pillow's pixel limit refuses a 10^10-pixel header at open: no memory is spent on the pixels."""
    import manifests

    png_header(tmp_path / "bomb.png", 100_000, 100_000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(Image.DecompressionBombError):
        manifests.read_image(tmp_path / "bomb.png", 32, True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # < 100 MB, vs 30 GB decoded


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


def poison(monkeypatch, steps, value):
    """Make one loss term of the given (1-based) steps non-finite, and the total with it."""
    import losses
    import train

    real_forward, seeds = losses.FLAVALoss.forward, {train.step_seed(0, s - 1) for s in steps}

    def forward(self, source, batch, seed):
        out = real_forward(self, source, batch, seed)
        if seed in seeds:
            term = sorted(k for k in out if k != "total")[0]
            out[term] = out[term] * value
            out["total"] = out["total"] + out[term]
        return out

    monkeypatch.setattr(losses.FLAVALoss, "forward", forward)


def test_non_finite_loss_stops_the_run_before_the_next_checkpoint(tmp_path, monkeypatch):
    """fp32: a NaN at step 7 is found when step 10 would be saved (log_every is larger): the run stops
    naming the step and the term, and ckpt.pt is still the finite one of step 5."""
    poison(monkeypatch, {7}, math.nan)
    named = r"non-finite (gc|itm|mim|mlm|mmm_\w+) at step 7, .*total at step 7"  # the term, the step, the total
    with pytest.raises(FloatingPointError, match=named) as err:
        run(tmp_path, "--steps", 12, "--ckpt_every", 5, "--log_every", 100)
    assert "step 5" in str(err.value) and str(tmp_path / "ckpt.pt") in str(err.value)
    saved = ckpt(tmp_path)
    assert saved["step"] == 5 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert [r["step"] for r in log_rows(tmp_path) if r.get("stage") == "joint"] == [5]


class InfiniteGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a step whose loss is finite but whose gradients
    overflow, which is what fp16's GradScaler exists for."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


def overflow_gradients(monkeypatch, steps=None):
    """The gradients of the given (1-based) steps overflow (every step's with steps=None); the losses stay finite."""
    import losses
    import train

    real_forward = losses.FLAVALoss.forward
    seeds = None if steps is None else {train.step_seed(0, s - 1) for s in steps}

    def forward(self, source, batch, seed):
        out = real_forward(self, source, batch, seed)
        if seeds is None or seed in seeds:
            out["total"] = InfiniteGradient.apply(out["total"])
        return out

    monkeypatch.setattr(losses.FLAVALoss, "forward", forward)


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    """fp16 + GradScaler (here on the CPU): steps whose gradients overflow (their losses are finite) are skipped
    by the scaler, and overflow_steps counts exactly those (each one halved the scale); the run goes on."""
    import distributed

    monkeypatch.setattr(distributed, "resolve_dtype", lambda name, device: torch.float16)
    overflow_gradients(monkeypatch, {3, 5})
    run(tmp_path, "--steps", 8, "--ckpt_every", 100)
    saved = ckpt(tmp_path)
    skipped = round(math.log2(65536.0 / saved["scaler"]["scale"]))  # GradScaler's initial scale, halved per skip
    rows = [r for r in log_rows(tmp_path) if r.get("stage") == "joint"]
    assert rows[-1]["step"] == 8 and rows[-1]["overflow_steps"] == skipped >= 2  # the first steps may overflow too
    assert all(r["grad_norm"] != r["grad_norm"] for r in rows if r["step"] in (3, 5))  # NaN: skipped, not stopped
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_fp16_stops_on_a_non_finite_loss_as_fp32_does(tmp_path, monkeypatch):
    """fp16: a forward that diverges (an infinite loss at step 7) stops the run at the next log line, naming
    the step and the term, with the last good checkpoint (step 5) kept, as fp32 and bf16 do; the scaler would
    otherwise skip every such step for ever. (Before: fp16 ignored every non-finite value, losses included.)"""
    import distributed

    monkeypatch.setattr(distributed, "resolve_dtype", lambda name, device: torch.float16)
    poison(monkeypatch, {7}, math.inf)
    with pytest.raises(FloatingPointError, match=r"non-finite (gc|itm|mim|mlm|mmm_\w+) at step 7, .*total at step 7"
                       ) as err:
        run(tmp_path, "--steps", 12, "--ckpt_every", 5, "--log_every", 100)
    assert "step 5" in str(err.value) and ckpt(tmp_path)["step"] == 5


def test_fp16_stops_when_the_loss_scale_falls_below_its_floor(tmp_path, monkeypatch):
    """fp16 with every step's gradients overflowing: the scale halves each step (2^16 -> 2^8 by step 8), and
    the run stops at the log line where it is below --min_loss_scale (here 1000), naming the scale, the floor
    and the step, before a checkpoint of the collapsed run is written; the one of step 4 is kept. (Before: the
    run went on to a scale of exactly 0 after ~166 skips and saved checkpoints that had not trained.)"""
    import distributed

    monkeypatch.setattr(distributed, "resolve_dtype", lambda name, device: torch.float16)
    overflow_gradients(monkeypatch)
    with pytest.raises(FloatingPointError, match=r"loss scale fell to 256, below --min_loss_scale 1000, by step 8 "
                       r"\(4 overflowing steps since the last log line\)") as err:
        run(tmp_path, "--steps", 12, "--ckpt_every", 4, "--log_every", 4, "--min_loss_scale", 1000)
    assert "step 4" in str(err.value) and ckpt(tmp_path)["step"] == 4
    assert [r["loss_scale"] for r in log_rows(tmp_path) if r.get("stage") == "joint"] == [4096.0]


def test_logit_scale_stays_in_its_clamp_during_training(tmp_path, monkeypatch):
    """Even an update that pushes logit_scale far past ln(100) every step leaves it clamped."""
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() == 0:  # logit_scale, the one scalar parameter
                    p.data.add_(5.0)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run(tmp_path, "--steps", 4, "--image_tokenizer_steps", 1)
    assert ckpt(tmp_path)["model"]["logit_scale"].item() == pytest.approx(math.log(100))
    assert all(r["logit_scale"] <= 100 + 1e-3 for r in log_rows(tmp_path) if r.get("stage") == "joint")


# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this object would call os.makedirs(path): code run by merely loading a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_resume_refuses_a_checkpoint_that_carries_code(tmp_path, capsys):
    out, marker = tmp_path / "out", tmp_path / "the_code_ran"
    out.mkdir()
    torch.save({"format": "nanoflava-1", "model": {"w": torch.zeros(1)}, "image_tokenizer": Payload(str(marker)),
                "model_cfg": {}, "step": 3, "vocab": []}, out / "ckpt.pt")
    with pytest.raises(SystemExit) as exit_:
        run(out, "--resume")
    assert exit_.value.code == 2  # one line, as argparse's errors, not a traceback
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"train.py: error: refusing to load .*ckpt.pt.*possibly code.*", line)
    assert not marker.exists() and not (out / "image_tokenizer.pt").exists()  # nothing ran, nothing was trained


def test_resume_with_another_width_names_the_mismatching_shapes(tmp_path):
    run(tmp_path, "--steps", 2, "--image_tokenizer_steps", 1)
    with pytest.raises(ValueError, match=r"ckpt.pt image tokenizer does not fit.*codebook: checkpoint \(32, 192\) vs model "
                                         r"\(48, 192\)"):
        run(tmp_path, "--steps", 2, "--codebook_size", 48, "--resume", "--resume_changes", "ok")
    with pytest.raises(ValueError, match=r"ckpt.pt model does not fit.*cls_token: checkpoint \(1, 1, 32\) "
                                         r"vs model \(1, 1, 64\)"):
        run(tmp_path, "--steps", 2, "--width", 64, "--resume", "--resume_changes", "ok")


# ---------------------------------------------------------------------------------------------
# Configuration errors: before any work, naming the fields
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, names", [
    (["--image_size", "60", "--patch_size", "8"], ["image_size=60", "patch_size=8"]),
    (["--width", "30", "--heads", "4"], ["width=30", "heads=4"]),
    (["--keep_ratio", "0"], ["keep_ratio=0.0", "(0, 1]"]),
    (["--keep_ratio", "1.5"], ["keep_ratio=1.5", "(0, 1]"]),
    (["--preset", "gigantic"], ["preset 'gigantic'"]),
    (["--widht", "64"], ["unrecognized arguments: --widht"]),
    (["--batch_size", "7"], ["batch_size=7", "world size 2"]),
], ids=["patch", "heads", "keep0", "keep1.5", "preset", "unknown_flag", "batch_vs_world"])
def test_bad_configuration_fails_before_any_work(args, names, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path / "out", *args)
    assert exit_.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


def test_a_missing_gpu_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """--device cuda without a GPU, and torchrun's second process on a machine with one GPU (it would ask for
    cuda:1), stop at parsing with one line naming the device and the way out; cpu never asks CUDA anything."""
    import distributed
    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cases = ((0, 0, "cuda", "device=cuda, but this torch .* sees no GPU"),
             (1, 1, "auto", r"process 1 .* needs cuda:1, but 1 GPU\(s\) are visible"))
    for gpus, local_rank, device, expected in cases:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        with pytest.raises(SystemExit) as exit_:
            train.main(["--device", device, "--out_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and re.search(expected, err[-1]) and "--device cpu" in err[-1], err
        assert not (tmp_path / "out").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 / 0)  # cpu must not even count the GPUs
    assert distributed.pick_device("cpu", local_rank=3) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Distributed: torchrun with 2 CPU processes (gloo)
# ---------------------------------------------------------------------------------------------


def torchrun(args, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def finish(proc, timeout):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
        pytest.fail(f"torchrun still running after {timeout} s: a hang\n{proc.communicate()[0][-3000:]}")
    return proc.returncode, output


def install_probes(set_attr, out_dir, rank):
    """Record (source, local batch size) of every FLAVA step, and save the gradients that the first FLAVA
    step of each source clips (after DDP's averaging) to out_dir/grads_{source}_rank{rank}.pt."""
    import losses

    record, real_forward, real_clip = [], losses.FLAVALoss.forward, torch.nn.utils.clip_grad_norm_

    def forward(self, source, batch, seed):
        record.append([source, len(batch["ids" if "ids" in batch else "image"])])
        return real_forward(self, source, batch, seed)

    def clip(params, *a, **k):
        params, path = list(params), Path(out_dir) / f"grads_{record[-1][0]}_rank{rank}.pt"
        if not path.exists():
            torch.save([p.grad for p in params], path)
        return real_clip(params, *a, **k)

    set_attr(losses.FLAVALoss, "forward", forward)
    set_attr(torch.nn.utils, "clip_grad_norm_", clip)
    return record


def test_torchrun_two_ranks_match_one_process_with_the_whole_batch(tmp_path, monkeypatch):
    """torchrun, 2 CPU ranks, a 13-pair manifest (no global batch of 8 divides it), an image folder and a
    text file: the run ends; every rank draws the same source each step and always a full local batch (the
    short shard is padded by wrapping into the next epoch, never dropped); and the DDP-averaged gradients of
    the first paired step (GC + ITM + MMM-image + MMM-text), image-only step (MIM) and text-only step (MLM)
    equal those of one process with the whole batch. Every loss is on, with FLIP's keep ratio 0.5, ITM
    negatives and the masked pass on 3 of the 8 rows (2 on rank 0, 1 on rank 1). lr 0 keeps the weights of
    the later steps equal (Adam would turn a rounding difference in a near-zero gradient into a step of size
    lr), and both runs share one image tokenizer."""
    from model import KMeansTokenizer, ModelConfig

    for i in range(13):
        Image.new("RGB", (20 + i, 24), (20 * i, 255 - 15 * i, 90)).save(tmp_path / f"{i}.png")
        folder = tmp_path / "classes" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20 + i), (90, 20 * i, 255 - 15 * i)).save(folder / f"{i}.png")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"colour {i} x{i % 3}"})
                                                  + "\n" for i in range(13)))
    (tmp_path / "texts.txt").write_text("".join(f"text line {i} of {5 - i}\n" for i in range(5)))
    torch.manual_seed(0)
    image_tokenizer = KMeansTokenizer(ModelConfig.from_preset("tiny", image_size=32, patch_size=8, codebook_size=32))
    with torch.no_grad():  # codes that vary: a random codebook in pixel space
        image_tokenizer.codebook.uniform_()
    torch.save(image_tokenizer.state_dict(), tmp_path / "image_tokenizer.pt")
    args = [*TINY, "--pairs", tmp_path / "pairs.jsonl", "--images", tmp_path / "classes", "--texts",
            tmp_path / "texts.txt", "--steps", 8, "--p_pairs", 0.34, "--p_images", 0.33, "--p_texts", 0.33,
            "--image_tokenizer_ckpt", tmp_path / "image_tokenizer.pt", "--lr", 0, "--keep_ratio", 0.5, "--itm_neg_prob", 0.5,
            "--masked_pass_share", 0.375, "--init_std", 0.2]
    proc = torchrun([Path(__file__), *args, "--out_dir", tmp_path / "two"])
    try:  # meanwhile, the same run in this one process
        (tmp_path / "one").mkdir()
        record = install_probes(monkeypatch.setattr, tmp_path / "one", 0)
        run(tmp_path / "one", *args[len(TINY):])
    finally:
        rc, output = finish(proc, 240)
    assert rc == 0, output[-3000:]

    ranks = [json.loads((tmp_path / "two" / f"sources_rank{r}.json").read_text()) for r in range(2)]
    assert [s for s, _ in ranks[0]] == [s for s, _ in ranks[1]] == [s for s, _ in record]  # same source
    assert {"pairs", "images", "texts"} == {s for s, _ in record}
    assert all(n == 4 for r in ranks for _, n in r) and all(n == 8 for _, n in record)
    for source in ("pairs", "images", "texts"):
        one = torch.load(tmp_path / "one" / f"grads_{source}_rank0.pt")
        for r in range(2):
            two = torch.load(tmp_path / "two" / f"grads_{source}_rank{r}.pt")
            assert len(one) == len(two) and sum(g is not None and g.abs().sum() > 0 for g in one) > 10
            for a, b in zip(one, two):
                if a is None or not a.abs().sum():
                    assert b is None or not b.abs().sum()
                else:
                    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-5, source  # fp32 rounding: ~1e-6
    assert ckpt(tmp_path / "two")["step"] == 8


def test_a_dying_rank_stops_the_whole_run(tmp_path):
    """SIGKILL one of two ranks mid-training: torchrun ends the other one and exits non-zero with a
    ChildFailedError that names the rank and the signal, instead of leaving rank 0 blocked in a collective."""
    out = tmp_path / "out"
    proc = torchrun(["train.py", *TINY, "--steps", 100_000, "--image_tokenizer_steps", 1, "--out_dir", out])
    deadline = time.monotonic() + 180
    while not (out / "log.jsonl").exists() or '"joint"' not in (out / "log.jsonl").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"training never started:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.2)
    workers = {}  # rank -> pid, for the children of torchrun
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == proc.pid:
            workers[next(int(e[5:]) for e in env if e.startswith(b"RANK="))] = int(stat.parent.name)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    rc, output = finish(proc, 60)  # a hang (rank 0 blocked in a collective) fails there
    assert rc != 0
    assert "ChildFailedError" in output and "rank      : 1" in output and "SIGKILL" in output, output[-3000:]
    assert not Path(f"/proc/{workers[0]}").exists()  # rank 0 is gone too


if __name__ == "__main__":  # under torchrun (the test above): one rank of a training run, with probes
    sys.path.insert(0, str(ROOT))
    import train

    out_dir, rank = Path(sys.argv[sys.argv.index("--out_dir") + 1]), int(os.environ.get("RANK", 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    record = install_probes(setattr, out_dir, rank)
    train.main(sys.argv[1:])
    (out_dir / f"sources_rank{rank}.json").write_text(json.dumps(record))
