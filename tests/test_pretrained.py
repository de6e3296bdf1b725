"""Published FLAVA weights: the hand-written safetensors reader, the Hugging Face -> nanoFLAVA mapping,
DALL-E's encoder, BERT's basic tokenizer and Hugging Face's image preprocessing; the commands built on them
(model.py convert, eval.py --hf / --class_names / --classes alone, train.py --init_from).

Without transformers (CI): hand-made Hugging Face folders, named here independently of model.py's map.
With transformers (skipped when absent): FlavaForPreTraining, FlavaImageCodebook, BertTokenizer and
FlavaImageProcessor themselves, every tensor random, outputs compared to <= 1e-4."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import eval as E
import heldout
import checkpoints
import dalle
import flops
import model as M
import pretrained
import weightfiles
import train
from conftest import ROOT, SMALL

# A small Hugging Face FLAVA: config.json's sub-configs (what HF leaves at its defaults is left out here too)
TOWER = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
HF_CONFIG = {"image_config": dict(TOWER, num_hidden_layers=2, image_size=32, patch_size=8, vocab_size=64),
             "text_config": dict(TOWER, num_hidden_layers=2, vocab_size=100, max_position_embeddings=16),
             "multimodal_config": dict(TOWER, num_hidden_layers=1),
             "image_codebook_config": dict(hidden_size=8, num_blocks_per_group=1, vocab_size=64),
             "hidden_size": 32, "projection_dim": 16}
WORDS = [*data.SPECIALS, *"abcdefghijklmnopqrstuvwxyz", "red", "blue", "green", "square", "circle", "photo", "of",
         "picture", "image", "there", "is", "an", "small", "large", ".", "##s", "##ed"]
VOCAB = WORDS + [f"w{i}" for i in range(100 - len(WORDS))]  # 100 word pieces, as text_config.vocab_size


# ---------------------------------------------------------------------------------------------
# Hand-made Hugging Face folders
# ---------------------------------------------------------------------------------------------

SAFE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path, tensors):
    """The format written out by hand: header length (8 bytes, little-endian), JSON header, raw bytes."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFE_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


def ours_small(seed=0):
    """A nanoFLAVA of HF_CONFIG's shape with every tensor random (LayerNorms, tokens and biases included)."""
    torch.manual_seed(seed)
    cfg = M.ModelConfig.from_preset("base", image_size=32, patch_size=8, width=32, heads=2, mlp_ratio=2, image_layers=2,
                                    text_layers=2, mm_layers=1, vocab_size=100, text_len=16, embed_dim=16,
                                    codebook_size=64, image_tokenizer="dalle", dalle_hidden=8, dalle_blocks=1)
    model, codebook = M.FLAVA(cfg).eval(), dalle.DalleEncoder(cfg).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *codebook.parameters()]:
            p.normal_(0, 0.2)
        model.logit_scale.fill_(3.1)
    return model, codebook


def hf_names_of(model, codebook):
    """Our tensors under Hugging Face's FlavaForPreTraining names, written out here independently of model.py,
    plus what Hugging Face has beyond ours: 16 text positions and 2 token-type rows (row 0 taken back out of
    the positions), the three encoders' poolers and position_ids."""
    out, D, gen = {}, model.cfg.width, torch.Generator().manual_seed(1)
    blocks = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
              "ln1": "layernorm_before", "ln2": "layernorm_after"}
    towers = {"image_encoder": "image_model", "text_encoder": "text_model", "mm_encoder": "multimodal_model"}
    flat = {"image_encoder.cls_token": "image_model.embeddings.cls_token", "logit_scale": "logit_scale",
            "image_encoder.mask_token": "image_model.embeddings.mask_token",
            "mm_encoder.cls_token": "multimodal_model.cls_token",
            "image_encoder.pos_embed": "image_model.embeddings.position_embeddings",
            "image_encoder.patch_embed": "image_model.embeddings.patch_embeddings.projection",
            "text_encoder.word_embed": "text_model.embeddings.word_embeddings",
            "text_encoder.ln_embed": "text_model.embeddings.LayerNorm",
            "mm_encoder.image_to_mm": "image_to_mm_projection", "mm_encoder.text_to_mm": "text_to_mm_projection",
            "image_projection": "image_projection", "text_projection": "text_projection",
            "itm_head.pooler": "itm_head.pooler.dense", "itm_head.classifier": "itm_head.seq_relationship"}
    for name, t in model.state_dict().items():
        block = re.fullmatch(r"(\w+)\.transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        head = re.fullmatch(r"(m\w+_head)\.(dense|ln|decoder)\.(weight|bias)", name)
        stem, _, w = name.rpartition(".")
        if block:
            tower, i, part, w = block.groups()
            at = f"flava.{towers[tower]}.encoder.layer.{i}"
            if part == "attn.qkv":
                for x, chunk in zip(("query", "key", "value"), t.chunk(3)):
                    out[f"{at}.attention.attention.{x}.{w}"] = chunk
            else:
                out[f"{at}.{blocks[part]}.{w}"] = t
        elif name.endswith(("ln_f.weight", "ln_f.bias")):
            out[f"flava.{towers[name.split('.')[0]]}.layernorm.{w}"] = t
        elif head:
            h, part, w = head.groups()
            out[f"{h}.{ {'dense': 'transform.dense', 'ln': 'transform.LayerNorm', 'decoder': 'decoder'}[part]}.{w}"] = t
        elif name == "text_encoder.pos_embed":
            types, pos = torch.randn(2, D, generator=gen), torch.randn(16, D, generator=gen)
            pos[: t.size(1)] = t[0] - types[0]
            out["flava.text_model.embeddings.token_type_embeddings.weight"] = types
            out["flava.text_model.embeddings.position_embeddings.weight"] = pos
        else:
            key = flat.get(name) or f"{flat[stem]}.{w}"
            out[key if key.startswith("itm_head") else f"flava.{key}"] = t
    for tower in towers.values():
        out |= {f"flava.{tower}.pooler.dense.weight": torch.randn(D, D, generator=gen),
                f"flava.{tower}.pooler.dense.bias": torch.randn(D, generator=gen)}
    out["flava.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    for name, t in codebook.state_dict().items():  # groups.1.0.res_path.5.weight ->
        # blocks.group_2.group.block_1.res_path.path.conv_3.weight
        name = re.sub(r"^(input|output)\.", lambda m: f"blocks.{m[1]}{'.conv' if m[1] == 'output' else ''}.", name)
        name = re.sub(r"^groups\.(\d)\.(\d+)\.", lambda m: f"blocks.group_{int(m[1]) + 1}.group.block_{int(m[2]) + 1}.",
                      name)
        name = re.sub(r"res_path\.(\d)", lambda m: f"res_path.path.conv_{(int(m[1]) + 1) // 2}", name)
        out["image_codebook." + name] = t
    return out


def write_folder(folder, state, fmt, config=HF_CONFIG):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if fmt == "bin":  # what transformers 4.x wrote: the tied head bias twice
        tied = {k.replace(".decoder.bias", ".bias"): v for k, v in state.items() if ".decoder.bias" in k}
        torch.save({**state, **tied}, folder / "pytorch_model.bin")
    else:
        write_safetensors(folder / "model.safetensors", state)
    return folder


def assert_same_state(a, b, skip=(), atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith(skip):
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol), k


# ---------------------------------------------------------------------------------------------
# Reading the files with torch alone
# ---------------------------------------------------------------------------------------------


def test_safetensors_by_hand_round_trips_every_dtype_and_shard(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(2, 3, generator=gen), "f16": torch.randn(4, generator=gen).half(),
               "bf16": torch.randn(2, 2, generator=gen).bfloat16(), "i64": torch.arange(-2, 3)[None] * 2**40,
               "scalar": torch.tensor(2.6592), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    got = weightfiles.read_weights(tmp_path)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert weightfiles.read_weights(tmp_path, keep=lambda k: k != "f32")["f32"] is None  # listed, not read
    shards = tmp_path / "sharded"
    shards.mkdir()
    names = list(tensors)
    for i, part in enumerate((names[:3], names[3:])):
        write_safetensors(shards / f"model-0000{i + 1}-of-00002.safetensors", {k: tensors[k] for k in part})
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"model-0000{1 + (k in names[3:])}-of-00002.safetensors" for k in names}}))
    got = weightfiles.read_weights(shards)
    assert all(torch.equal(got[k], tensors[k]) for k in names)
    legacy = tmp_path / "legacy"  # a pre-zip pytorch_model.bin cannot be memory-mapped: read whole instead
    legacy.mkdir()
    torch.save({"w": tensors["f32"]}, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(weightfiles.read_weights(legacy)["w"], tensors["f32"])
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        weightfiles.read_weights(tmp_path)
    (legacy / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read .*pytorch_model.bin"):
        weightfiles.read_weights(legacy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        weightfiles.read_weights(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_hugging_face_folder_loads_every_tensor(tmp_path, fmt):
    model, codebook = ours_small()
    folder = write_folder(tmp_path / "flava", hf_names_of(model, codebook), fmt)
    loaded = pretrained.from_pretrained(folder)  # text_len: all 16 positions of this config (FLAVA's 77 > 16)
    assert loaded.cfg == model.cfg
    assert_same_state(loaded.state_dict(), model.state_dict())  # positions: (p - t0) + t0 rounds, hence atol
    ckpt = pretrained.pretrained_checkpoint(folder, text_len=12)
    assert ckpt["model_cfg"]["text_len"] == 12 and ckpt["vocab"] == VOCAB and ckpt["preprocess"] == "squash"
    assert torch.allclose(ckpt["model"]["text_encoder.pos_embed"], model.text_encoder.pos_embed[:, :12], atol=1e-6)
    assert_same_state(ckpt["image_tokenizer"], codebook.state_dict(), atol=0)
    net, tok = checkpoints.models_from_checkpoint(ckpt)
    x = torch.rand(2, 3, 32, 32)
    assert isinstance(tok, dalle.DalleEncoder) and torch.equal(tok.codebook_indices(x), codebook.codebook_indices(x))
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 32}, "crop_size": 32}))
    assert pretrained.pretrained_checkpoint(folder)["preprocess"] == "crop"


def test_unknown_and_missing_tensors_are_named_and_a_model_without_heads_says_so(tmp_path, capsys):
    model, codebook = ours_small()
    state = hf_names_of(model, codebook)
    with pytest.raises(ValueError, match=r"neither mapped nor knowingly dropped: \['image_model.extra.weight'\]"):
        pretrained.from_pretrained(write_folder(tmp_path / "a", {**state, "flava.image_model.extra.weight": torch.ones(1)},
                                             "bin"))
    gone = "flava.text_model.encoder.layer.1.attention.attention.key.bias"
    with pytest.raises(ValueError, match=r"missing: \['text_model.encoder.layer.1.attention.attention.key.bias'\]"):
        pretrained.from_pretrained(write_folder(tmp_path / "b", {k: v for k, v in state.items() if k != gone}, "bin"))
    # a FlavaModel file: no "flava." prefix and no heads; the heads keep their initialisation
    bare = {k.removeprefix("flava."): v for k, v in state.items() if k.startswith("flava.")}
    torch.manual_seed(5)
    loaded = pretrained.from_pretrained(write_folder(tmp_path / "c", bare, "safetensors"))
    assert "no pretraining heads" in capsys.readouterr().out
    assert_same_state(loaded.state_dict(), model.state_dict(), skip=pretrained.HF_HEADS)
    torch.manual_seed(5)
    assert_same_state(loaded.state_dict(), M.FLAVA(loaded.cfg).state_dict(), atol=0,
                      skip=tuple(k for k in model.state_dict() if not k.startswith(pretrained.HF_HEADS)))
    with pytest.raises(ValueError, match=r"text_config.num_attention_heads=4 \(needs 2\)"):
        pretrained.config_from_hf({**HF_CONFIG, "text_config": {**HF_CONFIG["text_config"], "num_attention_heads": 4}})


def test_another_image_size_interpolates_the_positions_and_the_logit_scale_is_clamped(tmp_path, capsys):
    model, codebook = ours_small()
    state = hf_names_of(model, codebook)
    state["flava.logit_scale"] = torch.tensor(4.6052)  # Hugging Face's clamp, a hair above ln 100
    loaded = pretrained.from_pretrained(write_folder(tmp_path / "f", state, "safetensors"), image_size=48)
    out = capsys.readouterr().out
    assert "resized bicubically from 4 x 4 to 6 x 6" in out and "clamped to [0, ln 100]" in out
    assert loaded.logit_scale.item() == pytest.approx(math.log(100), abs=1e-7)
    pos = model.image_encoder.pos_embed  # (1, 17, D): [CLS_I] row kept, the 4 x 4 table resized as an image
    grid = F.interpolate(pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic")
    assert torch.equal(loaded.image_encoder.pos_embed[:, 0], pos[:, 0])
    assert torch.allclose(loaded.image_encoder.pos_embed[0, 1:], grid[0].flatten(1).T)
    assert loaded.image_embeddings(torch.rand(2, 3, 48, 48)).shape == (2, 16)


def test_dalle_encoder_flops_are_counted(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    for kw in (dict(), dict(image_size=64, patch_size=16, dalle_hidden=16, dalle_blocks=3, codebook_size=32)):
        cfg = M.ModelConfig.from_preset("base", image_tokenizer="dalle", **kw)  # base: 112 px, 256 wide, 2 blocks
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            dalle.DalleEncoder(cfg)(torch.rand(1, 3, 8 * cfg.grid, 8 * cfg.grid))
        assert flops.dalle_flops(cfg) == counter.get_total_flops()
    with_it = {src: flops.flops_per_sample(cfg, src, masked_pass_share=0.5) for src in ("images", "pairs")}
    monkeypatch.setattr(flops, "dalle_flops", lambda cfg: 0)  # the targets' pass: once per image, forward only
    assert with_it["images"] - flops.flops_per_sample(cfg, "images") == counter.get_total_flops()
    assert with_it["pairs"] - flops.flops_per_sample(cfg, "pairs", masked_pass_share=0.5) == 0.5 * counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# BERT's tokenizer and Hugging Face's resizing, by hand
# ---------------------------------------------------------------------------------------------

TOKENIZER_CASES = {  # text -> BERT uncased's word pieces (Google's tokenization.py rules)
    "中文字": ["中", "文", "字"],  # CJK ideographs: one word each
    "zero\u200bwidth": ["zero", "##width"],  # U+200B (format, Cf) deleted: one word
    "bell\x07ed": ["bell", "##ed"],  # a control character (Cc) deleted
    "né\x0bs\x85t": ["nest"],  # also those that Python's str.split() would split on
    "Café, NAÏVE!": ["cafe", ",", "naive", "!"],  # lower case, accents stripped, punctuation split
    "İstanbul": ["istanbul"],  # lower-cased to i + a combining dot, which goes with the accents
    "5€ $5": ["5", "##€", "$", "5"],  # a currency sign is no punctuation (Sc), an ASCII symbol always is
    "a\u00a0b\u3000c\td": ["a", "b", "c", "d"],  # no-break and ideographic spaces are spaces
    "snake_case": ["snake", "_", "case"],  # ASCII "_" is punctuation for BERT
    "ΟΔΟΣ": ["οδος"],  # Python's lower(): the final sigma
    "x" * 101: ["[UNK]"],  # more than 100 characters: unknown
}


def test_the_tokenizer_follows_bert_on_hand_written_cases():
    vocab = [*data.SPECIALS, "中", "文", "字", "zero", "##width", "bell", "##ed", "nest", "cafe", ",", "naive", "!",
             "istanbul",
             "5", "##€", "$", "a", "b", "c", "d", "snake", "_", "case", "οδος", "x", "##x"]
    tok = data.Tokenizer(vocab)
    for text, pieces in TOKENIZER_CASES.items():
        ids, attn = tok.encode(text, 12)
        assert [vocab[i] for i in ids[0][attn[0]]] == ["[CLS]", *pieces, "[SEP]"], text


def test_squash_resizes_the_whole_image_as_hugging_face_does():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, -2:] = 255  # a white strip at the right edge: squashing keeps it, the central crop loses it
    img = Image.fromarray(a)
    assert data.image_transform(img, 16, train=False, squash=True)[:, :, -1].float().mean() > 150
    assert data.image_transform(img, 16, train=False)[:, :, -1].float().mean() < 1


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


def image_files(folder, n_classes=2, per_class=4, names=("n0001", "n0002")):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (folder / names[c]).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / names[c] / f"{i}.png")
    return folder


def pairs_file(folder, n=8):
    rng, rows = np.random.default_rng(1), []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "caption": f"a photo of a {['red', 'blue'][i % 2]} square {i}"})
    (folder / "pairs.jsonl").write_text("\n".join(map(json.dumps, rows)))
    return folder / "pairs.jsonl"


def test_convert_then_eval_and_eval_hf_with_class_names(tmp_path, capsys, monkeypatch):
    model, codebook = ours_small()
    folder = write_folder(tmp_path / "flava", hf_names_of(model, codebook), "safetensors")
    out = tmp_path / "conv" / "ckpt.pt"
    done = subprocess.run([sys.executable, "model.py", "convert", str(folder), str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0 and "DALL-E encoder" in done.stdout, done.stderr
    net, tok = checkpoints.models_from_checkpoint(checkpoints.load_checkpoint(out))
    assert_same_state(net.state_dict(), model.state_dict()) and isinstance(tok, dalle.DalleEncoder)
    classes, names = image_files(tmp_path / "imagenet"), tmp_path / "names.tsv"
    names.write_text("n0001\tred square\nn0002\tblue circle\n")
    prompted, zero_shot = [], E.zero_shot  # the class names the prompts are made of
    monkeypatch.setattr(E, "zero_shot", lambda *a, **k: prompted.append(a[5:7]) or zero_shot(*a, **k))
    E.main(["--device", "cpu", "--hf", str(folder), "--classes", str(classes), "--class_names", str(names), "--pairs",
            str(pairs_file(tmp_path)), "--out_dir", str(tmp_path / "e1"), "--n_probe", "8", "--skip_figures"])
    results = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert {"zeroshot_top1", "i2t_r1", "itm_acc", "codebook_perplexity"} <= set(results) and "codebook_recon_mse" not in results
    assert "has no decoder" in capsys.readouterr().out and prompted == [(["red square", "blue circle"], data.PROMPTS)]
    for table in ({"n0001": "red square", "n0002": "blue circle"},  # {folder: name}, ImageNet's {index: [folder, name]}
                  {"0": ["n0001", "red square"], "1": ["n0002", "blue circle"]}):
        (tmp_path / "names.json").write_text(json.dumps(table))
        assert heldout.read_class_names(str(tmp_path / "names.json"), ["n0001", "n0002"]) == ["red square", "blue circle"]
    (tmp_path / "bad.tsv").write_text("n0001\tred square\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # bad input: one line on stderr, exit status 2 (as argparse)
        E.main(["--device", "cpu", "--hf", str(folder), "--classes", str(classes), "--class_names", str(tmp_path / "bad.tsv")])
    assert exit_.value.code == 2 and "names no class for the sub-folder(s) ['n0002']" in capsys.readouterr().err
    (tmp_path / "prompts.txt").write_text("itap a {}.\nno template here\na blurry photo of the {}.\n")
    E.main(["--device", "cpu", "--ckpt", str(out), "--classes", str(classes), "--n_probe", "8", "--prompts",
            str(tmp_path / "prompts.txt")])
    assert prompted[-1] == (["n0001", "n0002"], ["itap a {}.", "a blurry photo of the {}."])
    results = json.loads((out.parent / "eval.json").read_text())  # --classes alone was enough
    assert "zeroshot_top1" in results and "i2t_r1" not in results and (out.parent / "masks.png").exists()


def test_classes_alone_on_a_checkpoint_trained_on_files(tmp_path):
    torch.manual_seed(0)
    cfg = M.ModelConfig.from_preset("tiny", **{**SMALL, "vocab_size": len(VOCAB)})
    torch.save({"format": checkpoints.FORMAT, "model": M.FLAVA(cfg).state_dict(), "image_tokenizer": M.KMeansTokenizer(cfg).state_dict(),
                "model_cfg": cfg.__dict__, "step": 3, "vocab": VOCAB, "train_cfg": {"pairs": "train.jsonl"}},
               tmp_path / "ckpt.pt")
    E.main(["--device", "cpu", "--ckpt", str(tmp_path / "ckpt.pt"), "--classes", str(image_files(tmp_path / "c")), "--n_probe", "8"])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert {"zeroshot_top1", "probe_image_class", "codebook_recon_mse"} <= set(results) and "i2t_r1" not in results
    assert (tmp_path / "image_tokenizer.png").exists() and not (tmp_path / "retrieval.png").exists()


def test_train_init_from_starts_at_the_published_weights_and_targets(tmp_path):
    model, codebook = ours_small()
    folder = write_folder(tmp_path / "flava", hf_names_of(model, codebook), "bin")
    out = tmp_path / "run"
    with pytest.raises(SystemExit):  # DALL-E's encoder cannot be trained from scratch here
        train.parse_args(["--image_tokenizer", "dalle"])
    train.main(["--device", "cpu", "--init_from", str(folder), "--pairs", str(pairs_file(tmp_path)), "--out_dir", str(out), "--steps", "2",
                "--batch_size", "4", "--lr", "0", "--min_lr", "0", "--warmup", "1", "--dtype", "fp32",
                "--log_every", "1",
                "--eval", "false", "--p_pairs", "1", "--p_images", "0", "--p_texts", "0"])
    ckpt = checkpoints.load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_cfg"]["image_tokenizer"] == "dalle" and ckpt["vocab"] == VOCAB and ckpt["step"] == 2
    assert_same_state(ckpt["model"], model.state_dict())  # lr 0: still exactly the published weights
    assert_same_state(ckpt["image_tokenizer"], codebook.state_dict(), atol=0)  # the published targets, no stage 1
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert not any(r.get("stage") == "image_tokenizer" for r in rows)
    assert all(math.isfinite(r["mmm_image"]) for r in rows if "mmm_image" in r)
    train.main(["--device", "cpu", "--init_from", str(out / "ckpt.pt"), "--pairs", str(tmp_path / "pairs.jsonl"),
                "--out_dir", str(tmp_path / "again"),
                "--steps", "1", "--batch_size", "4", "--lr", "0", "--min_lr", "0", "--warmup", "1", "--dtype", "fp32",
                "--eval", "false", "--p_pairs", "1", "--p_images", "0", "--p_texts", "0"])  # from any checkpoint too
    assert_same_state(checkpoints.load_checkpoint(tmp_path / "again" / "ckpt.pt")["model"], model.state_dict())


# ---------------------------------------------------------------------------------------------
# Against transformers itself (an optional peer: skipped when it is not installed)
# ---------------------------------------------------------------------------------------------


def hf_flava(seed=0):
    """FlavaForPreTraining of HF_CONFIG with every tensor random: LayerNorm gains and biases, token-type rows, the
    mask and [CLS] tokens, positions, logit scale; the codebook with a fan-in scale so that its codes vary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.FlavaForPreTraining(transformers.FlavaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("image_codebook."):  # He's scale, doubled: activations neither vanish nor blow up
                p.normal_(0, 2 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.01)
            else:
                p.normal_(0, 0.2).add_(1 if re.search(r"(LayerNorm|layernorm\w*)\.weight$", name) else 0)
        hf.flava.logit_scale.fill_(3.3)  # inside [0, ln 100]: then both clamps leave it alone
    return hf


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_every_output_matches_hugging_face(tmp_path, fmt):
    hf = hf_flava()
    folder = tmp_path / "flava"
    if fmt == "bin":  # transformers 5 writes safetensors only; a .bin is its state_dict, as 4.x saved it
        write_folder(folder, {}, "safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    else:
        hf.save_pretrained(folder, max_shard_size="20KB" if fmt == "sharded" else "5GB")
    ours = pretrained.from_pretrained(folder, text_len=12).eval()
    assert_outputs_match(hf, ours)


def output_pairs(hf, ours, L=12, seed=0):
    """Every output FlavaForPreTraining gives, beside nanoFLAVA's own for the same inputs: 3 images of the 4 x 4
    grid, 3 captions of L tokens padded to 12, 7 and 4 real ones, BERT-masked words and masked patches."""
    B, P, S = 3, ours.cfg.num_patches, ours.cfg.image_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, S, S, generator=gen)  # ours normalises [0, 1] pixels itself; HF takes them normalised
    pixels = (x - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    ids, attn = torch.randint(5, ours.cfg.vocab_size, (B, L), generator=gen), torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate((L, 7, 4)):  # padded texts: [CLS] words [SEP] [PAD]...
        attn[i, :n], ids[i, 0], ids[i, n - 1], ids[i, n:] = True, 2, 3, 0
    masked_ids = torch.where(torch.rand(B, L, generator=gen) < 0.3, 4, ids)
    patch_masked = torch.rand(B, P, generator=gen) < 0.4
    with torch.no_grad():
        o = hf(input_ids=ids, input_ids_masked=masked_ids, pixel_values=pixels, attention_mask=attn.long(),
               bool_masked_pos=patch_masked, return_loss=False)
        mim = hf(pixel_values=pixels, bool_masked_pos=patch_masked, return_loss=False).mim_logits
        mlm = hf(input_ids=ids, input_ids_masked=masked_ids, attention_mask=attn.long(), return_loss=False).mlm_logits
        image_out, text_out = ours.encode_image(x)[1], ours.encode_text(ids, attn)[1]
        mm = ours.encode_multimodal(ours.encode_image(x, patch_masked=patch_masked)[0],
                                    ours.encode_text(masked_ids, attn)[0], attn)  # (B, M, D)
        return {"image embeddings": (image_out, o.image_embeddings), "text embeddings": (text_out, o.text_embeddings),
                "contrastive logits": (ours.scale() * ours.image_embed(image_out) @ ours.text_embed(text_out).T,
                                       o.contrastive_logits_per_image),
                "[CLS_M]": (mm[:, 0], o.multimodal_masked_embeddings[:, 0]),
                "ITM": (ours.itm_head(mm[:, 0]), o.itm_logits),
                "MMM-image": (ours.mmm_image_head(mm[:, 2: 2 + P]), o.mmm_image_logits),
                "MMM-text": (ours.mmm_text_head(mm[:, -L:]), o.mmm_text_logits),
                "MIM": (ours.mim_head(ours.encode_image(x, patch_masked=patch_masked)[1]), mim),
                "MLM": (ours.mlm_head(ours.encode_text(masked_ids, attn)[1]), mlm)}


def assert_outputs_match(hf, ours, L=12, atol=1e-4) -> float:
    """Each of output_pairs' outputs the same shape and within atol; returns the largest difference."""
    worst = 0.0
    for what, (a, b) in output_pairs(hf, ours, L).items():
        assert a.shape == b.shape and (a - b).abs().max() <= atol, (what, (a - b).abs().max())
        worst = max(worst, float((a - b).abs().max()))
    return worst


def test_a_flava_model_without_heads_and_other_image_sizes_match_hugging_face(tmp_path, capsys):
    hf = hf_flava()
    hf.flava.save_pretrained(tmp_path / "model")  # FlavaModel: encoders and projections only
    ours = pretrained.from_pretrained(tmp_path / "model", image_size=48)
    assert "no pretraining heads" in capsys.readouterr().out
    x = torch.rand(2, 3, 48, 48)
    pixels = (x - torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # Hugging Face interpolates the positions only when asked, on every call
        theirs = hf.flava.image_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        assert (ours.encode_image(x)[1] - theirs).abs().max() <= 1e-4


def test_dalle_encoder_gives_hugging_face_codebook_indices(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = hf_flava()
    cfg = pretrained.config_from_hf(HF_CONFIG)
    hf.save_pretrained(tmp_path / "full")  # flava-full's layout: image_codebook.* beside the model
    ours = pretrained.load_codebook(tmp_path / "full", cfg)
    config = transformers.FlavaImageCodebookConfig(**HF_CONFIG["image_codebook_config"])
    standalone = transformers.FlavaImageCodebook(config)
    standalone.load_state_dict({k.removeprefix("image_codebook."): v for k, v in hf.state_dict().items()
                                if k.startswith("image_codebook.")})
    standalone.save_pretrained(tmp_path / "codebook")  # facebook/flava-image-codebook's layout: no prefix
    alone = pretrained.load_codebook(tmp_path / "codebook", cfg)
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x.repeat_interleave(8, 2).repeat_interleave(8, 3)
    with torch.no_grad():  # 32 px = 8 px a patch of the 4 x 4 grid, each patch one random colour
        theirs = hf.image_codebook.get_codebook_indices(0.8 * x + 0.1).flatten(1)  # (B, P)
        assert (ours(0.8 * x + 0.1) - hf.image_codebook(0.8 * x + 0.1)).abs().max() <= 1e-5  # the logits too
    assert torch.equal(ours.codebook_indices(x), theirs) and torch.equal(alone.codebook_indices(x), theirs)
    assert theirs.unique().numel() >= 5  # varied codes, so that equal codes mean something


CORPUS = [  # 36 texts: punctuation, nine scripts, emoji and symbols, control, format and space characters
    "A photo of a dog, sitting on the grass.", "Don't stop--it's 5:30 p.m. (really)!", "e-mail a.b@c.com; $5 or 50%?",
    "Café naïve Ångström résumé ÉCOLE", "Straße İstanbul ΟΔΟΣ Σίσυφος", "Привет, мир! Москва", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีครับ", "日本語のテキストと漢字", "中文分词测试，很好。", "한국어 텍스트",
    "zero\u200bwidth joi\u200dner soft\u00adhyphen", "tab\tnew\nline\rcr  nbsp\u00a0ideographic\u3000space",
    "bell\x07 del\x7f nul\x00 repl\ufffd", "combining e\u0301 n\u0303", "ＦＵＬＬＷＩＤＴＨ ａｂｃ １２３", "x² H₂O ½ ﬁne",
    "5€ €5 £3 ¥ 9¢", "emoji 😀 hi😀 👍🏽 ❤️", "«quotes» „German“ ‘single’ …", "¿Qué? ¡Sí! — en–dash",
    "a_b snake_case __init__", "math ≥ ≤ ± × ÷ ∑ √", "http://example.com/path?q=1&x=y#frag", "word" * 30,
    "supercalifragilisticexpialidocious", "ǅ ǈ titlecase", "a\x0bb c\x0cd e\x1cf é\x0bt\x85é",
    "\u2028line sep\u2029para", "\ue000private use", "Ⅻ roman ⅻ ⓐⓑⓒ", "  leading and trailing  ", "", "!!!", "ß ẞ İİ ﬀ"]


def test_the_tokenizer_gives_bert_uncased_ids(tmp_path):
    pytest.importorskip("transformers")
    try:  # transformers 5: the Python tokenizer (Google's BERT algorithm) is the legacy class; Rust's is the default
        from transformers import BertTokenizer as RustBert
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as PythonBert
    except ImportError:  # transformers 4
        from transformers import BertTokenizer as PythonBert, BertTokenizerFast as RustBert
    for size, texts in ((4000, CORPUS), (300, CORPUS[:6])):  # a full vocabulary, and one full of [UNK]s
        tok = data.Tokenizer.from_corpus(texts, vocab_size=size)
        tok.save(tmp_path / "vocab.txt")
        python, rust = PythonBert(str(tmp_path / "vocab.txt")), RustBert.from_pretrained(tmp_path)
        for text in CORPUS + list(TOKENIZER_CASES):
            mine = tok.encode(text, 48)[0][0].tolist()
            for bert in (python, rust):
                theirs = bert(text, max_length=48, truncation=True, padding="max_length")["input_ids"]
                # Rust lower-cases a word-final Σ to σ, Python (and so Google's BERT) to ς: the one difference
                assert mine == theirs or bert is rust and "ΟΔΟΣ" in text, text


def test_squash_gives_the_pixels_of_flava_image_processor():
    transformers = pytest.importorskip("transformers")
    processor = transformers.FlavaImageProcessor(size=224, crop_size=224)  # flava-full's preprocessor_config.json
    rng = np.random.default_rng(0)
    mean, std = torch.tensor(M.CLIP_MEAN).view(3, 1, 1), torch.tensor(M.CLIP_STD).view(3, 1, 1)
    for h, w in ((300, 500), (97, 411), (224, 224)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        theirs = processor(img, return_tensors="pt")["pixel_values"][0]  # (3, 224, 224), normalised
        ours = data.image_transform(img, 224, train=False, squash=True).float() / 255  # the model normalises
        assert ((ours - mean) / std - theirs).abs().max() <= 1e-5, (h, w)
