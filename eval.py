"""What a trained nanoFLAVA can do, on held-out data: vision, language, multimodal and zero-shot tasks.

FLAVA (arXiv 2112.04482) §4 claims one model good at three kinds of task. The suite:
- zero-shot retrieval (FLAVA's COCO / Flickr protocol): cosine similarity of the contrastive embeddings, R@1/5/10;
- zero-shot classification with CLIP's prompt ensemble (arXiv 2103.00020 §3.1.4), also on the (colour, shape)
  combinations held out of training: composition that no training pair shows;
- linear probes on frozen [CLS_I] (vision) and [CLS_T] (language): multinomial logistic regression, its L2
  strength chosen on a validation split (CLIP App. A.3);
- multimodal: a linear head on frozen [CLS_M] for VQA generated from the scene graphs (only the head trains),
  beside an image-only and a text-only head, so that the gain from fusion shows; ITM accuracy;
- FLIP's (arXiv 2212.00794) Table 1d question: zero-shot accuracy with 0 / 50 / 75% of the patches dropped;
- the image tokenizer's health: reconstruction error, codebook perplexity, share of codes used; and figures (PIL).
Held out = the val split of the checkpoint's own synthetic world (its seed, its held-out combinations), in
disjoint index ranges per task, or files given on the command line, which replace the synthetic data of the
tasks they feed. Shapes follow model.py's legend; n is the size of an evaluation set.

    python eval.py --ckpt out/ckpt.pt          # one table, out/eval.json and the figures out/*.png
    python eval.py --ckpt out/ckpt.pt --pairs held_out.jsonl --classes photos/ --texts labelled.tsv
    python eval.py --hf flava-full --classes imagenet/val --class_names names.tsv   # the published FLAVA
    python -m pytest tests/test_eval.py tests/test_pretrained.py

The file runs: frozen features -> the metrics of each task -> the synthetic world's held-out sets -> the suite
(quick_eval, evaluate) -> the command line. Held-out files are read by heldout.py, figures drawn by figures.py.
"""
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F

import data
import distributed
import figures
import heldout
import masking
from losses import codebook_stats

QUESTION_TYPES = {"how many": "count", "what colour": "colour", "is there": "yesno", "which shape": "which"}
DROPS = (50, 75)  # % of patches dropped at inference, beside 0% (FLIP Table 1d)
FIRST = {"pairs": 0, "singles": 100_000, "scenes": 200_000, "captions": 300_000}  # disjoint val scenes per task

# ---------------------------------------------------------------------------------------------
# Features (one frozen pass per input; every number is read from these), metrics, the probe
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def image_features(model, images, device, autocast, keep_ratio=1.0, seed=0, batch=256):
    """uint8 (n, 3, S, S) -> [CLS_I] of the final LayerNorm (n, D) and contrastive embeddings (n, E). With
    keep_ratio < 1 a random share of the patches is dropped first, as in FLIP's training pass."""
    gen, cls, emb = torch.Generator().manual_seed(seed), [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device).float() / 255  # (B, 3, S, S) in [0, 1]; the model normalises
        keep = None if keep_ratio == 1 else masking.random_keep(len(x), model.cfg.num_patches, keep_ratio,
                                                                generator=gen).to(device)  # (B, K)
        with autocast:
            out = model.encode_image(x, keep_idx=keep).out  # (B, N, D), N = 1 + K
            cls.append(out[:, 0].float())
            emb.append(model.image_embed(out))
    return torch.cat(cls).cpu(), torch.cat(emb).cpu()  # (n, D), (n, E)


@torch.no_grad()
def text_features(model, tokenizer, texts, device, autocast, batch=512):
    """n strings -> [CLS_T] of the final LayerNorm (n, D) and contrastive embeddings (n, E)."""
    cls, emb = [], []
    for i in range(0, len(texts), batch):
        ids, attn = tokenizer.encode(texts[i : i + batch], model.cfg.text_len)  # (B, L), (B, L)
        with autocast:
            out = model.encode_text(ids.to(device), attn.to(device)).out  # (B, L, D)
            cls.append(out[:, 0].float())
            emb.append(model.text_embed(out))
    return torch.cat(cls).cpu(), torch.cat(emb).cpu()  # (n, D), (n, E)


@torch.no_grad()
def fused_features(model, tokenizer, images, at, texts, device, autocast, batch=256):
    """Text t with image images[at[t]] through all three encoders -> [CLS_M] (n, D) and ITM logits (n, 2),
    1 = match. Each batch encodes its distinct images once (a scene has several questions)."""
    cls, itm = [], []
    for i in range(0, len(texts), batch):
        ids, attn = (t.to(device) for t in tokenizer.encode(texts[i : i + batch], model.cfg.text_len))  # (B, L)
        distinct, which = at[i : i + batch].unique(return_inverse=True)  # (U,), (B,)
        with autocast:
            image_hidden = model.encode_image(images[distinct].to(device).float() / 255).hidden  # (U, N, D)
            text_hidden = model.encode_text(ids, attn).hidden  # (B, L, D)
            mm = model.encode_multimodal(image_hidden[which.to(device)], text_hidden, attn)  # (B, M, D)
            cls.append(mm[:, 0].float())
            itm.append(model.itm_head(mm[:, 0]).float())
    return torch.cat(cls).cpu(), torch.cat(itm).cpu()  # (n, D), (n, 2)


@torch.no_grad()
def masked_predictions(model, images, ids, attn, patch_masked, device, autocast, batch=256):
    """Training's masked pass, frozen: images uint8 (n, 3, S, S) with the patches in patch_masked (n, P)
    replaced by the mask token (None: none), text ids (n, L) that may hold [MASK] -> the top-1 code of MIM
    (image encoder alone) and of MMM-image (multimodal encoder) at every patch, (n, P) each, and the top-1
    word of MMM-text at every text position, (n, L)."""
    out, P, L = {"mim": [], "mmm_image": [], "mmm_text": []}, model.cfg.num_patches, ids.size(1)
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device).float() / 255  # (B, 3, S, S) in [0, 1]
        hidden = None if patch_masked is None else patch_masked[i : i + batch].to(device)  # (B, P)
        a = attn[i : i + batch].to(device)  # (B, L)
        with autocast:
            image = model.encode_image(x, patch_masked=hidden)  # Encoded: 2 x (B, N, D)
            mm = model.encode_multimodal(image.hidden, model.encode_text(ids[i : i + batch].to(device), a).hidden, a)
            out["mim"].append(model.mim_head(image.out[:, 1:]).argmax(-1).cpu())  # (B, P)
            out["mmm_image"].append(model.mmm_image_head(mm[:, 2 : 2 + P]).argmax(-1).cpu())  # (B, P)
            out["mmm_text"].append(model.mmm_text_head(mm[:, -L:]).argmax(-1).cpu())  # (B, L)
    return {k: torch.cat(v) for k, v in out.items()}


def auc(pos, neg):
    """Area under the ROC curve: the chance that a positive scores above a negative, ties counting half
    (Mann-Whitney). 0.5 is a model that cannot tell them apart, whatever its threshold."""
    diff = pos[:, None] - neg[None, :]  # (n_pos, n_neg)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()


def itm_metrics(model, tokenizer, images, captions, scenes, world, device, autocast):
    """ITM on held-out pairs: every pair matched, and with a random other pair's caption where that differs,
    a balanced set: itm_acc (argmax) and itm_auc (score = match logit - no-match logit). With the scene
    graphs, also each pair against its caption with one attribute made false (shapes.ShapesWorld.hard_negative):
    itm_auc_hard, and per kind of change (colour, shape, size, relation)."""
    n, rng = len(captions), random.Random(0)
    partner = [(j + rng.randrange(1, n)) % n for j in range(n)]  # uniform over the other pairs
    wrong = [j for j in range(n) if captions[partner[j]] != captions[j]]
    hard = [world.hard_negative(s, c, random.Random(f"hard/{j}")) for j, (s, c) in enumerate(zip(scenes, captions))]
    texts = captions + [captions[partner[j]] for j in wrong] + [text for text, _ in hard]
    at = torch.tensor([*range(n), *wrong, *range(len(hard))])  # the image each text is paired with
    logits = fused_features(model, tokenizer, images, at, texts, device, autocast)[1]  # (m, 2)
    score = logits[:, 1] - logits[:, 0]  # (m,)
    pos, neg, hard_score = score[:n], score[n : n + len(wrong)], score[n + len(wrong) :]
    results = {"itm_acc": mean(logits[: n + len(wrong)].argmax(1) == (torch.arange(n + len(wrong)) < n).long()),
               "itm_auc": auc(pos, neg)}
    if hard:
        results["itm_auc_hard"] = auc(pos, hard_score)
        kinds = [kind for _, kind in hard]
        for kind in ("colour", "shape", "size", "relation"):  # against the positives of the same images
            pick = torch.tensor([k == kind for k in kinds])
            results[f"itm_auc_hard_{kind}"] = auc(pos[:len(hard)][pick], hard_score[pick])
    return results


def fusion_metrics(model, image_tokenizer, tokenizer, world, images, captions, scenes, mask_ratio, device, autocast):
    """Does fusion fuse? With the synthetic world: MMM-text's top-1 on the colour words (even rows) or the
    shape words (odd rows) of held-out captions, all of them masked, counted right when it names the same
    colour or shape (synonyms too); with the image (mmm_attr_acc) and with the blank mean image
    (mmm_attr_acc_blank): only a model that reads the image can beat the text's own hints; and by the scene's
    number of objects (mmm_attr_acc_1obj, _2obj, ...): one object needs no binding, several need the word bound
    to the right one (scenes: the pairs' scene graphs). On any pairs:
    the codes of BEiT-masked patches predicted by MMM-image (with the caption) and by MIM (the image alone),
    beside always answering the most frequent code (code_majority_acc)."""
    cfg, n = model.cfg, len(captions)
    ids, attn = tokenizer.encode(captions, cfg.text_len)  # (n, L)
    gen = torch.Generator().manual_seed(0)
    hidden = masking.block_mask(n, cfg.grid, max(1, round(mask_ratio * cfg.num_patches)), generator=gen)  # (n, P)
    codes = image_tokenizer.codebook_indices(images.to(device).float() / 255).cpu()[hidden]  # (n_hidden,)
    pred = masked_predictions(model, images, ids, attn, hidden, device, autocast)
    results = {"mmm_image_acc": mean(pred["mmm_image"][hidden] == codes), "mim_acc": mean(pred["mim"][hidden] == codes),
               "code_majority_acc": codes.bincount().max().item() / len(codes)}
    if world is None:
        return results
    words = [{tokenizer.index[w]: w for w in world.COLOURS if w in tokenizer.index},  # id -> what it names
             {tokenizer.index[w]: s for s, ws in world.SHAPE_WORDS.items() for w in ws if w in tokenizer.index}]
    asked = torch.tensor([[t in words[r % 2] for t in row] for r, row in enumerate(ids.tolist())])  # (n, L)
    blank = images.float().mean(0, keepdim=True).round().byte().expand_as(images)  # (n, 3, S, S) the mean image
    objects = torch.tensor([len(s["objects"]) for s in scenes]).repeat_interleave(asked.sum(1))  # (w,) per asked word
    for name, pictures in (("mmm_attr_acc", images), ("mmm_attr_acc_blank", blank)):
        said = masked_predictions(model, pictures, ids.masked_fill(asked, tokenizer.mask_id), attn, None, device,
                                  autocast)["mmm_text"]  # (n, L)
        right = torch.tensor([words[r % 2].get(p) == words[r % 2][t] for r, (row, guess)
                              in enumerate(zip(ids.tolist(), said.tolist())) for t, p in zip(row, guess)
                              if t in words[r % 2]])  # (w,)
        results[name] = mean(right)
        if pictures is images:  # by the scene's number of objects, with the image
            results |= {f"mmm_attr_acc_{k}obj": mean(right[objects == k]) for k in range(1, world.max_objects + 1)}
    return results


def recall_at_k(sim, ks=(1, 5, 10), correct=None):
    """sim (Q, C), correct (Q, C) bool: which candidates are right for each query (default: column q for
    query q). R@k = share of queries whose best-scoring right candidate ranks in the top k; a wrong
    candidate tied with it counts against it (pessimistic)."""
    correct = torch.eye(*sim.shape, dtype=torch.bool) if correct is None else correct
    best = sim.masked_fill(~correct, -math.inf).max(dim=1, keepdim=True).values  # (Q, 1)
    rank = ((sim >= best) & ~correct).sum(dim=1)  # (Q,) wrong candidates scoring at least as high
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval(sim, image_of=None, captions=None, ks=(1, 5, 10)):
    """Zero-shot retrieval by COCO's and Flickr30k's protocol (the Karpathy split's, FLAVA's): sim (I, T) =
    image_emb @ text_emb.T over I distinct images and T captions, image_of (T,) the image of each caption
    (default: caption t is image t's only one). Image -> text hits when any of the image's captions is in the
    top k, text -> image when the caption's one image is. Given the caption strings, a caption identical to
    one of an image's own is right for that image too (repeated captions score exactly alike)."""
    I, T = sim.shape
    image_of = torch.arange(T) if image_of is None else image_of
    own = image_of[None, :] == torch.arange(I)[:, None]  # (I, T)
    correct = own
    if captions is not None:
        ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
        text = torch.tensor([ids[c] for c in captions])  # (T,) one id per distinct string
        said = torch.zeros(I, len(ids), dtype=torch.bool)
        said[image_of, text] = True  # (I, U): image i has a caption saying u
        correct = said[:, text]  # (I, T)
    i2t, t2i = recall_at_k(sim, ks, correct), recall_at_k(sim.T, ks, own.T)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def class_embeddings(model, tokenizer, class_names, templates, device, autocast):
    """CLIP's prompt ensemble: mean of the normalised template embeddings, re-normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = text_features(model, tokenizer, prompts, device, autocast)[1].view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (classes, E)


def split_of(n, shares=(0.6, 0.2)):
    """Head train (0) / val (1) / test (2) by position: no scene of a consecutive run is in two splits."""
    return torch.tensor([0 if i < shares[0] * n else 1 if i < sum(shares) * n else 2 for i in range(n)])


def fit_head(x, y, split, decays=(1e-4, 1e-3, 1e-2, 1e-1), steps=300, lr=0.02):
    """Multinomial logistic regression on frozen features x (n, F) with labels y (n,) and split (n,) in
    {0 train, 1 val, 2 test}: full-batch Adam in fp32 on standardised features, one model per L2 strength,
    all trained side by side; the best on validation is kept. Returns the test rows' correctness (n_test,)."""
    x, y, train = x.float(), y.long(), split == 0
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)  # (n, F), train statistics only
    R, C = len(decays), int(y.max()) + 1
    W = torch.zeros(R, x.size(1), C, requires_grad=True)  # (R, F, C): one per strength; convex: zeros will do
    b = torch.zeros(R, 1, C, requires_grad=True)  # (R, 1, C), not decayed
    l2, opt, threads = torch.tensor(decays)[:, None, None], torch.optim.Adam([W, b], lr=lr), torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only wait on a second thread (17x slower on a busy 2-core CPU)
    with torch.enable_grad():
        for _ in range(steps):
            logits = torch.einsum("nf,rfc->rnc", x[train], W) + b  # (R, n_train, C)
            loss = R * F.cross_entropy(logits.flatten(0, 1), y[train].repeat(R)) + (l2 * W**2).sum() / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.set_num_threads(threads)
    pred = (torch.einsum("nf,rfc->rnc", x, W.detach()) + b.detach()).argmax(-1)  # (R, n)
    val = (pred[:, split == 1] == y[split == 1]).float().mean(1)  # (R,)
    return pred[val.argmax(), split == 2] == y[split == 2]


def mean(correct):  # accuracy; NaN when no test row is of the kind asked
    return correct.float().mean().item() if len(correct) else float("nan")


# ---------------------------------------------------------------------------------------------
# The suite, on the val split of the synthetic world and on files
# ---------------------------------------------------------------------------------------------


def render(world, scenes):
    return torch.stack([torch.from_numpy(world.render(s)).permute(2, 0, 1) for s in scenes])  # (n, 3, S, S) uint8


def synthetic_pairs(world, n):
    """n held-out scenes -> their images (n, 3, S, S), captions, and the scenes (for the hard negatives)."""
    scenes = [world.scene("val", FIRST["pairs"] + i) for i in range(n)]
    return render(world, scenes), [world.caption(s, random.Random(f"eval/{i}")) for i, s in enumerate(scenes)], scenes


def synthetic_classification_set(world, per_class=20):
    """per_class one-object scenes of each (colour, shape) class -> images (n, 3, S, S), labels (n,),
    held_out (n,) bool (a combination never shown in training) and the class names."""
    classes = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    labels = torch.arange(len(classes)).repeat_interleave(per_class)  # (n,)
    images = render(world, [world.single("val", j, *cs) for cs in classes for j in range(per_class)])
    held = torch.tensor([classes[k] in world.held_out for k in labels.tolist()])  # (n,)
    return images, labels, held, [f"{c} {s}" for c, s in classes]


def vqa_set(world, n_scenes):
    """Questions read off the scene graphs of n val scenes (shapes.ShapesWorld.questions) -> the scenes, and
    rows (scene position, question, answer index in world.answers(), question type)."""
    scenes = [world.scene("val", FIRST["scenes"] + i) for i in range(n_scenes)]
    answers, rows = world.answers(), []
    for i, scene in enumerate(scenes):
        for q, a in world.questions(scene, random.Random(f"vqa/{i}")):
            rows.append((i, q, answers.index(a), QUESTION_TYPES[" ".join(q.split()[:2])]))
    return scenes, rows


def zero_shot(model, tokenizer, images, labels, held, names, templates, device, autocast, drops=()):
    """Top-1 of the prompt ensemble on the images of classes seen in training, and apart on those of held-out
    ones (held (n,) bool); then with each share of the patches in drops (%) dropped (FLIP's question)."""
    class_emb, results = class_embeddings(model, tokenizer, names, templates, device, autocast), {}
    for drop in (0, *drops):
        emb = image_features(model, images, device, autocast, keep_ratio=1 - drop / 100)[1]  # (n, E)
        correct = (emb @ class_emb.T).argmax(1) == labels  # (n,) nearest class embedding is its own
        results[f"zeroshot_drop{drop}_top1" if drop else "zeroshot_top1"] = mean(correct[~held])
        if not drop and held.any():
            results["zeroshot_heldout_top1"] = mean(correct[held])
    return results


def quick_eval(model, tokenizer, world, device, autocast, n_pairs=1000, per_class=20):
    """Zero-shot classification and retrieval on the synthetic world: the check train.py runs during and
    after training. A run on files has no held-out set here (its files are its training data): {}."""
    model.eval()
    if world is None:
        return {}
    results = zero_shot(model, tokenizer, *synthetic_classification_set(world, per_class), world.prompt_templates,
                        device, autocast)
    if n_pairs:
        images, captions, _ = synthetic_pairs(world, n_pairs)
        sim = image_features(model, images, device, autocast)[1] @ text_features(model, tokenizer, captions, device,
                                                                                 autocast)[1].T  # (n, n)
        results.update(retrieval(sim, captions=captions), retrieval_pairs=n_pairs)
    return results


def evaluate(model, image_tokenizer, tokenizer, world, device, autocast, n_pairs=1000, per_class=20, n_probe=2000,
             pairs=None, classes=None, texts=None, prompts=data.PROMPTS, mask_ratio=0.383):
    """The whole suite -> (results, shown): numbers under stable keys, and what the figures draw. Files
    replace the synthetic data of the tasks they feed: pairs (manifests.FilePairs) retrieval, ITM and the image tokenizer
    check; classes (manifests.ImageFolder) zero-shot, FLIP's question and an image-class probe; texts
    (manifests.TextFile of 'label<TAB>text') a language probe. The rest runs when the checkpoint has a world."""
    model.eval()

    def frozen(fn, *args, **kwargs):  # a frozen pass of this model
        return fn(model, *args, device=device, autocast=autocast, **kwargs)

    results, shown, skipped = {}, {}, 0
    if pairs is not None or world is not None:  # with neither (e.g. only --classes): no paired task
        results, shown, skipped = paired_tasks(frozen, image_tokenizer, tokenizer, world, pairs, n_pairs, mask_ratio)
    if classes is not None:
        found, skipped_images, zs_images = file_classification(frozen, tokenizer, classes, prompts, n_probe)
        results, skipped = results | found, skipped + skipped_images
        shown.setdefault("images", zs_images)  # what the tokenizer check and the figures use without pairs
    elif world is not None:
        results |= frozen(zero_shot, tokenizer, *synthetic_classification_set(world, per_class), world.prompt_templates,
                       drops=DROPS)
    if texts is not None:
        lines, labels = heldout.labelled_texts(texts)
        pick = heldout.subset(len(lines), n_probe)
        cls = frozen(text_features, tokenizer, [lines[i] for i in pick])[0]  # (n, D)
        results["probe_text_label"] = mean(fit_head(cls, labels[pick], split_of(len(pick))))
    if world is not None:
        results |= synthetic_probes(frozen, tokenizer, world, n_probe)
    # ---- the image tokenizer: reconstruction from the hard codes beside the mean image, code use ------------
    if "images" in shown:
        results |= tokenizer_health(image_tokenizer, shown["images"].to(device).float() / 255, model.cfg.codebook_size)
    results["skipped_files"] = skipped
    return results, shown


def paired_tasks(frozen, image_tokenizer, tokenizer, world, pairs, n_pairs, mask_ratio):
    """Retrieval, ITM and the fusion's masked predictions on held-out pairs (files, or the world's val scenes)
    -> (results, shown, skipped files)."""
    skipped, scenes = 0, []
    if pairs is not None:  # rows sharing an image file are one image with several captions (COCO, Flickr30k)
        images, captions, image_of, skipped = heldout.retrieval_set(pairs, n_pairs)
        skipped += pairs.num_skipped
    else:
        images, captions, scenes = synthetic_pairs(world, n_pairs)
        image_of = torch.arange(len(captions))
    sim = frozen(image_features, images)[1] @ frozen(text_features, tokenizer, captions)[1].T  # (I, T)
    results = {**retrieval(sim, image_of, captions), "retrieval_pairs": len(captions),
               "retrieval_images": len(images)}
    first = dict(zip(reversed(image_of.tolist()), reversed(captions)))  # image -> its first caption
    one_each = [first[i] for i in range(len(images))]  # ITM and fusion: one pair per image
    results |= frozen(itm_metrics, tokenizer, images, one_each, scenes, world)
    if image_tokenizer is not None:
        results |= frozen(fusion_metrics, image_tokenizer, tokenizer, None if pairs is not None else world, images, one_each,
                       scenes, mask_ratio)
    return results, {"images": images, "captions": captions, "sim": sim, "image_of": image_of}, skipped


def file_classification(frozen, tokenizer, classes, prompts, n_probe):
    """Zero-shot classification (and FLIP's dropped-patch question) on an image folder, and a linear probe on
    its frozen [CLS_I] -> (results, skipped files, the images read)."""
    images, good, skipped = heldout.read_files(classes, heldout.subset(len(classes), n_probe))
    labels = torch.tensor([s["label"] for _, s in good])
    results = frozen(zero_shot, tokenizer, images, labels, torch.zeros(len(labels), dtype=torch.bool), classes.classes,
                  prompts, drops=DROPS)
    cls = frozen(image_features, images)[0]  # (n, D)
    results["probe_image_class"] = mean(fit_head(cls, labels, split_of(len(labels))))
    return results, skipped, images


def synthetic_probes(frozen, tokenizer, world, n_probe):
    """Vision probes on [CLS_I] (shape, colour, object count), language probes on [CLS_T] (object count, the
    stated relation) and VQA on [CLS_M] beside image-only and text-only heads, on the world's val scenes."""
    results, split = {}, split_of(n_probe)
    every = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    singles = [world.single("val", FIRST["singles"] + j, *random.Random(f"single/{j}").choice(every))
               for j in range(n_probe)]
    cls = frozen(image_features, render(world, singles))[0]  # (n, D)
    for what, vocab in (("shape", world.SHAPES), ("colour", world.COLOURS)):
        y = torch.tensor([vocab.index(s["objects"][0][what]) for s in singles])
        results[f"probe_image_{what}"] = mean(fit_head(cls, y, split))
    scenes, rows = vqa_set(world, n_probe)
    scene_images = render(world, scenes)
    cls_i = frozen(image_features, scene_images)[0]  # (n, D)
    y = torch.tensor([len(s["objects"]) - 1 for s in scenes])
    results["probe_image_count"] = mean(fit_head(cls_i, y, split))
    scenes = [world.scene("val", FIRST["captions"] + i) for i in range(n_probe)]
    lines = [world.caption(s, random.Random(f"probe/{i}")) for i, s in enumerate(scenes)]
    cls_t = frozen(text_features, tokenizer, lines)[0]  # (n, D)
    y = torch.tensor([len(s["objects"]) - 1 for s in scenes])
    results["probe_text_count"] = mean(fit_head(cls_t, y, split))
    multi = y > 0  # the relation a caption states, or none ("and"), among captions of 2+ objects
    y = torch.tensor([next((k for k, r in enumerate(world.RELATIONS) if r in c), 4) for c in lines])  # 4: none
    results["probe_text_relation"] = mean(fit_head(cls_t[multi], y[multi], split[multi]))
    return results | vqa_heads(frozen, tokenizer, scene_images, cls_i, rows, split)


def vqa_heads(frozen, tokenizer, scene_images, cls_i, rows, split):
    """VQA: a linear head on frozen [CLS_M] of (image, question), and the same on the image's [CLS_I] alone and
    the question's [CLS_T] alone, so that what fusion adds shows; overall and by kind of question."""
    results = {}
    at = torch.tensor([r[0] for r in rows])  # (q,) each question's scene
    questions, y, kinds = [r[1] for r in rows], torch.tensor([r[2] for r in rows]), [r[3] for r in rows]
    inputs = {"multimodal": frozen(fused_features, tokenizer, scene_images, at, questions)[0],
              "image_only": cls_i[at], "text_only": frozen(text_features, tokenizer, questions)[0]}
    test_kinds = [k for k, s in zip(kinds, split[at].tolist()) if s == 2]
    for name, x in inputs.items():
        correct = fit_head(x, y, split[at])
        results[f"vqa_{name}"] = mean(correct)
        for kind in QUESTION_TYPES.values():
            results[f"vqa_{name}_{kind}"] = mean(correct[torch.tensor([k == kind for k in test_kinds])])
    return results


def tokenizer_health(image_tokenizer, x, codebook_size):
    """The image tokenizer on images x (n, 3, S, S) in [0, 1]: hard-code reconstruction error (when it has a
    decoder: DALL-E's published encoder has none), codebook perplexity and share of codes used."""
    if image_tokenizer is None:
        print("no image tokenizer in this checkpoint: no codebook statistics")
        return {}
    codes = image_tokenizer.codebook_indices(x)  # (n, P)
    stats, results = codebook_stats(codes, codebook_size), {}
    if hasattr(image_tokenizer, "decode_indices"):  # the error of the hard codes beside that of always drawing the mean image
        results["codebook_recon_mse"] = F.mse_loss(image_tokenizer.decode_indices(codes), x).item()
        results["codebook_mean_image_mse"] = F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    else:
        print("the image tokenizer (DALL-E's encoder, as published) has no decoder: no reconstruction error")
    return {**results, "codebook_perplexity": stats["perplexity"], "codebook_codes_used": stats["used"]}

# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def format_table(results) -> str:
    rows = [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])


def main(argv=None):
    args = heldout.parse_args(argv, __doc__)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    try:
        t0, device = time.time(), distributed.pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"eval.py: {e}") from None
    dtype = distributed.resolve_dtype("auto", device)  # as training's default: fp16 on CUDA, bf16 on a CPU with bf16
    autocast = distributed.autocast(device, dtype)  # the probe heads train in fp32
    ckpt, model, tokenizer, image_tokenizer, world, pairs, classes, texts, prompts = heldout.open_inputs(args, device)
    mask_ratio = ckpt.get("loss_cfg", {}).get("mask_ratio", 0.383)
    results, shown = evaluate(model, image_tokenizer, tokenizer, world, device, autocast, args.n_pairs, args.per_class,
                              args.n_probe, pairs, classes, texts, prompts, mask_ratio)
    ckpt_dir = os.path.dirname(os.path.abspath(args.ckpt)) if args.ckpt else ""  # --hf: out/ by default
    os.makedirs(out_dir := args.out_dir or ckpt_dir or "out", exist_ok=True)
    log = os.path.join(ckpt_dir, "log.jsonl") if ckpt_dir else ""
    drawn = [] if args.skip_figures else figures.write_figures(out_dir, model, image_tokenizer, shown, log, mask_ratio,
                                                               device)
    results.update(step=ckpt["step"], eval_seconds=round(time.time() - t0, 1))
    path = os.path.join(out_dir, "eval.json")
    try:  # the training run's own timings, written there by train.py, stay beside the suite's figures
        with open(path) as f:
            results.update({k: v for k, v in json.load(f).items() if k in ("train_seconds", "wall_seconds")})
    except (OSError, ValueError, AttributeError):
        pass
    with open(path, "w") as f:
        json.dump({k: None if v != v else v for k, v in results.items()}, f, indent=1)  # NaN (no test rows): null
    print(format_table(results))
    print("\n".join(f"wrote {p}" for p in [path, *drawn]))


if __name__ == "__main__":
    main()

