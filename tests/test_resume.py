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
        train.check_resume_flags("ckpt.pt", old, {"loss_cfg": {"masked_pass_share": 1.0}}, accept=False)
    assert train.check_resume_flags("ckpt.pt", old, {"loss_cfg": {"masked_pass_share": 0.5}}, accept=False) == []


def test_the_last_k_checkpoints_are_kept(tmp_path):
    run(tmp_path, "--steps", 7, "--ckpt_every", 2, "--image_tokenizer_steps", 1, "--keep_ckpts", 2)
    kept = sorted(p.name for p in tmp_path.glob("ckpt_*.pt"))
    assert kept == ["ckpt_0000006.pt", "ckpt_0000007.pt"]
    assert [ckpt(tmp_path, name)["step"] for name in kept] == [6, 7] and ckpt(tmp_path)["step"] == 7
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt_0000007.pt")  # a link, not a second copy
    run(tmp_path / "none", "--steps", 2, "--image_tokenizer_steps", 1, "--keep_ckpts", 0)
    assert not list((tmp_path / "none").glob("ckpt_*.pt"))


@pytest.mark.parametrize("case", ["manifest", "shards", "vocab", "no_rows", "ckpt", "image_tokenizer"])
def test_bad_input_at_the_start_is_one_line(case, tmp_path, capsys):
    """A missing manifest, shard folder or vocabulary, a manifest with no usable row, an unreadable checkpoint:
    one line naming the path and what was expected, exit status 2, before any training."""
    (tmp_path / "empty.jsonl").write_text('{"image": "../x.png", "caption": "outside"}\n')
    (tmp_path / "out").mkdir()
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
