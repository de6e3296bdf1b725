"""Export to Hugging Face's format (python pretrained.py export CKPT OUT_DIR) and the safetensors writer under it.

Without transformers (CI): an exported folder imports back (pretrained.from_pretrained, pretrained_checkpoint) to
exactly the same tensors and config; the small and base presets' configs round-trip; what Hugging Face's FLAVA
cannot be is refused in one line; both commands run end to end. With transformers (skipped when absent):
FlavaForPreTraining and FlavaModel load the folder and give nanoFLAVA's outputs to <= 1e-4, BertTokenizer its ids,
FlavaImageProcessor its pixels, and the safetensors library reads the hand-written file as ours does.

    python -m pytest tests/test_export.py
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import data
import dalle
import model as M
import pretrained
import weightfiles
from conftest import ROOT, SMALL
from test_pretrained import CORPUS, VOCAB, assert_outputs_match, assert_same_state, ours_small, pairs_file


def save_ckpt(path, model, image_tokenizer, vocab=VOCAB, **extra):
    """A nanoFLAVA checkpoint as train.py writes one (the keys checkpoints.load_checkpoint needs)."""
    image_tokenizer = None if image_tokenizer is None else image_tokenizer.state_dict()
    checkpoints.save_atomic({"format": checkpoints.FORMAT, "model": model.state_dict(), "model_cfg": asdict(model.cfg),
                             "image_tokenizer": image_tokenizer, "step": 7, "vocab": vocab, **extra}, path)
    return path


def kmeans_small(**overrides):
    """ours_small's shape with the image tokenizer trained here (k-means), a manual attention path, no DALL-E."""
    model, _ = ours_small()
    cfg = M.ModelConfig(**{**asdict(model.cfg), "image_tokenizer": "kmeans", "attn": "manual", **overrides})
    torch.manual_seed(1)
    other = M.FLAVA(cfg)
    other.load_state_dict(model.state_dict())
    tokenizer = M.KMeansTokenizer(cfg)
    tokenizer.codebook.normal_()
    return other.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------


def test_the_written_safetensors_file_reads_back_exactly_and_is_aligned(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(2, 3, generator=gen), "f16": torch.randn(5, generator=gen).half(),
               "bf16": torch.randn(3, generator=gen).bfloat16(), "f64": torch.randn(1, generator=gen).double(),
               "i64": torch.arange(-2, 3) * 2**40, "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(3,
               dtype=torch.uint8), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.6592),
               "empty": torch.zeros(0, 3), "view": torch.randn(4, 6, generator=gen)[:, ::2]}  # not contiguous
    path = tmp_path / "model.safetensors"
    weightfiles.write_safetensors(path, tensors)
    got = weightfiles.read_weights(tmp_path)
    assert list(got) == list(tensors) and not list(tmp_path.glob("*.tmp"))  # renamed into place
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0 and json.loads(path.read_bytes()[8: 8 + n])["__metadata__"] == {"format": "pt"}
    with pytest.raises(ValueError, match=r"tensor 'c' has dtype torch.complex64"):
        weightfiles.write_safetensors(path, {"c": torch.zeros(2, dtype=torch.complex64)})
    assert torch.equal(weightfiles.read_weights(tmp_path)["f32"], tensors["f32"])  # the refused write left it alone


# ---------------------------------------------------------------------------------------------
# Round trips without transformers
# ---------------------------------------------------------------------------------------------


def test_export_then_import_gives_back_the_same_tensors_and_config(tmp_path, capsys):
    model, codebook = ours_small()
    ckpt_path = save_ckpt(tmp_path / "ckpt.pt", model, codebook, loss_cfg={"mask_ratio": 0.5, "min_block": 3})
    folder = pretrained.export(ckpt_path, tmp_path / "hf")
    out = capsys.readouterr().out
    assert "left out" not in out and "no encoder poolers" in out
    back = pretrained.from_pretrained(folder)
    assert back.cfg == model.cfg
    assert_same_state(back.state_dict(), model.state_dict(), atol=0)  # exact: token types of zero add nothing
    ckpt = pretrained.pretrained_checkpoint(folder)
    assert ckpt["model_cfg"] == asdict(model.cfg) and ckpt["vocab"] == VOCAB and ckpt["preprocess"] == "crop"
    assert_same_state(ckpt["image_tokenizer"], codebook.state_dict(), atol=0)
    files = weightfiles.read_weights(folder)
    assert not files["flava.text_model.embeddings.token_type_embeddings.weight"].any()  # row 0 is in the positions
    assert "mim_head.decoder.bias" in files and "mim_head.bias" not in files  # one tied tensor, written once
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["max_position_embeddings"] == 16 and config["init_codebook"] is True
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["total_mask_patches"] == 8 and pre["mask_group_min_patches"] == 3 and pre["crop_size"]["height"] == 32
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 16
    pretrained.export(ckpt_path, folder)  # into its own folder again: allowed, replaced whole
    assert_same_state(pretrained.from_pretrained(folder).state_dict(), model.state_dict(), atol=0)


def test_a_kmeans_model_exports_without_its_codebook_and_keeps_what_hugging_face_cannot_say(tmp_path, capsys):
    model, tokenizer = kmeans_small()
    folder = pretrained.export(save_ckpt(tmp_path / "ckpt.pt", model, tokenizer), tmp_path / "hf")
    said = [line for line in capsys.readouterr().out.splitlines() if "left out" in line]
    assert len(said) == 1 and "image tokenizer k-means" in said[0], said
    assert not any(k.startswith("image_codebook.") for k in weightfiles.read_weights(folder))
    assert json.loads((folder / "config.json").read_text())["init_codebook"] is False
    ckpt = pretrained.pretrained_checkpoint(folder)
    assert ckpt["model_cfg"] == asdict(model.cfg) and ckpt["image_tokenizer"] is None  # kmeans, manual: as trained
    assert_same_state(ckpt["model"], model.state_dict(), atol=0)


def test_training_resumes_from_a_kmeans_export_given_its_tokenizer(tmp_path, capsys):
    """An export left its k-means codebook out: train.py --init_from that folder refuses in one line naming the way
    out, and with --image_tokenizer_ckpt (the tokenizer it was trained with) starts from the exported weights and
    those codes (lr 0: both saved unchanged)."""
    import train

    model, tokenizer = kmeans_small()
    folder = pretrained.export(save_ckpt(tmp_path / "ckpt.pt", model, tokenizer), tmp_path / "hf")
    checkpoints.save_atomic(tokenizer.state_dict(), tmp_path / "image_tokenizer.pt")
    args = ["--device", "cpu", "--init_from", str(folder), "--pairs", str(pairs_file(tmp_path)), "--steps", "1",
            "--batch_size", "4", "--lr", "0", "--min_lr", "0", "--warmup", "1", "--dtype", "fp32", "--eval", "false",
            "--p_pairs", "1", "--p_images", "0", "--p_texts", "0"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main([*args, "--out_dir", str(tmp_path / "no")])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "has no image tokenizer" in line and "--image_tokenizer_ckpt" in line, line
    train.main([*args, "--out_dir", str(tmp_path / "run"), "--image_tokenizer_ckpt", str(tmp_path / "image_tokenizer.pt")])
    ckpt = checkpoints.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt["model_cfg"]["image_tokenizer"] == "kmeans" and ckpt["vocab"] == VOCAB
    assert_same_state(ckpt["model"], model.state_dict())
    assert_same_state(ckpt["image_tokenizer"], tokenizer.state_dict(), atol=0)


@pytest.mark.parametrize("preset, overrides", [("small", {}), ("base", {}), ("base", dict(text_len=128)),
                                               ("base", dict(attn="manual", image_tokenizer="dalle", init_std=0.01)),
                                               ("tiny", dict(stem="linear", ln_eps=1e-6))])
def test_preset_configs_round_trip_and_every_tensor_is_exported_once(preset, overrides):
    cfg = M.ModelConfig.from_preset(preset, **overrides)
    config = json.loads(json.dumps(pretrained.config_to_hf(cfg, codebook=cfg.image_tokenizer == "dalle")))
    assert pretrained.config_from_hf(config) == cfg
    with torch.device("meta"):  # base's names and shapes without its 1.4 GB
        state = M.FLAVA(cfg).state_dict()
    names = pretrained.hf_names(cfg)
    assert names.keys() == state.keys()  # every nanoFLAVA tensor has a Hugging Face name
    exported = pretrained.hf_state(state, cfg)
    D = cfg.width
    sources = [s for src in names.values() for s in (src if isinstance(src, tuple) else (src,))]
    assert len(exported) == len(set(sources)) == len(sources)  # and no two share one
    assert exported["flava.text_model.embeddings.position_embeddings.weight"].shape == (cfg.text_len, D)
    assert exported["flava.image_model.encoder.layer.0.attention.attention.key.weight"].shape == (D, D)


def test_what_hugging_face_cannot_be_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    for overrides, says in ((dict(), "stem='conv' does not export"),  # the tiny preset's own stem
                            (dict(stem="linear", image_pool="mean"), "image_pool='mean' does not export")):
        cfg = M.ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": len(VOCAB), **overrides})
        path = save_ckpt(tmp_path / "ckpt.pt", M.FLAVA(cfg), M.KMeansTokenizer(cfg))
        with pytest.raises(ValueError) as err:
            pretrained.export(path, tmp_path / "hf")
        assert str(err.value).startswith(f"{path}: {says}") and "\n" not in str(err.value), err.value
        assert not (tmp_path / "hf").exists()  # refused before anything is written
    model, codebook = ours_small()
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[MASK\]'\]"):
        pretrained.export(save_ckpt(tmp_path / "v.pt", model, codebook, vocab=VOCAB[:4]), tmp_path / "hf")
    with pytest.raises(ValueError, match=r"its 101 word pieces are more than the model's vocab_size=100"):
        pretrained.export(save_ckpt(tmp_path / "v.pt", model, codebook, vocab=VOCAB + ["extra"]), tmp_path / "hf")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds other weight files \['pytorch_model.bin'\]"):
        pretrained.export(save_ckpt(tmp_path / "v.pt", model, codebook), tmp_path / "old")


def run(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_the_export_and_convert_commands_end_to_end(tmp_path, capsys):
    model, codebook = ours_small()
    done = run("pretrained.py", "export", save_ckpt(tmp_path / "ckpt.pt", model, codebook), tmp_path / "hf")
    assert done.returncode == 0 and f"wrote {tmp_path / 'hf'}" in done.stdout, done.stderr
    done = run("model.py", "convert", tmp_path / "hf", tmp_path / "back" / "ckpt.pt")  # and back, as before
    assert done.returncode == 0 and "DALL-E encoder" in done.stdout, done.stderr
    net, tok = checkpoints.models_from_checkpoint(checkpoints.load_checkpoint(tmp_path / "back" / "ckpt.pt"))
    assert net.cfg == model.cfg and isinstance(tok, dalle.DalleEncoder)
    assert_same_state(net.state_dict(), model.state_dict(), atol=0)
    assert_same_state(tok.state_dict(), codebook.state_dict(), atol=0)
    cfg = M.ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": len(VOCAB)})
    capsys.readouterr()
    for argv, says in (([save_ckpt(tmp_path / "conv.pt", M.FLAVA(cfg), None), tmp_path / "no"],
                        "stem='conv' does not export"), ([tmp_path / "missing.pt", tmp_path / "no"], "does not exist")):
        with pytest.raises(SystemExit) as exit_:  # in this process: the same main, without another torch import
            pretrained.main(["export", *map(str, argv)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and says in lines[0], lines


# ---------------------------------------------------------------------------------------------
# Against transformers itself (an optional peer: skipped when it is not installed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    """ours_small (every tensor random, stem="linear", DALL-E's encoder) exported; -> (model, codebook, folder)."""
    model, codebook = ours_small()
    return model, codebook, pretrained.export(save_ckpt(tmp_path / "ckpt.pt", model, codebook), tmp_path / "hf")


def test_hugging_face_loads_the_export_and_gives_every_output_of_ours(exported):
    transformers = pytest.importorskip("transformers")

    model, codebook, folder = exported
    hf = transformers.FlavaForPreTraining.from_pretrained(folder).eval()
    worst = assert_outputs_match(hf, model, L=16)  # embeddings, logits, ITM, MMM-image, MMM-text, MIM, MLM
    print(f"largest difference from FlavaForPreTraining: {worst:.2e}")
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the exported DALL-E encoder gives our codes
        assert torch.equal(hf.image_codebook.get_codebook_indices(0.8 * x + 0.1).flatten(1), codebook(0.8 * x + 0.1)
                           .argmax(1).flatten(1))
    bare = transformers.FlavaModel.from_pretrained(folder).eval()  # no heads: "flava." read as its own prefix
    ids, attn = torch.randint(5, 100, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    pixels = (x[:2] - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = bare.get_image_features(pixel_values=pixels).pooler_output[:, 0]  # projects every token: take [CLS]
        text = bare.get_text_features(input_ids=ids, attention_mask=attn.long()).pooler_output[:, 0]
        mm = bare(input_ids=ids, pixel_values=pixels, attention_mask=attn.long()).multimodal_embeddings
        ours = model.encode_multimodal(model.encode_image(x[:2]).hidden, model.encode_text(ids, attn).hidden, attn)
        for a, b in ((image, model.image_projection(model.encode_image(x[:2]).out[:, 0])), (mm, ours),
                     (text, model.text_projection(model.encode_text(ids, attn).out[:, 0]))):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4


def test_bert_tokenizer_from_the_folder_gives_our_ids(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertTokenizer

    texts = [t for t in CORPUS if "Σ" not in t]  # Rust's BERT lower-cases a final Σ unlike Google's (test_pretrained)
    tokenizer = data.Tokenizer.from_corpus(texts, vocab_size=600)
    cfg = M.ModelConfig.from_preset("tiny", **{**SMALL, "stem": "linear", "vocab_size": len(tokenizer)})
    folder = pretrained.export(save_ckpt(tmp_path / "ckpt.pt", M.FLAVA(cfg), None, vocab=tokenizer.vocab),
                               tmp_path / "hf")
    bert = BertTokenizer.from_pretrained(folder)
    assert bert.model_max_length == cfg.text_len and bert.pad_token_id == tokenizer.pad_id
    for text in texts:
        theirs = bert(text, max_length=cfg.text_len, truncation=True, padding="max_length")["input_ids"]
        assert tokenizer.encode(text, cfg.text_len)[0][0].tolist() == theirs, text


def test_flava_image_processor_from_the_folder_gives_our_evaluation_pixels(exported):
    transformers = pytest.importorskip("transformers")

    processor = transformers.FlavaImageProcessor.from_pretrained(exported[2])
    mean, std = torch.tensor(M.CLIP_MEAN).view(3, 1, 1), torch.tensor(M.CLIP_STD).view(3, 1, 1)
    rng = np.random.default_rng(0)
    for h, w in ((40, 60), (97, 41), (32, 32), (300, 200), (33, 1000)):  # shortest side to 32 px, central square
        # a smooth image: resizing then cropping (theirs) and cropping then resizing (ours) differ by sub-pixel
        # rounding (97 x 41 -> 76 x 32), which would be noise-sized on noise
        img = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        out = processor(img, return_tensors="pt", return_image_mask=True)
        gap = {squash: ((data.image_transform(img, 32, train=False, squash=squash).float() / 255 - mean) / std
                        - out["pixel_values"][0]).abs() for squash in (False, True)}  # what eval.py feeds a model
        assert gap[False].mean() <= 0.03 and gap[False].max() <= 0.15, (h, w, gap[False].max())
        assert h == w or gap[True].mean() > 0.15, (h, w)  # not Hugging Face's default squash
        assert out["bool_masked_pos"].shape == (1, 4, 4) and 0 < out["bool_masked_pos"].sum() <= 6  # 0.383 of 16
    both = transformers.FlavaProcessor.from_pretrained(exported[2])  # the image processor and BertTokenizer together
    out = both(images=img, text=["a red square"], padding="max_length", return_tensors="pt")
    assert out["input_ids"].shape == (1, 16) and out["pixel_values"].shape == (1, 3, 32, 32)


def test_the_safetensors_library_reads_our_file_as_we_do(exported):
    safetensors = pytest.importorskip("safetensors")  # (transformers' own dependency)
    from safetensors.torch import load_file

    path = exported[2] / "model.safetensors"
    theirs, ours = load_file(path), weightfiles.read_weights(exported[2])
    assert set(theirs) == set(ours)
    assert all(theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]) for k in ours)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    mixed = {"f16": torch.randn(3).half(), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(3),
             "bool": torch.tensor([True]), "empty": torch.zeros(0), "scalar": torch.tensor(1.5)}
    weightfiles.write_safetensors(exported[2] / "mixed.safetensors", mixed)  # odd sizes: alignment after each
    theirs = load_file(exported[2] / "mixed.safetensors")
    assert all(theirs[k].dtype == t.dtype and torch.equal(theirs[k], t) for k, t in mixed.items())
