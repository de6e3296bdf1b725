"""Resume decided once (train.py): rank 0 alone reads the checkpoint and broadcasts it, so a rank that cannot
see the file (node-local disks) resumes at the same step; the data order is the global batch's, so a run
resumes on another world size; flags that would change the run are refused with the list of differences;
the last K checkpoints are kept; bad input at the start stops with one line and exit status 2.

    python -m pytest tests/test_resume.py
Under torchrun, this file is one rank of a training run that records every step's samples (see the end).
"""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
from test_reliability import ROOT, TINY, ckpt, finish, run, torchrun

ARGS = ["--steps", 8, "--ckpt_every", 2, "--keep_ckpts", 4, "--image_tokenizer_steps", 2]


def record_steps(set_attr):
    """Every FLAVA step's source and a fingerprint of each of its samples, in order."""
    import losses

    record, real_forward = [], losses.FLAVALoss.forward

    def forward(self, source, batch, *args, **kwargs):
        kinds = [batch[k] for k in ("image", "ids") if k in batch]
        record.append([source, [hashlib.md5(b"".join(t[i].numpy().tobytes() for t in kinds)).hexdigest()[:12]
                                for i in range(len(kinds[0]))]])
        return real_forward(self, source, batch, *args, **kwargs)

    set_attr(losses.FLAVALoss, "forward", forward)
    return record


def test_only_rank0_sees_the_checkpoint_and_the_world_size_changes(tmp_path, monkeypatch):
    """A one-process run saves step 4; only rank 0's out_dir holds it (rank 1's is empty, as on another node's
    disk). Two ranks resume from it: both start at step 5 (rank 1 got the checkpoint from rank 0), and each
    step's two halves are the one-process run's batch. The two-rank run's step-6 checkpoint then resumes in
    one process, again with the one-process run's batches; rank 1 never wrote a file."""
    record = record_steps(monkeypatch.setattr)
    run(tmp_path / "one", *ARGS)  # the reference: 8 steps in one process
    ref = list(record)
    assert len(ref) == 8 and {s for s, _ in ref} >= {"pairs"}
    (tmp_path / "two" / "rank0").mkdir(parents=True)
    for name in ("ckpt_0000004.pt", "log.jsonl"):
        shutil.copy(tmp_path / "one" / name, tmp_path / "two" / "rank0" / name.replace("_0000004", ""))
    proc = torchrun([Path(__file__), *TINY, *ARGS, "--resume", "--out_dir", tmp_path / "two" / "rank{RANK}"])
    rc, output = finish(proc, 240)
    assert rc == 0, output[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"record_rank{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # steps 5-8 on both ranks
    for t in range(4):
        assert ranks[0][t][0] == ranks[1][t][0] == ref[4 + t][0]  # the same source on both ranks, as before
        assert ranks[0][t][1] + ranks[1][t][1] == ref[4 + t][1]  # rank 0's half, then rank 1's: the batch
    assert os.listdir(tmp_path / "two" / "rank1") == []
    assert ckpt(tmp_path / "two" / "rank0")["step"] == 8

    (tmp_path / "back").mkdir()
    shutil.copy(tmp_path / "two" / "rank0" / "ckpt_0000006.pt", tmp_path / "back" / "ckpt.pt")
    del record[:]
    run(tmp_path / "back", *ARGS, "--resume")
    assert record == ref[6:] and ckpt(tmp_path / "back")["step"] == 8


def test_changed_flags_are_refused_unless_ok(tmp_path, capsys):
    run(tmp_path, "--steps", 4, "--ckpt_every", 2, "--image_tokenizer_steps", 1)
    capsys.readouterr()
    changes = ["--batch_size", 16, "--image_pool", "mean", "--mask_ratio", 0.5, "--steps", 6]
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path, "--steps", 4, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--resume", *changes)
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.startswith("train.py: error: ") and "ckpt.pt" in line
    for change in ("--batch_size 8 -> 16", "--steps 4 -> 6", "--image_pool 'cls' -> 'mean'", "--mask_ratio 0.383 -> 0.5"):
        assert change in line, line
    assert len(re.findall(r" -> ", line)) == 4 and ckpt(tmp_path)["step"] == 4  # nothing else named, nothing ran
    # flags that cannot change the run pass: where it writes and logs, how it loads, saves and evaluates
    harmless = ["--log_every", 7, "--ckpt_every", 3, "--workers", 0, "--eval", "false", "--keep_ckpts", 1]
    run(tmp_path, "--steps", 4, "--image_tokenizer_steps", 1, "--resume", *harmless)
    run(tmp_path, "--steps", 6, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--resume", "--resume_changes", "ok")
    assert ckpt(tmp_path)["step"] == 6 and ckpt(tmp_path)["train_cfg"]["steps"] == 6
    assert "--resume_changes ok: --steps 4 -> 6" in capsys.readouterr().out


def test_a_renamed_flag_still_works_and_names_the_new_one(capsys):
    """--masked_fraction became --masked_pass_share: the old flag sets the new field and says so, both at once
    are refused, and a checkpoint saved under the old name is compared under the new one on resume."""
    import train

    _, _, loss = train.parse_args(["--masked_fraction", "0.25"])
    assert loss.masked_pass_share == 0.25 and "--masked_pass_share" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["--masked_fraction", "0.25", "--masked_pass_share", "0.5"])
    assert exit_.value.code == 2 and "give only --masked_pass_share" in capsys.readouterr().err
    old = {"loss_cfg": {"masked_fraction": 0.5}}
    with pytest.raises(ValueError, match=r"--masked_pass_share 0.5 -> 1.0"):
        checkpoints.check_resume_flags("ckpt.pt", old, {"loss_cfg": {"masked_pass_share": 1.0}}, accept=False)
    assert checkpoints.check_resume_flags("ckpt.pt", old, {"loss_cfg": {"masked_pass_share": 0.5}}, accept=False) == []


def test_the_last_k_checkpoints_are_kept(tmp_path):
    run(tmp_path, "--steps", 7, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--keep_ckpts", 2)
    kept = sorted(p.name for p in tmp_path.glob("ckpt_*.pt"))
    assert kept == ["ckpt_0000006.pt", "ckpt_0000007.pt"]
    assert [ckpt(tmp_path, name)["step"] for name in kept] == [6, 7] and ckpt(tmp_path)["step"] == 7
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt_0000007.pt")  # a link, not a second copy
    run(tmp_path / "none", "--steps", 2, "--image_tokenizer_steps", 1, "--keep_ckpts", 0)
    assert not list((tmp_path / "none").glob("ckpt_*.pt"))


def resolving_to(monkeypatch, dtype):
    """--dtype auto resolves to dtype, as it would on other hardware (auto: fp16 on a GPU, bf16 on a CPU with
    native bf16, fp32 on an older one); the CPU runs fp16 too, with its GradScaler."""
    import distributed

    monkeypatch.setattr(distributed, "resolve_dtype", lambda name, device: dtype)


def test_a_resume_compares_the_precision_it_resolves_to(tmp_path, monkeypatch, capsys):
    """A run saved in fp32 under --dtype auto, resumed where auto means bf16: refused, naming the change (the
    flag's text is the same). Resumed where auto means fp16 (a CPU checkpoint on a GPU) with --resume_changes
    ok: a fresh GradScaler starts, said in one line, and the run continues and saves fp16's scaler. (Before: the
    first resume silently switched to bf16, the second died in GradScaler.load_state_dict({}).)"""
    args = ["--steps", 4, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--dtype", "auto"]
    resolving_to(monkeypatch, torch.float32)
    run(tmp_path, *args)
    assert ckpt(tmp_path)["precision"] == {"device": "cpu", "dtype": "fp32"} and ckpt(tmp_path)["scaler"] == {}
    capsys.readouterr()
    resolving_to(monkeypatch, torch.bfloat16)
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path, *args, "--steps", 6, "--resume")
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and "precision fp32 -> bf16" in line and "--resume_changes ok" in line, line
    resolving_to(monkeypatch, torch.float16)
    run(tmp_path, *args, "--steps", 6, "--resume", "--resume_changes", "ok")
    out = capsys.readouterr().out
    assert "--resume_changes ok: precision fp32 -> fp16" in out and "--resume_changes ok: --steps 4 -> 6" in out
    assert "the checkpoint has no GradScaler state" in out and "fresh one starts at scale 65536" in out
    saved = ckpt(tmp_path)
    assert saved["step"] == 6 and saved["precision"]["dtype"] == "fp16" and saved["scaler"]["scale"] > 0


def test_the_device_kind_is_compared_too():
    """A GPU checkpoint resumed on a CPU (or the other way) is a change to list, whatever --device said."""
    import checkpoints

    saved = {"train_cfg": {"device": "auto"}, "precision": {"device": "cuda", "dtype": "fp16"}}
    now = {"train_cfg": {"device": "auto"}, "precision": {"device": "cpu", "dtype": "bf16"}}
    assert checkpoints.changes(saved, now) == ["device kind cuda -> cpu", "precision fp16 -> bf16"]
    assert checkpoints.changes(saved, {**now, "precision": saved["precision"]}) == []
    old = {"train_cfg": {"dtype": "auto"}}  # a checkpoint that predates the record: the flag's text is compared
    assert checkpoints.changes(old, {**now, "train_cfg": {"dtype": "bf16"}}) == ["--dtype 'auto' -> 'bf16'"]


def test_a_fresh_run_never_replaces_another_run(tmp_path, capsys):
    """Run A saves steps 2 and 4; run B without --resume in the same folder is refused in one line naming the
    files and the ways out, and A's files are untouched; with --overwrite B first removes A's checkpoints,
    log and evaluation (said in one line), so its log and its last-K checkpoints are its own. (Before: B wrote
    over A's ckpt.pt, pruned by step number into a mix of both runs, and log.jsonl read 1, 2, 3, 4, 1, 2.)"""
    run(tmp_path, "--steps", 4, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--keep_ckpts", 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path, "--steps", 3, "--ckpt_every", 1, "--image_tokenizer_steps", 1)
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and "holds another run's checkpoints (ckpt.pt, ckpt_0000002.pt, ckpt_0000004.pt, " \
        "image_tokenizer.pt)" in line and "--resume" in line and "--overwrite true" in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    run(tmp_path, "--steps", 3, "--ckpt_every", 1, "--image_tokenizer_steps", 1, "--keep_ckpts", 2, "--overwrite")
    assert "--overwrite: removed the earlier run's ckpt.pt, ckpt_0000002.pt, ckpt_0000004.pt, image_tokenizer.pt, " \
        "log.jsonl from" in capsys.readouterr().out
    assert [r["step"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if r.get("stage") == "joint"] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]
    assert ckpt(tmp_path)["train_cfg"]["steps"] == 3 and ckpt(tmp_path, "ckpt_0000002.pt")["train_cfg"]["steps"] == 3
    with pytest.raises(SystemExit):  # --resume and --overwrite contradict each other
        run(tmp_path, "--steps", 3, "--resume", "--overwrite")


def test_a_stage1_file_of_the_old_name_counts_and_is_reused(tmp_path, capsys):
    """dvae.pt (stage 1's file before the image tokenizer's rename) is another run's, and --resume reuses it."""
    run(tmp_path / "a", "--steps", 1, "--image_tokenizer_steps", 1)
    (tmp_path / "b").mkdir()
    os.replace(tmp_path / "a" / "image_tokenizer.pt", tmp_path / "b" / "dvae.pt")
    with pytest.raises(SystemExit):
        run(tmp_path / "b", "--steps", 1)
    assert "holds another run's checkpoints (dvae.pt)" in capsys.readouterr().err
    run(tmp_path / "b", "--steps", 1, "--resume")
    assert "stage 1: image tokenizer loaded from " + str(tmp_path / "b" / "dvae.pt") in capsys.readouterr().out


@pytest.mark.parametrize("case", ["manifest", "shards", "vocab", "no_rows", "ckpt", "image_tokenizer"])
def test_bad_input_at_the_start_is_one_line(case, tmp_path, capsys):
    """A missing manifest, shard folder or vocabulary, a manifest with no usable row, an unreadable checkpoint:
    one line naming the path and what was expected, exit status 2, before any training."""
    (tmp_path / "empty.jsonl").write_text('{"image": "../x.png", "caption": "outside"}\n')
    (tmp_path / "out").mkdir()
    if case == "ckpt":  # (in the other cases another run's checkpoint in out/ would be refused first)
        (tmp_path / "out" / "ckpt.pt").write_bytes(b"half a checkpoint")
    (tmp_path / "image_tokenizer.pt").write_bytes(b"")
    args, expected = {
        "manifest": (["--pairs", tmp_path / "none.jsonl"], "pairs manifest not found: .*none.jsonl"),
        "shards": (["--shards", tmp_path / "none/{00000..00009}.tar"], "--shards .*none/.* no tar shard there"),
        "vocab": (["--vocab", tmp_path / "vocab.txt"], "vocabulary file not found: .*vocab.txt"),
        "no_rows": (["--pairs", tmp_path / "empty.jsonl"], ".*empty.jsonl: no usable rows"),
        "ckpt": (["--resume"], "cannot read checkpoint .*out/ckpt.pt"),
        "image_tokenizer": (["--image_tokenizer_ckpt", tmp_path / "image_tokenizer.pt"], "cannot read image tokenizer checkpoint .*image_tokenizer.pt"),
    }[case]
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path / "out", *args)
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and re.match(f"train.py: error: {expected}", line), line
    assert not (tmp_path / "out" / "log.jsonl").exists()


if __name__ == "__main__":  # under torchrun: one rank, with its own out_dir (rank{RANK}), recording its steps
    sys.path.insert(0, str(ROOT))
    import train

    rank, argv = int(os.environ["RANK"]), sys.argv[1:]
    out_dir = Path(argv[argv.index("--out_dir") + 1].replace("{RANK}", str(rank)))
    argv[argv.index("--out_dir") + 1] = str(out_dir)
    record = record_steps(setattr)
    train.main(argv)
    (out_dir.parent / f"record_rank{rank}.json").write_text(json.dumps(record))
