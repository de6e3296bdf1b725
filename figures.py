"""The figures of an evaluation, drawn with PIL alone: retrieval results, what masking hides, the image
tokenizer's reconstructions, and the loss curves of log.jsonl.

Companion of eval.py (`python eval.py --ckpt out/ckpt.pt` writes them beside eval.json; --skip_figures does not).
Exercise it with `python -m pytest tests/test_eval.py -k whole_suite`.
"""
import json
import math
import os
import textwrap

import torch
from PIL import Image, ImageDraw

import masking


def tiles(images, cols, scale=2, frames=None, row_texts=(), title="", pad=6):
    """uint8 (n, 3, S, S) -> one PIL image: tiles row-major, enlarged, optionally framed in a colour, with a
    title above and a text left of each row."""
    S, left, top = images.shape[-1] * scale, 230 if row_texts else 0, 24 if title else 0
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (left + cols * (S + pad) + pad, top + rows * (S + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill="black")
    for r, text in enumerate(row_texts):
        draw.multiline_text((pad, top + pad + r * (S + pad)), "\n".join(textwrap.wrap(text, 32)), fill="black")
    for k, image in enumerate(images):
        x, y = left + pad + (k % cols) * (S + pad), top + pad + (k // cols) * (S + pad)
        if frames:
            draw.rectangle([x - 3, y - 3, x + S + 2, y + S + 2], outline=frames[k], width=3)
        canvas.paste(Image.fromarray(image.permute(1, 2, 0).numpy()).resize((S, S), Image.NEAREST), (x, y))
    return canvas


def hide(image, hidden, patch, fill):
    """uint8 (3, S, S) with the patches where hidden (P,) is True painted in fill (r, g, b)."""
    G = image.shape[-1] // patch
    pixels = hidden.view(G, G).repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # (S, S)
    return torch.where(pixels, torch.tensor(fill, dtype=torch.uint8)[:, None, None], image)  # (3, S, S)


def loss_curves(log_path, W=280, H=150, m=28):
    """A panel per quantity of log.jsonl against the step, titled with its first and last value."""
    rows = []
    for line in open(log_path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a crash
            pass
    series = {}
    for key in ("total", "gc", "itm", "mmm_image", "mmm_text", "mim", "mlm", "recon", "zeroshot_top1"):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        series.update({key: pts} if len(pts) > 1 else {})
    if not series:
        return None
    canvas = Image.new("RGB", (3 * W, math.ceil(len(series) / 3) * H), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (key, pts) in enumerate(series.items()):
        x0, y0, w, h = k % 3 * W + m, k // 3 * H + m, W - 2 * m, H - 2 * m  # the plot's box
        (s0, v0), (s1, v1) = [min(p) for p in zip(*pts)], [max(p) for p in zip(*pts)]
        draw.rectangle([x0, y0, x0 + w, y0 + h], outline="grey")
        draw.line([(x0 + w * (s - s0) / max(s1 - s0, 1e-9), y0 + h * (v1 - v) / max(v1 - v0, 1e-9)) for s, v in pts],
                  fill=(40, 80, 220), width=2)
        draw.text((x0, y0 - 20), f"{key}: {pts[0][1]:.3g} -> {pts[-1][1]:.3g} (range {v0:.3g}-{v1:.3g})", fill="black")
        draw.text((x0, y0 + h + 4), f"steps {s0} - {s1}", fill="grey")
    return canvas


@torch.no_grad()
def write_figures(out_dir, model, image_tokenizer, shown, log_path="", mask_ratio=0.383, device="cpu"):
    """retrieval.png, masks.png, image_tokenizer.png and (with a log) loss_curves.png in out_dir -> their paths."""
    images, cfg, figures = shown["images"], model.cfg, {}
    if "sim" in shown:  # text -> image retrieval: captions beside their top-5 images, the true one framed green
        captions, sim, true = shown["captions"], shown["sim"], shown["image_of"].tolist()
        queries = range(min(4, len(captions)))
        top = [sim[:, q].topk(min(5, len(images))).indices for q in queries]  # each (5,)
        rank = [int((sim[:, q] >= sim[true[q], q]).sum()) for q in queries]  # ties count against, as in recall_at_k
        figures["retrieval.png"] = tiles(images[torch.cat(top)], len(top[0]), row_texts=[
            f"{captions[q]} (true image: rank {rank[q]})" for q in queries],
            frames=[(40, 160, 60) if i == true[q] else (200, 200, 200) for q in queries for i in top[q].tolist()])
    # what the model sees: BEiT's block mask (MIM / MMM, grey) and FLIP's 50% drop (contrastive pass, black)
    gen, shows = torch.Generator().manual_seed(0), []
    for image in images[:3]:
        masked = masking.block_mask(1, cfg.grid, round(mask_ratio * cfg.num_patches), generator=gen)[0]  # (P,)
        dropped = torch.ones(cfg.num_patches, dtype=torch.bool)
        dropped[masking.random_keep(1, cfg.num_patches, 0.5, generator=gen)[0]] = False  # (P,) True = dropped
        shows += [image, hide(image, masked, cfg.patch_size, (128,) * 3), hide(image, dropped, cfg.patch_size, (0,) * 3)]
    figures["masks.png"] = tiles(torch.stack(shows), 3, scale=3, title="input | BEiT block mask | FLIP 50% drop")
    # the image tokenizer: inputs above their reconstructions from the hard codes
    if hasattr(image_tokenizer, "decode_indices"):
        x = images[:8].to(device).float() / 255  # (8, 3, S, S)
        recon = (image_tokenizer.decode_indices(image_tokenizer.codebook_indices(x)) * 255).round().byte().cpu()  # (8, 3, S, S)
        figures["image_tokenizer.png"] = tiles(torch.cat([images[:8], recon]), len(x),
                                    title="inputs, and their image-tokenizer reconstructions")
    else:
        print("image_tokenizer.png not drawn: no image tokenizer with a decoder (DALL-E's published encoder has none)")
    figures["loss_curves.png"] = loss_curves(log_path) if log_path and os.path.exists(log_path) else None
    figures = {os.path.join(out_dir, name): picture for name, picture in figures.items() if picture is not None}
    for path, picture in figures.items():
        picture.save(path)
    return list(figures)
