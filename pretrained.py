"""FLAVA's published weights: Hugging Face's FLAVA (facebook/flava-full) read into nanoFLAVA, DALL-E's encoder,
FLAVA's published image tokenizer (dalle.py holds its architecture), and nanoFLAVA's own checkpoints written out
as Hugging Face FLAVA folders for FLAVA's downstream users (export).

Companion of model.py (used by train.py --init_from, eval.py --hf and the commands below). Hugging Face stores
q, k and v apart, adds BERT's token-type row to every text token and keeps tanh poolers that no pretraining
output reads; hf_names is the explicit map from every nanoFLAVA tensor to the Hugging Face tensor(s) it is made
of: from_pretrained applies it, export reads it backwards (hf_state). Files are read and written by
weightfiles.py (torch alone, no safetensors package).

    python pretrained.py convert flava-full out/flava/ckpt.pt [--codebook flava-image-codebook]
    python pretrained.py export out/small/ckpt.pt out/small/hf   # FlavaForPreTraining.from_pretrained loads it
    python -m pytest tests/test_pretrained.py tests/test_export.py
"""
import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

import checkpoints
import data
import losses
from dalle import DalleEncoder
from masking import default_min_block
from model import CLIP_MEAN, CLIP_STD, FLAVA, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, ModelConfig
from weightfiles import load_state, read_weights, write_safetensors

# ---------------------------------------------------------------------------------------------
# Hugging Face's FLAVA in nanoFLAVA's names
# ---------------------------------------------------------------------------------------------


def codebook_hf_names(cfg: ModelConfig) -> dict:
    """DalleEncoder tensor name -> Hugging Face's FlavaImageCodebook name (flava-full adds image_codebook.), one
    map read both ways (codebook_state imports, export writes). For example groups.1.0.res_path.5.weight ->
    blocks.group_2.group.block_1.res_path.path.conv_3.weight: groups and blocks count from 1 there, and only the
    convolutions of the residual path are numbered (ours count its ReLUs too)."""
    with torch.device("meta"):  # the names and nothing else: no memory for `base`'s 256-wide encoder
        names = list(DalleEncoder(cfg).state_dict())
    out = {}
    for name in names:
        hf = re.sub(r"^(input|output)\.", lambda m: f"blocks.{m[1]}{'.conv' if m[1] == 'output' else ''}.", name)
        hf = re.sub(r"^groups\.(\d)\.(\d+)\.",
                    lambda m: f"blocks.group_{int(m[1]) + 1}.group.block_{int(m[2]) + 1}.", hf)
        out[name] = re.sub(r"res_path\.(\d)", lambda m: f"res_path.path.conv_{(int(m[1]) + 1) // 2}", hf)
    return out


def codebook_state(path, cfg: ModelConfig) -> dict:
    """DalleEncoder's tensors from Hugging Face's FlavaImageCodebook names (codebook_hf_names), with flava-full's
    image_codebook. prefix or without (facebook/flava-image-codebook); {} if there are none. A name the map does
    not know (another block count?) stays as it is, so that load_state names it."""
    ours = {hf: name for name, hf in codebook_hf_names(cfg).items()}
    out = {}
    for name, tensor in read_weights(path, keep=lambda k: k.startswith(("image_codebook.", "blocks."))).items():
        if tensor is not None:
            out[ours.get(name.removeprefix("image_codebook."), name)] = tensor.float()
    return out


def load_codebook(path, cfg: ModelConfig) -> DalleEncoder:
    """DALL-E's encoder from flava-full's image_codebook.* tensors, or from facebook/flava-image-codebook's own files."""
    state = codebook_state(path, cfg)
    if not state:
        raise ValueError(f"{path}: no image codebook tensors (image_codebook.* or blocks.*)")
    encoder = DalleEncoder(cfg)
    load_state(encoder, state, f"{path} image codebook")
    return encoder.requires_grad_(False).eval()


# Hugging Face's FlavaConfig defaults (those of the `base` preset), for what a config.json leaves out
_TOWER = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, layer_norm_eps=1e-12, hidden_act="gelu",
              qkv_bias=True)
HF_DEFAULTS = {"image_config": dict(_TOWER, num_hidden_layers=12, image_size=224, patch_size=16, vocab_size=8192),
               "text_config": dict(_TOWER, num_hidden_layers=12, vocab_size=30522, max_position_embeddings=512),
               "multimodal_config": dict(_TOWER, num_hidden_layers=6),
               "image_codebook_config": dict(hidden_size=256, num_blocks_per_group=2, vocab_size=8192)}


# What a Hugging Face FlavaConfig cannot say, kept in config.json's "nanoflava" by export. text_len too: flava-full's
# 512 positions import as FLAVA's 77-token captions, an exported model's positions as all of its own.
NANOFLAVA_ONLY = ("text_len", "image_tokenizer", "attn", "grad_ckpt", "init_std")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig from a Hugging Face FlavaConfig (config.json). nanoFLAVA's encoders share one width, head
    count, MLP ratio and LayerNorm epsilon: a config whose encoders differ is refused, naming the field. A folder
    that export wrote also holds, under "nanoflava", the fields Hugging Face has no place for (NANOFLAVA_ONLY)."""
    overrides = {**{k: v for k, v in (hf.get("nanoflava") or {}).items() if k in NANOFLAVA_ONLY}, **overrides}
    sub = {k: {**d, **(hf.get(k) or {}), **(hf.get(k + "_dict") or {})} for k, d in HF_DEFAULTS.items()}  # _dict: 4.x
    img, txt, mm, cb = sub.values()
    size, patch = (img[k][0] if isinstance(img[k], list) and len(set(img[k])) == 1 else img[k]
                   for k in ("image_size", "patch_size"))  # [224, 224] -> 224
    checks = {  # name: (value, what nanoFLAVA needs)
        **{f"{k}.{key}": (sub[k][key], img[key]) for k in ("text_config", "multimodal_config") for key in _TOWER},
        "image_config.hidden_act": (img["hidden_act"], "gelu"), "image_config.qkv_bias": (img["qkv_bias"], True),
        "hidden_size": (hf.get("hidden_size", 768), img["hidden_size"]),
        "intermediate_size % hidden_size": (img["intermediate_size"] % img["hidden_size"], 0),
        "square image_size and patch_size": (isinstance(size, int) and isinstance(patch, int), True),
        "image_codebook_config.vocab_size": (cb["vocab_size"], img["vocab_size"]),
        "text_len <= max_position_embeddings": (overrides.get("text_len", 0) <= txt["max_position_embeddings"], True)}
    problems = [f"{name}={got!r} (needs {want!r})" for name, (got, want) in checks.items() if got != want]
    if problems:
        raise ValueError("this Hugging Face FLAVA config does not fit nanoFLAVA: " + "; ".join(problems))
    return ModelConfig.from_preset("base", **{**dict(
        image_size=size, patch_size=patch, width=img["hidden_size"],
        heads=img["num_attention_heads"], mlp_ratio=img["intermediate_size"] // img["hidden_size"],
        image_layers=img["num_hidden_layers"], text_layers=txt["num_hidden_layers"], mm_layers=mm["num_hidden_layers"],
        vocab_size=txt["vocab_size"], text_len=min(77, txt["max_position_embeddings"]),  # FLAVA's captions: 77 tokens
        embed_dim=hf.get("projection_dim", 768), codebook_size=img["vocab_size"], ln_eps=img["layer_norm_eps"],
        image_tokenizer="dalle", dalle_hidden=cb["hidden_size"], dalle_blocks=cb["num_blocks_per_group"]), **overrides})


HF_HEADS = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head", "itm_head")


def hf_names(cfg: ModelConfig) -> dict:
    """nanoFLAVA tensor name -> the Hugging Face name(s) it is made of (FlavaForPreTraining's, less "flava.")."""
    m = {"image_encoder.cls_token": "image_model.embeddings.cls_token", "logit_scale": "logit_scale",
         "image_encoder.mask_token": "image_model.embeddings.mask_token",
         "mm_encoder.cls_token": "multimodal_model.cls_token",
         "image_encoder.pos_embed": "image_model.embeddings.position_embeddings",
         "text_encoder.word_embed.weight": "text_model.embeddings.word_embeddings.weight",
         "text_encoder.pos_embed": ("text_model.embeddings.position_embeddings.weight",
                                    "text_model.embeddings.token_type_embeddings.weight")}
    renames = {"image_encoder.patch_embed": "image_model.embeddings.patch_embeddings.projection",
               "text_encoder.ln_embed": "text_model.embeddings.LayerNorm", "image_projection": "image_projection",
               "mm_encoder.image_to_mm": "image_to_mm_projection", "mm_encoder.text_to_mm": "text_to_mm_projection",
               "text_projection": "text_projection", "itm_head.pooler": "itm_head.pooler.dense",
               "itm_head.classifier": "itm_head.seq_relationship"}
    renames |= {f"{h}.{ours}": f"{h}.{theirs}" for h in HF_HEADS[:4] for ours, theirs in
                (("dense", "transform.dense"), ("ln", "transform.LayerNorm"), ("decoder", "decoder"))}
    for ours, hf, depth in (("image_encoder", "image_model", cfg.image_layers), ("mm_encoder", "multimodal_model",
                            cfg.mm_layers), ("text_encoder", "text_model", cfg.text_layers)):
        renames[f"{ours}.transformer.ln_f"] = f"{hf}.layernorm"
        for i in range(depth):
            a, b = f"{ours}.transformer.blocks.{i}", f"{hf}.encoder.layer.{i}"
            renames |= {f"{a}.attn.proj": f"{b}.attention.output.dense", f"{a}.mlp.fc1": f"{b}.intermediate.dense",
                        f"{a}.mlp.fc2": f"{b}.output.dense", f"{a}.ln1": f"{b}.layernorm_before",
                        f"{a}.ln2": f"{b}.layernorm_after"}
            m |= {f"{a}.attn.qkv.{w}": tuple(f"{b}.attention.attention.{x}.{w}" for x in ("query", "key", "value"))
                  for w in ("weight", "bias")}
    return m | {f"{ours}.{w}": f"{hf}.{w}" for ours, hf in renames.items() for w in ("weight", "bias")}


def from_pretrained(path, **overrides) -> FLAVA:
    """Hugging Face's FLAVA (a folder like facebook/flava-full: config.json and pytorch_model.bin or
    model.safetensors) as a nanoFLAVA model; overrides are ModelConfig fields (image_size, text_len, ...). As
    nanoGPT's GPT.from_pretrained, with an explicit name map (hf_names). q, k and v fuse into qkv; BERT's
    token-type row 0 (which it adds to every token) folds into the text positions, cut from 512 to text_len; the
    encoders' tanh poolers (no pretraining output reads them), position_ids and the codebook (load_codebook) are
    dropped; any other name is an error. Image positions are resized for another image_size."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face FLAVA folder such as facebook/flava-full)")
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), **overrides)
    state = {k.removeprefix("flava."): v for k, v in read_weights(folder, lambda k: "image_codebook." not in k).items()}
    for h in HF_HEADS[:4]:  # the output bias is one tied tensor, saved as <head>.bias, decoder.bias or both
        tied = state.pop(f"{h}.bias", None)
        state[f"{h}.decoder.bias"] = state.get(f"{h}.decoder.bias", tied)
    names = hf_names(cfg)
    used = {n for src in names.values() for n in (src if isinstance(src, tuple) else (src,))}
    dropped = re.compile(r"image_codebook\..*|(image|text|multimodal)_model\.pooler\.dense\.(weight|bias)|.*_ids")
    unknown = sorted(k for k in state if k not in used and not dropped.fullmatch(k))
    missing, heads = sorted(k for k in used if state.get(k) is None), sorted(k for k in used if k.startswith(HF_HEADS))
    if unknown or missing and missing != heads:
        raise ValueError(f"{folder}: tensors neither mapped nor knowingly dropped: {unknown[:8]}; "
                         f"missing: {missing[:8]}")
    if missing:
        print(f"{folder}: no pretraining heads (a FlavaModel file): MIM, MLM, MMM and ITM keep their initialisation")
    model = FLAVA(cfg)
    ours = model.state_dict()
    for name, src in names.items():
        parts = [state[k].float() for k in (src if isinstance(src, tuple) else (src,)) if state.get(k) is not None]
        if name == "text_encoder.pos_embed":  # (1, L, D): positions plus token type 0, which BERT adds to every token
            ours[name] = (parts[0][: cfg.text_len] + parts[1][0])[None]
        elif parts:  # q, k and v stacked on dim 0 are qkv's (3D, D) layout
            ours[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    grid = math.isqrt(ours["image_encoder.pos_embed"].size(1) - 1)
    if grid != cfg.grid:  # (1, 1 + g*g, D) -> (1, 1 + P, D): the patch rows resized as a g x g image, as HF does
        pos, D = ours["image_encoder.pos_embed"], cfg.width
        table = F.interpolate(pos[:, 1:].reshape(1, grid, grid, D).permute(0, 3, 1, 2), size=(cfg.grid, cfg.grid),
                              mode="bicubic", align_corners=False)  # (1, D, G, G)
        ours["image_encoder.pos_embed"] = torch.cat([pos[:, :1], table.flatten(2).transpose(1, 2)], dim=1)
        print(f"{folder}: image positions resized bicubically from {grid} x {grid} to {cfg.grid} x {cfg.grid} patches")
    # Hugging Face clamps logit_scale to [0, 4.6052] in training only; we clamp it to [0, ln 100] on every use, as
    # CLIP, open_clip and TorchMultimodal do. Inside that range both give the same logits; outside it, we say so.
    scale = float(ours["logit_scale"])
    if not 0 <= scale <= LOGIT_SCALE_MAX:
        ours["logit_scale"] = ours["logit_scale"].clamp(0, LOGIT_SCALE_MAX)
        print(f"{folder}: logit_scale {scale:.6f} clamped to [0, ln 100]: contrastive logits x "
              f"{math.exp(float(ours['logit_scale']) - scale):.6f}")
    load_state(model, ours, str(folder))
    return model


def pretrained_checkpoint(path, codebook="", **overrides) -> dict:
    """A Hugging Face FLAVA folder as a nanoFLAVA checkpoint (as checkpoints.load_checkpoint returns one): the model,
    DALL-E's encoder from the folder's image_codebook.* tensors or from `codebook` (facebook/flava-image-codebook;
    None if neither has one), the vocabulary of vocab.txt, and how preprocessor_config.json resizes: "squash"
    (the whole image to S x S: Hugging Face's FlavaImageProcessor with an integer or height-and-width size, its
    default) or "crop" (shortest side, then the central square, as TorchMultimodal and nanoFLAVA's data.py)."""
    model, folder = from_pretrained(path, **overrides), Path(path)
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"{folder}: no vocab.txt (FLAVA's BERT uncased word pieces)")
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")  # as data.Tokenizer.from_vocab_file
    codebook_tensors = codebook_state(codebook or path, model.cfg) or None
    if codebook_tensors is None:
        print(f"{codebook or folder}: no image codebook: MIM targets need one (facebook/flava-image-codebook)")
    else:
        load_state(DalleEncoder(model.cfg), codebook_tensors, f"{codebook or folder} image codebook")  # shapes checked
    pre = folder / "preprocessor_config.json"
    size = json.loads(pre.read_text()).get("size", 224) if pre.is_file() else 224  # Hugging Face's default: 224
    return {"format": checkpoints.FORMAT, "model": model.state_dict(), "image_tokenizer": codebook_tensors,
            "model_cfg": asdict(model.cfg),
            "step": 0, "vocab": [t.rstrip("\r") for t in (vocab[:-1] if vocab[-1] == "" else vocab)],
            "converted_from": str(folder), "preprocess": "crop" if isinstance(size, dict) and "shortest_edge" in size
            else "squash"}


# ---------------------------------------------------------------------------------------------
# nanoFLAVA as a Hugging Face FLAVA folder (export): the maps above, read backwards
# ---------------------------------------------------------------------------------------------

NOT_IN_HF = {  # ModelConfig field: (the value Hugging Face's FLAVA cannot be, what it is there)
    "stem": ("conv", "Hugging Face's FLAVA embeds a patch by one linear projection (stem='linear')"),
    "image_pool": ("mean", "Hugging Face's FLAVA reads [CLS_I] for the contrastive feature (image_pool='cls')")}


def config_to_hf(cfg: ModelConfig, codebook: bool, pad_id: int = 0) -> dict:
    """config.json for cfg: the FlavaConfig that config_from_hf reads back to cfg (NANOFLAVA_ONLY in "nanoflava").
    What Hugging Face's FLAVA cannot be (NOT_IN_HF) is refused in one line. codebook: whether image_codebook.*
    tensors come along; without them init_codebook is off, so that transformers makes no random DALL-E encoder."""
    for field, (value, there) in NOT_IN_HF.items():
        if getattr(cfg, field) == value:
            raise ValueError(f"{field}={value!r} does not export: {there}")
    tower = dict(hidden_size=cfg.width, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.width,
                 layer_norm_eps=cfg.ln_eps, hidden_act="gelu", qkv_bias=True, initializer_range=cfg.init_std,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # FLAVA trains without dropout
    return {"architectures": ["FlavaForPreTraining"], "model_type": "flava",
            "image_config": dict(tower, num_hidden_layers=cfg.image_layers, image_size=cfg.image_size,
                                 patch_size=cfg.patch_size, vocab_size=cfg.codebook_size, mask_token=True),
            "text_config": dict(tower, num_hidden_layers=cfg.text_layers, vocab_size=cfg.vocab_size,
                                max_position_embeddings=cfg.text_len, type_vocab_size=2, pad_token_id=pad_id),
            "multimodal_config": dict(tower, num_hidden_layers=cfg.mm_layers, use_cls_token=True),
            "image_codebook_config": dict(hidden_size=cfg.dalle_hidden, num_blocks_per_group=cfg.dalle_blocks,
                                          vocab_size=cfg.codebook_size),
            "hidden_size": cfg.width, "layer_norm_eps": cfg.ln_eps, "projection_dim": cfg.embed_dim,
            "init_codebook": codebook, "logit_scale_init_value": LOGIT_SCALE_INIT, "initializer_range": cfg.init_std,
            "nanoflava": {k: getattr(cfg, k) for k in NANOFLAVA_ONLY}}


def hf_state(state: dict, cfg: ModelConfig) -> dict:
    """nanoFLAVA's tensors under FlavaForPreTraining's names: hf_names read backwards. qkv splits into q, k, v; the
    text positions, which hold BERT's token-type row 0 already, go out as they are beside token-type rows of zero;
    a head's output bias goes out as decoder.bias alone (<head>.bias is the same tied tensor; transformers 5
    saves it so too)."""
    out = {}
    for name, src in hf_names(cfg).items():
        t = state[name]
        if name == "text_encoder.pos_embed":  # (1, L, D) -> positions (L, D) and token types (2, D) of zero
            out[src[0]], out[src[1]] = t[0], torch.zeros(2, t.size(-1), dtype=t.dtype)
        elif isinstance(src, tuple):  # (3D, ...) -> 3 x (D, ...): qkv is q, k and v stacked on dim 0
            out |= dict(zip(src, t.chunk(3)))
        else:
            out[src] = t
    return {k if k.startswith(HF_HEADS) else f"flava.{k}": v for k, v in out.items()}


def tokenizer_config(cfg: ModelConfig) -> dict:
    """tokenizer_config.json for BertTokenizer over our vocab.txt: BERT uncased's rules, which data.Tokenizer
    follows (lower case, accents stripped, CJK one word each), and our text length."""
    return {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None,
            "tokenize_chinese_chars": True, "model_max_length": cfg.text_len,
            **{f"{kind}_token": t for kind, t in zip(("pad", "unk", "cls", "sep", "mask"), data.SPECIALS)}}


def preprocessor_config(cfg: ModelConfig, loss_cfg: dict) -> dict:
    """preprocessor_config.json for FlavaImageProcessor: the shortest side to image_size, then the central square,
    as nanoFLAVA evaluates (pretrained_checkpoint reads it back as preprocess="crop"); CLIP's mean and std; BEiT's
    masks on our grid with the masked share and block of training (loss_cfg); DALL-E's pixels at 8 a patch."""
    S, G, side = cfg.image_size, cfg.grid, 8 * cfg.grid
    lc = {**asdict(losses.LossConfig()), **loss_cfg}
    return {"image_processor_type": "FlavaImageProcessor", "do_resize": True, "size": {"shortest_edge": S},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": S, "width": S}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "return_image_mask": False, "input_size_patches": G,
            "total_mask_patches": max(1, round(lc["mask_ratio"] * G * G)),  # as losses.FLAVALoss draws them
            "mask_group_min_patches": lc["min_block"] or default_min_block(G * G), "mask_group_min_aspect_ratio": 0.3,
            "return_codebook_pixels": False, "codebook_do_resize": True, "codebook_size": {"shortest_edge": side},
            "codebook_resample": 1, "codebook_do_center_crop": True,  # 1: Lanczos, as flava-full's codebook pixels
            "codebook_crop_size": {"height": side, "width": side}, "codebook_do_map_pixels": True}


def export(ckpt_path, out_dir) -> Path:
    """A nanoFLAVA checkpoint as a folder that transformers' FlavaForPreTraining and FlavaModel load: config.json,
    model.safetensors (written by hand, atomically), vocab.txt with tokenizer_config.json (BertTokenizer) and
    preprocessor_config.json (FlavaImageProcessor). What Hugging Face's FLAVA cannot be is refused in one line;
    what it has no place for is left out, and said in one line each."""
    ckpt, folder = checkpoints.load_checkpoint(ckpt_path), Path(out_dir)
    try:
        cfg, vocab = ModelConfig(**ckpt["model_cfg"]), ckpt["vocab"]  # (TypeError: a field this ModelConfig lacks)
        tokenizer = data.Tokenizer(vocab)  # the special tokens are there
        if len(vocab) > cfg.vocab_size:
            raise ValueError(f"its {len(vocab)} word pieces are more than the model's vocab_size={cfg.vocab_size}")
        config = config_to_hf(cfg, cfg.image_tokenizer == "dalle" and bool(ckpt["image_tokenizer"]), tokenizer.pad_id)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt_path}: {e}") from None
    stale = sorted(f.name for f in folder.glob("*") if f.name.endswith((".bin", ".index.json", ".safetensors"))
                   and f.name != "model.safetensors")
    if stale:  # read_weights would take an index or a .bin there for ours
        raise ValueError(f"{folder} already holds other weight files {stale}: export into a new folder")
    model, image_tokenizer = checkpoints.models_from_checkpoint(ckpt)  # every shape checked against the config
    state = hf_state(model.state_dict(), cfg)
    if config["init_codebook"]:
        own = image_tokenizer.state_dict()
        state |= {f"image_codebook.{hf}": own[name] for name, hf in codebook_hf_names(cfg).items()}
    else:
        print(f"{ckpt_path}: image tokenizer {'k-means' if cfg.image_tokenizer == 'kmeans' else 'absent'}: left out "
              f"(Hugging Face's image codebook is DALL-E's encoder; give its losses mim_labels)")
    print(f"{ckpt_path}: no encoder poolers (no pretraining output reads them): transformers initialises their "
          f"pooler.dense afresh")
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", state)
    for name, content in (("config.json", config), ("tokenizer_config.json", tokenizer_config(cfg)),
                          ("preprocessor_config.json", preprocessor_config(cfg, ckpt.get("loss_cfg", {})))):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")  # as data.Tokenizer.save
    print(f"wrote {folder}: {len(state)} tensors, {len(vocab)} word pieces, {cfg.image_size} px images")
    return folder


def main(argv=None):
    """python pretrained.py convert HF_FOLDER out/ckpt.pt [--codebook FOLDER] (also: python model.py convert ...);
    python pretrained.py export out/ckpt.pt HF_FOLDER. Bad input: one line on stderr, exit status 2."""
    parser = argparse.ArgumentParser(description="FLAVA between Hugging Face folders and nanoFLAVA checkpoints")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="a published FLAVA (a Hugging Face folder) as a nanoFLAVA checkpoint")
    convert.add_argument("hf_folder", help="facebook/flava-full, downloaded: config.json, pytorch_model.bin, vocab.txt")
    convert.add_argument("out", help="the nanoFLAVA checkpoint to write, e.g. out/flava/ckpt.pt")
    convert.add_argument("--codebook", default="", help="facebook/flava-image-codebook, if hf_folder has no codebook")
    out = commands.add_parser("export", help="a nanoFLAVA checkpoint as a Hugging Face FLAVA folder")
    out.add_argument("ckpt", help="a nanoFLAVA checkpoint, e.g. out/small/ckpt.pt")
    out.add_argument("out_dir", help="the folder to write: FlavaForPreTraining.from_pretrained(out_dir) loads it")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            return export(args.ckpt, args.out_dir)
        ckpt = pretrained_checkpoint(args.hf_folder, args.codebook)
    except (FileNotFoundError, ValueError) as e:
        print(f"pretrained.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    checkpoints.save_atomic(ckpt, args.out)  # written whole, then renamed: never a torn checkpoint
    print(f"wrote {args.out}: image tokenizer {'DALL-E encoder' if ckpt['image_tokenizer'] else 'none'}, "
          f"{len(ckpt['vocab'])} word pieces")


if __name__ == "__main__":
    main()
