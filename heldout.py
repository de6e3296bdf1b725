"""The command line of eval.py and its held-out data from files: a retrieval set by COCO's protocol, an image folder's classes and their
names, labelled texts, zero-shot templates; and every input of `python eval.py` opened (or refused in one line)
before any compute.

Companion of eval.py. A file that cannot be read is dropped from an evaluation set, never replaced by the next
one as in training (a retrieval set must not repeat a pair). Exercise it with
`python -m pytest tests/test_eval.py tests/test_retrieval_protocol.py`.
"""
import argparse
import json
import random
import sys

import torch

import checkpoints
import data
import manifests
import pretrained
import shapes


def read_files(ds, indices):
    """A file dataset's samples at indices -> (images (n, 3, S, S), [(index, sample)], unreadable count). A bad
    file is dropped, not replaced by the next one as in training (a retrieval set must not repeat a pair)."""
    good, bad = [], 0
    for i in indices:
        try:
            sample = ds.load(i)
        except RuntimeError:  # manifests.MAX_SKIPS unreadable files in a row
            sample = {"skipped": [i]}
        bad += bool(sample["skipped"])
        good += [] if sample["skipped"] else [(i, sample)]
    if not good:
        raise ValueError(f"none of the {len(indices)} files read could be decoded")
    return torch.stack([s["image"] for _, s in good]), good, bad


def retrieval_set(ds, n):
    """The first n rows of a manifests.FilePairs as the retrieval protocol has them: one image per distinct file
    (read once), its captions, an exact duplicate row once. -> images (I, 3, S, S), captions [T], image_of (T,),
    unreadable files (dropped with their captions)."""
    first, rows = {}, {}
    for i in range(min(n, len(ds))):
        file, caption = ds.pair(i)
        first.setdefault(file, i)
        rows[file, caption] = None  # a dict: ordered, duplicates once
    images, good, bad = read_files(ds, list(first.values()))
    at = {ds.pair(i)[0]: k for k, (i, _) in enumerate(good)}  # file -> its image's place
    kept = [(file, caption) for file, caption in rows if file in at]
    return images, [c for _, c in kept], torch.tensor([at[f] for f, _ in kept]), bad


def subset(n, cap):
    """Up to cap of n indices in a fixed random order (a folder lists class after class; splits go by position)."""
    return random.Random(0).sample(range(n), min(n, cap))


def labelled_texts(ds):
    """'label<TAB>text' lines of a manifests.TextFile -> (texts, labels (n,)); too few is an error."""
    rows = [[part.strip() for part in line.split("\t", 1)] for line in ds.lines if "\t" in line]
    names = sorted({label for label, _ in rows})
    if len(rows) < 10 or len(names) < 2:
        raise ValueError(f"--texts needs 'label<TAB>text' lines with at least 2 labels; found {len(rows)} of "
                         f"{len(ds.lines)} lines labelled, labels {names[:5]}")
    return [t for _, t in rows], torch.tensor([names.index(label) for label, _ in rows])


def read_class_names(path, folders):
    """--class_names: the name of each class sub-folder (a WordNet id, say), from 'folder<TAB>name' lines or a
    JSON object {folder: name} (or ImageNet's {index: [folder, name]})."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        table = {v[0] if isinstance(v, list) else k: v[-1] if isinstance(v, list) else v
                 for k, v in json.loads(text).items()}
    else:
        table = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    table = {k.strip().replace("_", " "): v.strip() for k, v in table.items()}  # as manifests.ImageFolder names folders
    missing = [folder for folder in folders if folder not in table]
    if missing:
        raise ValueError(f"{path} names no class for the sub-folder(s) {missing[:5]} ({len(missing)} in all)")
    return [table[folder] for folder in folders]


def held_out_files(args, tokenizer, cfg, squash):
    """--pairs as a manifests.FilePairs, --classes as a manifests.ImageFolder (None when not given), its classes named by
    --class_names, and the templates of --prompts (one a line, {} for the class name; default data.PROMPTS). squash:
    a published model's own resizing (Hugging Face's FLAVA: the whole image to a square)."""
    pairs = manifests.FilePairs(args.pairs, cfg.image_size, tokenizer, cfg.text_len, train=False) if args.pairs else None
    classes = manifests.ImageFolder(args.classes, cfg.image_size, train=False) if args.classes else None
    prompts = data.PROMPTS
    for files in (f for f in (pairs, classes) if f is not None):
        files.squash = squash
    if classes is not None and args.class_names:
        classes.classes = read_class_names(args.class_names, classes.classes)
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [t.strip() for t in f if "{}" in t]
        if not prompts:
            raise ValueError(f"{args.prompts}: no template with {{}} for the class name")
    return pairs, classes, prompts


def parse_args(argv, doc):
    """The flags of eval.py (its docstring is the --help)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="", help="a nanoFLAVA checkpoint (train.py's ckpt.pt)")
    parser.add_argument("--hf", default="", help="instead of --ckpt: a Hugging Face FLAVA folder (facebook/flava-full)")
    parser.add_argument("--out_dir", default="", help="for eval.json and figures (default: the checkpoint's folder)")
    parser.add_argument("--pairs", default="", help="JSONL/CSV manifest of held-out image-caption pairs (retrieval, ITM)")
    parser.add_argument("--classes", default="", help="image folder, class = sub-folder: zero-shot and a linear probe")
    parser.add_argument("--class_names", default="", help="--classes' sub-folder names (e.g. WordNet ids): TSV or JSON")
    parser.add_argument("--prompts", default="", help="zero-shot templates, one a line with {} (CLIP has 80 for ImageNet)")
    parser.add_argument("--texts", default="", help="text file of 'label<TAB>text' lines: a language linear probe")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: cuda when available)")
    parser.add_argument("--skip_figures", action="store_true", help="numbers only, no PNGs")
    parser.add_argument("--n_pairs", type=int, default=1000, help="retrieval and ITM pairs")
    parser.add_argument("--per_class", type=int, default=20, help="zero-shot images per synthetic class")
    parser.add_argument("--n_probe", type=int, default=2000, help="samples per probe, VQA scenes, most files read")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's; 1 on a busy machine)")
    args = parser.parse_args(argv)
    if bool(args.ckpt) == bool(args.hf):
        parser.error("give one of --ckpt and --hf")
    return args


def open_inputs(args, device):
    """Every input opened, or refused with one line naming the path and what was expected (exit status 2, as
    argparse), before any compute -> (checkpoint, model, tokenizer, image tokenizer, world, pairs, classes, texts, prompts)."""
    try:
        ckpt = pretrained.pretrained_checkpoint(args.hf) if args.hf else checkpoints.load_checkpoint(args.ckpt)
        model, image_tokenizer = checkpoints.models_from_checkpoint(ckpt, device)  # the checkpoint's own config and tokenizer
        tokenizer, train_cfg = data.Tokenizer(ckpt["vocab"]), ckpt.get("train_cfg", {})
        S, L = model.cfg.image_size, model.cfg.text_len
        files = train_cfg.get("pairs") or train_cfg.get("shards")  # trained on files, or published: real data
        synthetic = not files and "converted_from" not in ckpt
        world = shapes.ShapesWorld(image_size=S, seed=train_cfg.get("seed", 0)) if synthetic else None
        pairs, classes, prompts = held_out_files(args, tokenizer, model.cfg, ckpt.get("preprocess") == "squash")
        texts = manifests.TextFile(args.texts, tokenizer, L) if args.texts else None
        if texts is not None:
            labelled_texts(texts)
        if world is None and pairs is None and classes is None:
            raise ValueError(f"{args.ckpt or args.hf} was not trained on the synthetic world: give held-out pairs "
                             "with --pairs and/or an image folder with --classes (and --texts for more tasks)")
    except (FileNotFoundError, ValueError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return ckpt, model, tokenizer, image_tokenizer, world, pairs, classes, texts, prompts
