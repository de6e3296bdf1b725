"""What a trained nanoFLAVA can do: zero-shot retrieval and classification (this file grows
into the full suite: probes, multimodal fine-tuning, masked inference, figures).

FLAVA (arXiv 2112.04482) §4 evaluates zero-shot retrieval with the cosine similarity of the
contrastive embeddings; CLIP (arXiv 2103.00020) §3.1.4 and FLIP §4 classify zero-shot with a
prompt-template ensemble. Inference never drops patches (FLIP Table 1d).

    python eval.py --ckpt out/ckpt.pt
"""
import torch

import data

# ---------------------------------------------------------------------------------------------
# Embeddings and metrics
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(model, images_u8, device, autocast, batch=256):
    """(B, 3, S, S) uint8 -> (B, E) L2-normalised, unmasked."""
    out = []
    for i in range(0, len(images_u8), batch):
        with autocast:
            out.append(model.image_embeddings(images_u8[i : i + batch].to(device).float() / 255).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, device, autocast, batch=512):
    """list of str -> (T, E) L2-normalised."""
    out = []
    for i in range(0, len(texts), batch):
        ids, attn = tokenizer.encode(texts[i : i + batch], model.cfg.text_len)
        with autocast:
            out.append(model.text_embeddings(ids.to(device), attn.to(device)).float())
    return torch.cat(out)


def recall_at_k(sim, ks=(1, 5, 10)):
    """sim (Q, C): query q's true candidate is column q. R@k = share of queries whose true
    candidate ranks in the top k; a tie with the true candidate counts against it (pessimistic)."""
    true = sim.diagonal()[:, None]  # (Q, 1)
    rank = (sim >= true).sum(dim=1) - 1  # (Q,) candidates scoring at least as high, minus itself
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval(image_emb, text_emb, ks=(1, 5, 10)):
    """Zero-shot retrieval among N pairs (FLAVA's COCO / Flickr protocol)."""
    sim = image_emb @ text_emb.T  # (N, N)
    i2t, t2i = recall_at_k(sim, ks), recall_at_k(sim.T, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def class_embeddings(model, tokenizer, class_names, templates, device, autocast):
    """CLIP's prompt ensemble: mean of the normalised template embeddings, re-normalised."""
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = embed_texts(model, tokenizer, prompts, device, autocast).view(len(class_names), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(dim=1), dim=-1)  # (classes, E)


def zero_shot_accuracy(image_emb, labels, class_emb):
    return ((image_emb @ class_emb.T).argmax(dim=1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# The end-of-training evaluation on the synthetic world (train.py calls this)
# ---------------------------------------------------------------------------------------------


def synthetic_classification_set(world, per_class=20, held_out=False):
    """Single-object validation scenes for every (colour, shape) class; with held_out=True only
    the combinations never shown in training (composition)."""
    classes = [(c, s) for c in world.COLOURS for s in world.SHAPES]
    wanted = [cs for cs in classes if (cs in world.held_out) == held_out]
    images, labels = [], []
    for cs in wanted:
        for j in range(per_class):
            images.append(torch.from_numpy(world.render(world.single("val", j, *cs))).permute(2, 0, 1))
            labels.append(classes.index(cs))
    return torch.stack(images), torch.tensor(labels), [f"{c} {s}" for c, s in classes]


def synthetic_pairs(world, n):
    import random

    images, captions = [], []
    for i in range(n):
        scene = world.scene("val", i)
        images.append(torch.from_numpy(world.render(scene)).permute(2, 0, 1))
        captions.append(world.caption(scene, random.Random(f"eval/{i}")))
    return torch.stack(images), captions


def quick_eval(model, tokenizer, world, device, autocast, n_pairs=1000, pairs_manifest="", per_class=20):
    model.eval()
    results = {}
    if world is not None:
        images, labels, names = synthetic_classification_set(world, per_class)
        class_emb = class_embeddings(model, tokenizer, names, world.prompt_templates, device, autocast)
        results["zeroshot_top1"] = zero_shot_accuracy(embed_images(model, images, device, autocast),
                                                      labels.to(device), class_emb)
        images, labels, _ = synthetic_classification_set(world, per_class, held_out=True)
        if len(images) and n_pairs:
            results["zeroshot_heldout_top1"] = zero_shot_accuracy(embed_images(model, images, device, autocast),
                                                                  labels.to(device), class_emb)
        if not n_pairs:
            return results
        images, captions = synthetic_pairs(world, n_pairs)
        results.update(retrieval(embed_images(model, images, device, autocast),
                                 embed_texts(model, tokenizer, captions, device, autocast)))
        results["retrieval_pairs"] = n_pairs
    return results


def format_table(results) -> str:
    rows = [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(["| metric | value |", "| --- | --- |", *rows])
