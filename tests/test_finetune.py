"""Tests for finetune.py and tasks.py: every task end to end from a tiny checkpoint, VQA's soft scores, answers
outside the vocabulary, the vocabulary's growth, a model that overfits a batch (and one that cannot without the
image), exact resume, two gloo processes against one, bad rows, and the one-line errors.

    python -m pytest tests/test_finetune.py
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import data
import finetune
import pretrained
import shapes
import shapes_tasks
import tasks
from conftest import SMALL
from model import FLAVA, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--batch_size", "8", "--warmup", "2", "--log_every", "1", "--device", "cpu", "--dtype", "fp32",
        "--workers", "0", "--eval_batch", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny pretrained checkpoint (random weights, the world's vocabulary, 32 px) and one data set per task, its
    images 48 px (the model resizes them to 32)."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = data.Tokenizer.from_corpus(shapes.ShapesWorld().vocabulary())
    cfg = ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": len(tokenizer), "text_len": 16})
    torch.manual_seed(0)
    checkpoints.save_atomic({"format": checkpoints.FORMAT, "model": FLAVA(cfg).state_dict(), "image_tokenizer": None,
                             "model_cfg": asdict(cfg), "step": 0, "vocab": tokenizer.vocab,
                             "train_cfg": {"seed": 0}}, root / "ckpt.pt")
    shapes_tasks.write_shapes_vqa(root / "vqa", n_images=12, per_image=3, val_share=0.25, image_size=48)
    shapes_tasks.write_shapes_images(root / "images", per_class=(1, 1), image_size=48)
    os.makedirs(root / "text")
    shapes_tasks.write_shapes_text(root / "text", n=(32, 16))
    return root


def finetune_run(files, out, task, *args):
    """finetune.main on one task's files -> finetune.json."""
    train, val = {"vqa": ("vqa/train.jsonl", "vqa/val.jsonl"), "multimodal": ("vqa/train.jsonl", "vqa/val.jsonl"),
                  "image": ("images/train", "images/val"), "text": ("text/train.tsv", "text/val.tsv")}[task]
    return finetune.main(["--init", files / "ckpt.pt", "--task", task, "--train", files / train, "--val", files / val,
                          "--out_dir", out, *FAST, *map(str, args)])


@pytest.mark.parametrize("task", ["vqa", "multimodal", "image", "text"])
def test_every_task_runs_end_to_end_and_writes_finetune_json(files, tmp_path, task):
    """Three steps of each task from the tiny checkpoint: finetune.json has the accuracy, the majority baseline, the
    step count and the wall time; ckpt.pt is a nanoFLAVA checkpoint (eval.py's loader reads it) with the head."""
    finetune_run(files, tmp_path, task, "--steps", 3)
    out = json.loads((tmp_path / "finetune.json").read_text())
    assert out["steps"] == 3 and 0 <= out["val_accuracy"] <= 1 and 0 <= out["wall_seconds"] <= out["total_wall_seconds"]
    assert 0 <= out["baselines"]["majority"] <= 1 and ("question_prior" in out["baselines"]) == (task in ("vqa", "multimodal"))
    ckpt = checkpoints.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 3 and len(ckpt["answers"]) == out["answers"] and "head" in ckpt
    if task == "image":  # one class per folder name: 24 classes, 1 image each
        assert out["answers"] == 24 and out["val_rows"] == 24


def test_vqa_soft_scores_by_hand():
    """VQA's accuracy: min(1, annotators / 3) per answer; a single answer scores 1; the predicted answer's score."""
    s = tasks.soft_scores(["two"] * 7 + ["2"] * 2 + ["three"])
    assert s == {"two": 1.0, "2": pytest.approx(2 / 3), "three": pytest.approx(1 / 3)}
    assert tasks.soft_scores(["yes"]) == {"yes": 1.0}
    vocab = {"two": 0, "three": 1, "2": 2}
    t = tasks.targets(s, vocab)
    assert t.tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])  # predicts "2", "three", "two"
    got = finetune.scores("vqa", logits, {"target": t.expand(3, -1)})
    assert got.tolist() == pytest.approx([2 / 3, 1 / 3, 1.0])


def test_val_answers_outside_the_vocabulary_count_as_wrong(files, tmp_path):
    """A val row whose answers training never gave: target zeros and label -1, so it scores 0 whatever the model
    says; the run does not crash and counts the row."""
    scores = tasks.soft_scores(["zebra"] * 10)
    assert tasks.targets(scores, {"red": 0, "blue": 1}).sum() == 0
    assert finetune.scores("multimodal", torch.randn(2, 2), {"label": torch.tensor([-1, -1])}).sum() == 0
    lines = (files / "vqa" / "val.jsonl").read_text().splitlines()
    row = {**json.loads(lines[0]), "answer": "zebra", "answers": ["zebra"] * 10}
    (tmp_path / "val.jsonl").write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    os.symlink(files / "vqa" / "images", tmp_path / "images")
    known = set(tasks.answer_vocab(tasks.QuestionManifest(files / "vqa" / "train.jsonl", 32, 16)))
    unseen = sum(a not in known for a in tasks.top_answers(tasks.QuestionManifest(tmp_path / "val.jsonl", 32, 16)))
    assert unseen >= 1
    for task in ("vqa", "multimodal"):
        out = finetune.main(["--init", files / "ckpt.pt", "--task", task, "--train", files / "vqa" / "train.jsonl",
                             "--val", tmp_path / "val.jsonl", "--out_dir", tmp_path / task, "--steps", 1, *FAST])
        assert out["val_rows_unseen_answer"] == unseen and out["val_accuracy"] <= (len(lines) - unseen) / len(lines)


def test_vocabulary_growth_keeps_old_ids_and_rows_and_adds_new_ones(files):
    """Words the checkpoint lacks get new ids after the old ones; every old id and every old row of the word
    embedding and the two text decoders stays bit for bit; new rows are near the old rows' mean, and differ."""
    init = checkpoints.load_checkpoint(files / "ckpt.pt")
    old = data.Tokenizer(init["vocab"])
    texts = ["what color is the object?", "what color is this object?", "is it a circle?"]
    grown, new = tasks.grow_vocabulary(old, texts, "split", 2)
    assert new == ["color", "object"]  # "this" occurs once: below --min_word_count 2; "it" ... is known
    assert grown.vocab[: len(old)] == old.vocab and grown.index["color"] == len(old)
    assert grown.encode("a red circle", 8)[0].equal(old.encode("a red circle", 8)[0])
    assert grown.encode("color", 4)[0][0].tolist() == [grown.cls_id, len(old), grown.sep_id, grown.pad_id]
    state = tasks.grown_init(init, len(grown), seed=0)
    assert state["model_cfg"]["vocab_size"] == len(grown)
    for key in tasks.VOCAB_ROWS:
        before, after = init["model"][key], state["model"][key]
        assert len(after) == len(grown) and after[: len(old)].equal(before)
        mean, spread = before.float().mean(0), before.float().std(0)
        assert ((after[len(old):] - mean).abs() <= 0.5 * spread + 1e-6).all()
    assert not state["model"][tasks.VOCAB_ROWS[0]][-1].equal(state["model"][tasks.VOCAB_ROWS[0]][-2])
    FLAVA(ModelConfig(**state["model_cfg"])).load_state_dict(state["model"])  # the grown model loads whole
    assert tasks.lacking_words(old, ["is it a circle"], "unk", 1) == []  # spelled in pieces: not [UNK]


def overfit_rows(tmp_path):
    """8 one-object images, two of each of 4 colours, each asked "what colour is it?": the answer needs the image."""
    world, lines = shapes.ShapesWorld(image_size=32), []
    os.makedirs(tmp_path / "images")
    for i in range(8):
        colour, shape = world.COLOURS[i % 4], world.SHAPES[i // 2 % 4]
        Image.fromarray(world.render(world.single("train", i, colour, shape))).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "question": "what colour is it?", "answer": colour}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "rows.jsonl"


def test_a_model_overfits_a_tiny_vqa_batch_and_cannot_without_the_image(files, tmp_path):
    """Trained on 8 rows and judged on the same 8, the whole model reaches accuracy 1.0; with the image blanked
    (the question-only baseline) it cannot exceed the share of the commonest answer, 2/8: every row asks the same
    question, and only the image tells the colour."""
    rows = overfit_rows(tmp_path)
    run = finetune.setup(["--init", files / "ckpt.pt", "--task", "vqa", "--train", rows, "--val", rows, "--out_dir",
                          tmp_path / "out", "--steps", 300, "--lr", "3e-3", *FAST, "--log_every", 100])
    assert finetune.fine_tune(run) == 1.0
    blind = finetune.fresh_run(run, "image", "question_only")
    blind.total = 100
    assert finetune.fine_tune(blind) <= 2 / 8


def test_accuracy_by_kind_of_question_is_each_kinds_own_mean(files, tmp_path):
    """The rows name their kind (VQAv2's "answer_type", or "kind"); validation reports each kind's mean score, equal
    to the rows' scores computed one by one, and a row of no kind counts in the whole only."""
    rows = overfit_rows(tmp_path)
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    for i, row in enumerate(lines[:7]):
        row["answer_type" if i % 2 else "kind"] = "odd" if i % 2 else "even"
    rows.write_text("\n".join(map(json.dumps, lines)) + "\n")
    run = finetune.setup(["--init", files / "ckpt.pt", "--task", "vqa", "--train", rows, "--val", rows, "--out_dir",
                          tmp_path / "out", "--steps", 20, "--lr", "3e-3", *FAST, "--eval_batch", 3])
    accuracy = finetune.fine_tune(run)
    batch = tasks.collate([run.val_set.load(i) for i in range(8)])[1]
    with torch.no_grad():
        score = finetune.scores("vqa", run.model.eval()(**finetune.inputs(run, batch)), batch)  # (8,)
    assert run.val_by_kind == pytest.approx({"even": score[[0, 2, 4, 6]].mean().item(),
                                             "odd": score[[1, 3, 5]].mean().item()})
    assert accuracy == pytest.approx(score.mean().item())
    assert 0 < score.sum() < 8 and run.val_by_kind["even"] != run.val_by_kind["odd"]  # not the same number thrice


def test_exact_resume_after_stopping_half_way(files, tmp_path, monkeypatch):
    """A run of 6 steps, and a run stopped after its checkpoint at step 3 then resumed: the same losses, the same
    weights, head and AdamW state, bit for bit (fp32)."""
    args = ["--steps", 6, "--ckpt_every", 3, "--lr", "1e-3"]
    finetune_run(files, tmp_path / "whole", "vqa", *args)

    class Stop(Exception):
        pass

    real = finetune.save_checkpoint

    def save_then_stop(run):
        real(run)
        if run.step == 3:
            raise Stop

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        finetune_run(files, tmp_path / "halves", "vqa", *args)
    monkeypatch.setattr(finetune, "save_checkpoint", real)
    finetune_run(files, tmp_path / "halves", "vqa", *args, "--resume")
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r]
              for d in ("whole", "halves")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    a, b = (checkpoints.load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("whole", "halves"))
    for part in ("model", "head"):
        assert all(a[part][k].equal(b[part][k]) for k in a[part])
    assert all(x.equal(y) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for x, y in zip(s.values(), t.values()))
    with pytest.raises(SystemExit):  # a resume that changes the recipe is refused
        finetune_run(files, tmp_path / "halves", "vqa", "--steps", 6, "--ckpt_every", 3, "--lr", "5e-4", "--resume")


def test_two_gloo_processes_give_the_one_process_losses(files, tmp_path):
    """torchrun with 2 processes (gloo, 4 rows each) against one process (8 rows): the same loss every step."""
    args = ["--init", files / "ckpt.pt", "--task", "vqa", "--train", files / "vqa" / "train.jsonl", "--val",
            files / "vqa" / "val.jsonl", *FAST, "--steps", 4, "--lr", "1e-3"]
    finetune.main([*args, "--out_dir", tmp_path / "one"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           ROOT / "finetune.py", *map(str, args), "--out_dir", tmp_path / "two"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    one, two = ([r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "loss" in r]
                for d in ("one", "two"))
    assert len(one) == 4 and one == pytest.approx(two, rel=1e-5)
    world = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert world["world_size"] == 2 and world["val_accuracy"] == pytest.approx(
        json.loads((tmp_path / "one" / "finetune.json").read_text())["val_accuracy"], abs=1e-6)


def test_bad_rows_are_skipped_counted_and_the_first_named(files, tmp_path, capsys):
    """Malformed JSON, missing keys, a path out of the folder, a blank question, a text line without a label:
    skipped and counted when the file opens; one line names the first."""
    good = (files / "vqa" / "train.jsonl").read_text().splitlines()[:6]
    bad = ["{not json", json.dumps({"image": "images/x.png", "question": "what?"}),
           json.dumps({"image": "../../etc/passwd", "question": "what?", "answer": "no"}),
           json.dumps({"image": "images/x.png", "question": "  ", "answer": "no"})]
    (tmp_path / "rows.jsonl").write_text("\n".join([good[0], *bad, *good[1:]]) + "\n")
    os.symlink(files / "vqa" / "images", tmp_path / "images")
    ds = tasks.QuestionManifest(tmp_path / "rows.jsonl", 32, 16)
    assert len(ds) == 6 and ds.num_skipped == 4 and [line for line, _ in ds.skipped] == [2, 3, 4, 5]
    assert "escapes" in ds.skipped[2][1]
    (tmp_path / "texts.tsv").write_text("yes\ta red circle\nno label here\n\tblank label\nno\ta\tb\n")
    texts = tasks.LabelledTexts(tmp_path / "texts.tsv", 16)
    assert len(texts) == 2 and texts.num_skipped == 2
    finetune.main(["--init", files / "ckpt.pt", "--train", tmp_path / "rows.jsonl", "--val", tmp_path / "rows.jsonl",
                   "--out_dir", tmp_path / "out", "--steps", 1, *FAST])
    said = [line for line in capsys.readouterr().out.splitlines() if "bad rows" in line]
    assert len(said) == 2 and "skipped 4 bad rows, the first at line 2: malformed JSON" in said[0]


@pytest.mark.parametrize("change, expected", [
    (["--train", "missing.jsonl"], "manifest not found"), (["--task", "audio"], "unknown --task 'audio'"),
    (["--train", "empty.jsonl"], "no usable rows"), (["--init", "nothing.pt"], "does not exist"),
    (["--val", ""], "--val is required")])
def test_bad_input_is_one_line_and_exit_status_2(files, tmp_path, monkeypatch, capsys, change, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n{bad\n")
    args = {"--init": str(files / "ckpt.pt"), "--task": "vqa", "--train": str(files / "vqa" / "train.jsonl"),
            "--val": str(files / "vqa" / "val.jsonl"), "--out_dir": "out"}
    args.update(dict(zip(change[::2], change[1::2])))
    with pytest.raises(SystemExit) as stop:
        finetune.main([*sum(map(list, args.items()), []), *FAST])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("finetune.py: error: ") and expected in line, line


def test_the_head_learns_at_its_own_rate_and_every_parameter_is_in_one_group(files, tmp_path):
    """--head_lr_mult: the new head's parameters (and only they) step at that multiple of the lr, each trainable
    parameter in exactly one AdamW group, decay on weight matrices only (as train.make_optimizer)."""
    run = finetune.setup(["--init", files / "ckpt.pt", "--task", "vqa", "--train", files / "vqa/train.jsonl", "--val",
                          files / "vqa/val.jsonl", "--out_dir", tmp_path / "out", "--steps", 1, "--lr", "1e-3",
                          "--head_lr_mult", "7", *FAST])
    finetune.train_step(run, next(tasks.batches(run.train_set, 8, 0, 1, 0, 0))[1], 1e-3)
    head = {id(p) for p in run.model.head.parameters()}
    seen = [id(p) for g in run.optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in run.trainable) and len(seen) == len(set(seen)) and head <= set(seen)
    for g in run.optimizer.param_groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1 and g["lr"] == pytest.approx(7e-3 if in_head == {True} else 1e-3)
        assert g["weight_decay"] == 0 or all(p.dim() >= 2 for p in g["params"])


def test_a_fine_tuned_model_exports_and_its_folder_is_never_overwritten_by_another_run(files, tmp_path, capsys):
    """A fine-tuned linear-stem FLAVA (its vocabulary grown by the task's words) goes out through pretrained.export
    and comes back with the checkpoint's tensors and vocabulary; a second fresh run into the same --out_dir is
    refused in one line, and --overwrite true replaces the first."""
    init = checkpoints.load_checkpoint(files / "ckpt.pt")
    cfg = ModelConfig(**{**init["model_cfg"], "stem": "linear"})
    torch.manual_seed(1)
    checkpoints.save_atomic({**init, "model": FLAVA(cfg).state_dict(), "model_cfg": asdict(cfg)}, tmp_path / "lin.pt")
    args = ["--init", tmp_path / "lin.pt", "--task", "vqa", "--train", files / "vqa" / "train.jsonl", "--val",
            files / "vqa" / "val.jsonl", "--out_dir", tmp_path / "out", "--steps", 2, "--min_word_count", 1, *FAST]
    out = finetune.main(args)
    assert out["new_words"]  # the task's words are not all in the pretraining vocabulary
    ckpt = checkpoints.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    back = pretrained.pretrained_checkpoint(pretrained.export(tmp_path / "out" / "ckpt.pt", tmp_path / "hf"))
    assert back["vocab"] == ckpt["vocab"] and len(ckpt["vocab"]) == len(init["vocab"]) + len(out["new_words"])
    assert back["model_cfg"] == ckpt["model_cfg"] and back["model"].keys() == ckpt["model"].keys()
    assert all(back["model"][k].equal(ckpt["model"][k]) for k in ckpt["model"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        finetune.main(args)
    [line] = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and "holds another run's checkpoints (ckpt.pt" in line, line
    assert finetune.main([*args, "--overwrite", "true"])["steps"] == 2
