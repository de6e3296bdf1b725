"""eval.py: retrieval metrics against hand-computed cases, the probe on separable and on random
features, the VQA set against the scene graphs, masked inference's kept tokens, refusal of
checkpoints that are not ours, and the whole suite on a tiny random checkpoint (synthetic and files)."""
import json
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import shapes
import eval as E
from conftest import SMALL
from model import KMeansTokenizer, FLAVA, ModelConfig

WORLD = shapes.ShapesWorld(image_size=32)


def test_recall_at_k_by_hand_with_ties():
    sim = torch.tensor([[0.9, 0.1, 0.5],  # query 0: its own candidate is the best   -> rank 0
                        [0.2, 0.3, 0.3],  # query 1: tied with candidate 2, a tie counts against it -> rank 1
                        [0.8, 0.7, 0.6]])  # query 2: two candidates above it        -> rank 2
    assert E.recall_at_k(sim, ks=(1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
    # the transpose ranks text -> image: columns 0 and 2 win outright, column 1 loses to 0.7
    r = E.retrieval(sim, ks=(1, 2))
    assert r == pytest.approx({"i2t_r1": 1 / 3, "i2t_r2": 2 / 3, "t2i_r1": 2 / 3, "t2i_r2": 1.0})
    # a collapsed model (every score equal) retrieves nothing until k covers all candidates
    assert E.recall_at_k(torch.ones(10, 10)) == {1: 0.0, 5: 0.0, 10: 1.0}


def test_probe_separates_what_is_separable_and_nothing_else():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (600,), generator=gen)
    means = 3 * torch.randn(4, 16, generator=gen)
    x = means[y] + torch.randn(600, 16, generator=gen)  # (n, F): classes apart by ~4 standard deviations
    assert E.fit_head(x, y, E.split_of(600)).float().mean() > 0.98
    noise = torch.randn(1500, 32, generator=gen)
    y = torch.randint(0, 4, (1500,), generator=gen)
    rng_before, threads = torch.get_rng_state(), torch.get_num_threads()
    correct = E.fit_head(noise, y, E.split_of(1500))
    assert len(correct) == 300 and abs(correct.float().mean().item() - 0.25) < 0.08  # chance: 1/4
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads


def test_splits_are_contiguous_and_disjoint():
    split = E.split_of(10)
    assert split.tolist() == [0] * 6 + [1] * 2 + [2] * 2


def test_vqa_set_matches_the_scene_graphs():
    scenes, rows = E.vqa_set(WORLD, 150)
    answers, kinds = WORLD.answers(), set()
    for i, question, label, kind in rows:
        scene, answer = scenes[i], answers[label]
        assert scene == WORLD.scene("val", E.FIRST["scenes"] + i)  # the row points at its own scene
        objects = scene["objects"]
        if kind == "count":
            assert answer == str(len(objects))
        elif kind == "colour":
            assert [o["colour"] for o in objects if o["shape"] == question.split()[-1][:-1]] == [answer]
        elif kind == "yesno":
            colour, shape = question[len("is there a "):-1].split()
            assert answer == ("yes" if any((o["colour"], o["shape"]) == (colour, shape) for o in objects) else "no")
        else:
            assert kind == "which" and answer in {o["shape"] for o in objects}
        kinds.add(kind)
    assert kinds == set(E.QUESTION_TYPES.values())


def tiny_model(seed=0, init_std=0.02):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": len(tokenizer().vocab), "init_std": init_std})
    return FLAVA(cfg).eval(), KMeansTokenizer(cfg).eval(), cfg


def tokenizer():
    return data.Tokenizer([*data.SPECIALS, *WORLD.vocabulary()])


def test_mmm_attr_acc_by_number_of_objects(monkeypatch):
    """mmm_attr_acc_{k}obj counts the asked words of k-object scenes only: a model that names every masked word of
    one-object scenes right and every other one wrong scores 1 / 0 / 0, and the overall share of right words."""
    model, image_tokenizer, cfg = tiny_model()
    images, captions, scenes = E.synthetic_pairs(WORLD, 60)
    ids, _ = tokenizer().encode(captions, cfg.text_len)  # (n, L) the true words
    single = torch.tensor([len(s["objects"]) == 1 for s in scenes])  # (n,)

    def predictions(model, images, masked_ids, attn, patch_masked, device, autocast):
        n, P = len(images), cfg.num_patches
        said = torch.where(single[:, None], ids, torch.zeros_like(ids))  # right on one-object rows, [PAD] elsewhere
        return {"mim": torch.zeros(n, P, dtype=torch.long), "mmm_image": torch.zeros(n, P, dtype=torch.long),
                "mmm_text": said}

    monkeypatch.setattr(E, "masked_predictions", predictions)
    r = E.fusion_metrics(model, image_tokenizer, tokenizer(), WORLD, images, captions, scenes, 0.383, "cpu",
                         torch.autocast("cpu", enabled=False))
    kinds = [WORLD.COLOURS, sum(WORLD.SHAPE_WORDS.values(), ())]  # even rows: colours asked; odd rows: shapes
    asked_ids = [{tokenizer().index[w] for w in kind} for kind in kinds]
    words = [sum(t in asked_ids[i % 2] for t in row) for i, row in enumerate(ids.tolist())]  # per caption, as cut
    assert all(k in {len(s["objects"]) for s in scenes} for k in (1, 2, 3))
    assert (r["mmm_attr_acc_1obj"], r["mmm_attr_acc_2obj"], r["mmm_attr_acc_3obj"]) == (1.0, 0.0, 0.0)
    assert r["mmm_attr_acc"] == pytest.approx(sum(w for w, s in zip(words, single) if s) / sum(words))


def test_masked_inference_keeps_the_right_number_of_patches():
    model, _, cfg = tiny_model()
    outputs, encode = [], model.encode_image

    def spy(images, patch_masked=None, keep_idx=None):  # records what the image encoder returned
        encoded = encode(images, patch_masked, keep_idx)
        outputs.append((keep_idx, encoded.out))
        return encoded

    model.encode_image = spy
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    labels, held = torch.randint(0, 3, (10,)), torch.zeros(10, dtype=torch.bool)
    names, off = ["red circle", "blue star", "green square"], torch.autocast("cpu", enabled=False)
    results = E.zero_shot(model, tokenizer(), images, labels, held, names, ("a {}.",), "cpu", off, drops=(50, 75))
    assert list(results) == ["zeroshot_top1", "zeroshot_drop50_top1", "zeroshot_drop75_top1"]
    assert outputs[0][0] is None and outputs[0][1].shape[1] == 1 + 16  # unmasked: [CLS_I] + all 16 patches
    for (keep_idx, out), kept in zip(outputs[1:], (8, 4)):  # 50% and 75% of the 4 x 4 grid dropped
        assert keep_idx.shape == (10, kept) and out.shape[1] == 1 + kept
        assert all(len(set(row.tolist())) == kept for row in keep_idx)  # distinct patches per image
    class_emb = E.class_embeddings(model, tokenizer(), names, ("a {}.",), "cpu", off)
    for key, (_, out) in zip(results, outputs):  # each accuracy is read from its own pass
        correct = (model.image_embed(out) @ class_emb.T).argmax(1) == labels
        assert results[key] == pytest.approx(correct.float().mean().item())
    emb = E.image_features(model, images, "cpu", off)[1]  # the unmasked pass is the model's own embedding
    assert torch.allclose(emb, model.image_embeddings(images.float() / 255), atol=1e-6)


class Payload:
    """Unpickling this would run code: here, create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def refused(capsys, argv, message):
    """eval.main(argv) stops as argparse does on bad input: exit status 2, one line on stderr matching message."""
    with pytest.raises(SystemExit) as exit_:
        E.main(argv)
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and re.match(rf"eval.py: error: .*({message})", line), line


def test_checkpoints_that_are_not_ours_are_refused(tmp_path, capsys):
    model, image_tokenizer, cfg = tiny_model()
    good = {"format": "nanoflava-2", "model": model.state_dict(), "image_tokenizer": image_tokenizer.state_dict(), "model_cfg": asdict(cfg),
            "step": 0, "vocab": tokenizer().vocab}
    marker = tmp_path / "code_ran"
    cases = {"code.pt": {**good, "extra": Payload(str(marker))}, "keys.pt": {"model": model.state_dict()},
             "format.pt": {**good, "format": "other"}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "bytes.pt").write_bytes(os.urandom(4096))
    expected = {"code.pt": "refusing", "keys.pt": "not a nanoFLAVA checkpoint", "format.pt": "not a nanoFLAVA",
                "bytes.pt": "refusing|cannot read", "missing.pt": "does not exist"}
    for name, message in expected.items():
        refused(capsys, ["--device", "cpu", "--ckpt", str(tmp_path / name), "--skip_figures"], message)
    assert not marker.exists()  # the pickled code never ran


KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "retrieval_pairs", "retrieval_images",
        "itm_acc", "itm_auc", "itm_auc_hard", *(f"itm_auc_hard_{k}" for k in ("colour", "shape", "size", "relation")),
        "mmm_attr_acc", "mmm_attr_acc_blank", "mmm_attr_acc_1obj", "mmm_attr_acc_2obj", "mmm_attr_acc_3obj", "mmm_image_acc", "mim_acc", "code_majority_acc", "codebook_mean_image_mse",
        "zeroshot_top1", "zeroshot_heldout_top1", "zeroshot_drop50_top1", "zeroshot_drop75_top1",
        "probe_image_shape", "probe_image_colour", "probe_image_count", "probe_text_count", "probe_text_relation",
        *(f"vqa_{h}{k}" for h in ("multimodal", "image_only", "text_only")
          for k in ("", "_count", "_colour", "_yesno", "_which")),
        "codebook_recon_mse", "codebook_perplexity", "codebook_codes_used", "skipped_files", "step", "eval_seconds"}


def write_checkpoint(folder):
    model, image_tokenizer, cfg = tiny_model(init_std=0.2)  # embeddings far apart: zero-shot and retrieval not all ties
    # written as before the image tokenizer's rename (format nanoflava-1: "dvae"), which must still load
    torch.save({"format": "nanoflava-1", "model": model.state_dict(), "dvae": image_tokenizer.state_dict(),
                "model_cfg": {**asdict(cfg), "image_tokenizer": "dvae"}, "step": 7, "vocab": tokenizer().vocab, "train_cfg": {"seed": 0, "pairs": ""},
                "loss_cfg": {"mask_ratio": 0.383}}, folder / "ckpt.pt")
    with open(folder / "log.jsonl", "w") as f:
        for step in range(0, 50, 10):
            f.write(json.dumps({"stage": "joint", "step": step, "total": 9 - step / 10, "gc": 4.0 - step / 100}) + "\n")
        f.write('{"step": 60, "tot')  # a line cut off by a crash
    return folder / "ckpt.pt"


def known_features(monkeypatch, images, captions):
    """Give the suite's features known values on these pairs (recognised by content, not by position): image i
    and caption i get the one-hot contrastive embedding e_i, except caption 0, which gets e_1 (it looks exactly
    like caption 1); the ITM head says "match" exactly for an image with its own caption. Everything else
    keeps the model's features."""
    def key(image):
        return image.numpy().tobytes()

    index, caption_of = {key(im): i for i, im in enumerate(images)}, {key(im): c for im, c in zip(images, captions)}
    real_image, real_text, real_fused = E.image_features, E.text_features, E.fused_features

    def image_features(model, images, *args, **kwargs):
        cls, emb = real_image(model, images, *args, **kwargs)
        known = [index.get(key(im)) for im in images]
        return cls, emb if None in known else F.one_hot(torch.tensor(known), len(captions)).float()

    def text_features(model, tokenizer, texts, *args, **kwargs):
        cls, emb = real_text(model, tokenizer, texts, *args, **kwargs)
        known = [max(1, captions.index(t)) if t in captions else None for t in texts]  # caption 0 -> e_1
        return cls, emb if None in known else F.one_hot(torch.tensor(known), len(captions)).float()

    def fused_features(model, tokenizer, images, at, texts, *args, **kwargs):
        cls, itm = real_fused(model, tokenizer, images, at, texts, *args, **kwargs)
        match = [caption_of.get(key(images[a])) == t for a, t in zip(at.tolist(), texts)]
        return cls, F.one_hot(torch.tensor(match).long(), 2).float()  # logit 1 high = "match"

    for name, fn in (("image_features", image_features), ("text_features", text_features),
                     ("fused_features", fused_features)):
        monkeypatch.setattr(E, name, fn)


def test_the_whole_suite_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    """The suite runs end to end (every key, the figures), and its numbers are what they claim to be: with
    known features on the held-out pairs, retrieval in each direction and ITM score what they must (images
    and captions paired right, i2t not t2i, 1 = match); zero-shot (seen and held-out classes) and the image tokenizer's
    health equal what is recomputed here straight from the model and the image tokenizer. fp32 (no bf16 autocast), so
    the recomputation agrees exactly."""
    ckpt = write_checkpoint(tmp_path)
    images, captions, _ = E.synthetic_pairs(WORLD, 24)  # what the suite calls held-out pairs: val scenes 0-23
    assert len(set(captions)) == 24  # so that every ITM negative is one
    known_features(monkeypatch, images, captions)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # eval.main: bf16 autocast off
    E.main(["--device", "cpu", "--ckpt", str(ckpt), "--n_pairs", "24", "--per_class", "2", "--n_probe", "40"])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == KEYS
    assert results["retrieval_pairs"] == 24 and results["step"] == 7 and results["skipped_files"] == 0
    assert all(0 <= results[k] <= 1 for k in KEYS if k.startswith(("i2t", "t2i", "zeroshot", "probe", "itm", "mmm",
                                                                    "mim", "code")) and not k.endswith("obj"))
    assert all(results[k] is None or 0 <= results[k] <= 1 for k in KEYS if k.endswith("obj"))  # null: no such scene
    for name in ("retrieval.png", "masks.png", "image_tokenizer.png", "loss_curves.png"):
        with Image.open(tmp_path / name) as img:
            assert img.width > 100 and img.height > 50
    # image 0 scores every caption 0 (its true one ranks last on a tie); image 1 ties captions 0 and 1 (rank 1);
    # caption 0 is closest to image 1 and ties the rest at 0; every other pair is found first
    assert [results[f"i2t_r{k}"] for k in (1, 5, 10)] == pytest.approx([22 / 24, 23 / 24, 23 / 24])
    assert [results[f"t2i_r{k}"] for k in (1, 5, 10)] == pytest.approx([23 / 24, 23 / 24, 23 / 24])
    assert results["itm_acc"] == results["itm_auc"] == results["itm_auc_hard"] == 1.0  # every negative told apart

    model, image_tokenizer, cfg = tiny_model(init_std=0.2)  # the checkpoint's weights
    with torch.no_grad():
        # zero-shot: the nearest prompt-ensemble class embedding, on seen and on held-out (colour, shape) classes
        images_c, labels, held, names = E.synthetic_classification_set(WORLD, 2)
        prompts = [tokenizer().encode([t.format(c) for t in WORLD.prompt_templates], cfg.text_len) for c in names]
        classes = F.normalize(torch.stack([model.text_embeddings(*p).mean(0) for p in prompts]), dim=-1)  # (24, E)
        correct = (model.image_embeddings(images_c.float() / 255) @ classes.T).argmax(1) == labels  # (48,)
        assert held.any() and not held.all()
        assert torch.equal(images_c, E.render(WORLD, [WORLD.single("val", k % 2, *names[label].split())
                                                      for k, label in enumerate(labels.tolist())]))
        assert results["zeroshot_top1"] == pytest.approx(correct[~held].float().mean().item())
        assert results["zeroshot_heldout_top1"] == pytest.approx(correct[held].float().mean().item())
        # the image tokenizer: reconstruction of the retrieval images from their hard codes, and their code histogram
        x = images.float() / 255
        codes = image_tokenizer.codebook_indices(x)  # (24, P)
        assert results["codebook_recon_mse"] == pytest.approx(((image_tokenizer.decode_indices(codes) - x) ** 2).mean().item())
        counts = np.bincount(codes.flatten().numpy(), minlength=cfg.codebook_size)
        p = counts[counts > 0] / counts.sum()
        assert results["codebook_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-5)
        assert results["codebook_codes_used"] == pytest.approx((counts > 0).mean())


def test_files_replace_the_synthetic_data(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path)
    rng, rows = np.random.default_rng(0), []
    for i in range(14):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "caption": f"a red square number {i}"})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows += [{"image": "broken.png", "caption": "unreadable"}, {"image": "../escape.png", "caption": "outside"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{not json\n")
    for c, name in enumerate(("red_square", "blue_circle", "green_star")):  # listed class after class
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(10):
            grey = np.full((32, 32, 3), 40 + 90 * c, dtype=np.uint8)  # each class one flat grey
            Image.fromarray(grey).save(tmp_path / "classes" / name / f"{i}.png")
    (tmp_path / "classes" / "red_square" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    lines = [f"{label}\tthere is a {colour} star" for label, colour in (("a", "red"), ("b", "blue"), ("c", "green"))
             for _ in range(10)]  # label after label
    (tmp_path / "texts.tsv").write_text("\n".join(lines + ["no label here"]))
    out = tmp_path / "out"
    E.main(["--device", "cpu", "--ckpt", str(ckpt), "--out_dir", str(out), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--classes", str(tmp_path / "classes"), "--texts", str(tmp_path / "texts.tsv"), "--n_probe", "40",
            "--skip_figures"])
    results = json.loads((out / "eval.json").read_text())
    assert results["retrieval_pairs"] == 14  # the broken image is dropped, not replaced by its neighbour
    assert results["skipped_files"] == 1 + 2 + 1  # broken.png; the escaping and malformed rows; bad.jpg
    # the probes' splits mix the classes (a split by position of the sorted files would test on unseen classes)
    assert results["probe_image_class"] == 1.0 and results["probe_text_label"] == 1.0
    assert {"probe_image_class", "probe_text_label", "zeroshot_top1", "zeroshot_drop75_top1"} <= set(results)
    assert "zeroshot_heldout_top1" not in results and not list(out.glob("*.png"))
    capsys.readouterr()
    refused(capsys, ["--device", "cpu", "--ckpt", str(ckpt), "--pairs", str(tmp_path / "none.jsonl")], "not found: .*none.jsonl")
    (tmp_path / "plain.txt").write_text("no tabs\nat all\n")
    refused(capsys, ["--device", "cpu", "--ckpt", str(ckpt), "--texts", str(tmp_path / "plain.txt")], "label<TAB>text")
