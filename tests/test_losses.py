"""Tests for losses.py: losses with known values, masked CE, the image tokenizer loss, and the FLAVA step
(initial losses, ITM negatives, matched-only MMM, a model that overfits one batch).

    python -m pytest tests/test_losses.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

import losses
import masking
from losses import IGNORE_INDEX, FLAVALoss, LossConfig, contrastive_loss, masked_ce, masked_prediction
from model import KMeansTokenizer, FLAVA, LOGIT_SCALE_MAX, ModelConfig

CLS, SEP, PAD, MASK = 2, 3, 0, 4
SPECIALS = (0, 1, 2, 3, 4)


def make_batch(cfg, B, seed=0, min_len=4):
    """uint8 images and [CLS] words [SEP] [PAD]... captions, as data.collate delivers them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    L = cfg.text_len
    ids = torch.randint(len(SPECIALS), cfg.vocab_size, (B, L), generator=g)
    lens = torch.randint(min_len, L + 1, (B,), generator=g)
    attn = torch.arange(L)[None] < lens[:, None]  # (B, L)
    ids[:, 0] = CLS
    ids[torch.arange(B), lens - 1] = SEP
    ids[~attn] = PAD
    return {"image": images, "ids": ids, "attn": attn}


def make_loss(cfg, seed=0, **loss_kw):
    torch.manual_seed(seed)
    model, image_tokenizer = FLAVA(cfg), KMeansTokenizer(cfg)
    with torch.no_grad():  # random codes in pixel space, so that random images get varied codes
        image_tokenizer.codebook.uniform_()
    loss_kw.setdefault("masked_pass_share", 1.0)  # the paper's step: every pair also takes the masked pass
    return FLAVALoss(model, image_tokenizer, LossConfig(**loss_kw), mask_id=MASK, special_ids=SPECIALS)


def reference_clip_loss(img, txt, scale):
    """CLIP's loss written from the paper: symmetric CE over the full B x B similarity matrix."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.size(0))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------------
# contrastive loss


def test_contrastive_loss_is_ln_b_for_identical_embeddings():
    """If every embedding is the same, every logit ties: the loss is exactly ln(B), at any scale."""
    for B in (2, 8, 33):
        e = F.normalize(torch.randn(1, 16), dim=-1).expand(B, 16)
        for s in (0.0, 2.0, LOGIT_SCALE_MAX):
            assert contrastive_loss(e, e, torch.tensor(s)).item() == pytest.approx(math.log(B), abs=1e-5)


def test_contrastive_loss_near_zero_for_aligned_orthogonal_pairs():
    """Image i = text i, pairs orthogonal: at scale 100 (logit_scale = ln 100) the loss is ln(1 + (B-1) e^-100) ~ 0."""
    B = 8
    e = torch.eye(B, 16)
    assert contrastive_loss(e, e, torch.tensor(math.log(100))).item() < 1e-6
    # At scale 1 the same pairs give ln(1 + (B-1)/e) -- the scale really multiplies the logits.
    assert contrastive_loss(e, e, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + (B - 1) / math.e), rel=1e-5)


def test_contrastive_loss_matches_clip_formula_forward_and_backward():
    """On random embeddings the loss and its gradients (embeddings and logit_scale) equal CLIP's formula."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    ls = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    ours = contrastive_loss(img, txt, ls)
    ours.backward()
    g_ours = [t.grad.clone() for t in (img, txt, ls)]
    for t in (img, txt, ls):
        t.grad = None
    ref = reference_clip_loss(img.float(), txt.float(), ls.float().exp())  # the loss itself runs in fp32
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, t in zip(g_ours, (img, txt, ls)):
        torch.testing.assert_close(a, t.grad, atol=1e-6, rtol=1e-5)


def test_contrastive_loss_clamps_logit_scale():
    """A logit_scale above ln 100 behaves exactly as ln 100 (and below 0 as 0); the clamp passes no gradient."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    at_max = contrastive_loss(img, txt, torch.tensor(LOGIT_SCALE_MAX))
    high = torch.tensor(6.0, requires_grad=True)
    above = contrastive_loss(img, txt, high)
    assert above.item() == pytest.approx(at_max.item(), rel=1e-6)
    assert at_max.item() == pytest.approx(reference_clip_loss(img, txt, 100.0).item(), rel=1e-5)
    above.backward()
    assert high.grad.item() == 0.0
    assert contrastive_loss(img, txt, torch.tensor(-2.0)).item() == pytest.approx(
        reference_clip_loss(img, txt, 1.0).item(), rel=1e-5)


def test_contrastive_loss_runs_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the logits and softmax stay fp32 (bf16 spaces numbers near 100 by 0.5: logits at
    scale 100 would lose their differences): same value as without autocast."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(16, 32), dim=-1), F.normalize(torch.randn(16, 32), dim=-1)
    ls = torch.tensor(LOGIT_SCALE_MAX)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = contrastive_loss(img, txt, ls)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(contrastive_loss(img, txt, ls).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# masked prediction, codebook stats


def test_masked_ce_zero_when_nothing_masked_and_equal_to_cross_entropy_otherwise():
    """masked_ce is 0 (not NaN, finite zero gradient) without targets, and F.cross_entropy(ignore_index) with them."""
    logits = torch.randn(3, 7, 11, requires_grad=True)
    none = torch.full((3, 7), IGNORE_INDEX)
    loss = masked_ce(logits, none)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    labels = none.clone()
    labels[0, 2], labels[1, 0], labels[1, 6], labels[2, 3] = 4, 10, 0, 7
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert masked_ce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_prediction_equals_head_on_every_position():
    """Selecting the labelled positions first changes nothing: same loss and gradients as the head everywhere."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 13))
    states = torch.randn(4, 10, 8, requires_grad=True)
    labels = torch.full((4, 10), IGNORE_INDEX)
    labels[0, [1, 5, 9]] = torch.tensor([3, 12, 0])
    labels[1, [0]] = 7
    labels[3, [2, 3, 4, 8]] = torch.tensor([1, 1, 2, 5])  # row 2 has none
    ours = masked_prediction(head, states, labels, k=4)
    ours.backward()
    g_ours = states.grad.clone()
    states.grad = None
    ref = F.cross_entropy(head(states).reshape(-1, 13), labels.flatten(), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, states.grad)
    assert masked_prediction(head, states, torch.full((4, 10), IGNORE_INDEX), k=4).item() == 0.0


def test_codebook_stats_on_known_codes():
    """Perplexity = exp(entropy of the code histogram): C for even use, 2 for two equal codes, 1 for one."""
    s = losses.codebook_stats(torch.arange(8).repeat(3), 8)
    assert s["used"] == 1.0 and s["perplexity"] == pytest.approx(8.0)
    s = losses.codebook_stats(torch.tensor([[0, 0, 5, 5]]), 8)
    assert s["used"] == pytest.approx(2 / 8) and s["perplexity"] == pytest.approx(2.0)
    s = losses.codebook_stats(torch.full((4, 4), 3), 8)
    assert s["used"] == pytest.approx(1 / 8) and s["perplexity"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# the FLAVA step

# A 64 px / 8 x 8 grid model, width 64, with V and C far apart (ln 1000 = 6.91, ln 64 = 4.16) so a head
# or vocabulary mix-up moves a loss by far more than the tolerance.
INIT_CFG = dict(width=64, heads=2, image_layers=2, text_layers=2, mm_layers=1, vocab_size=1000, codebook_size=64,
                embed_dim=128, text_len=24)


def test_initial_losses_of_a_random_model():
    """A random model predicts uniformly: MLM / MMM-text ~ ln V, MIM / MMM-image ~ ln C, ITM ~ ln 2, GC ~ ln B.

    GC sits a little above ln B at init: the text embeddings are nearly identical, but [CLS_I] starts at
    zero, so each image embedding is a near-random direction and the text->image rows are not flat."""
    cfg = ModelConfig.from_preset("tiny", **INIT_CFG)
    loss_fn = make_loss(cfg)
    B = 16
    batch = make_batch(cfg, B)
    ln_v, ln_c, ln_b = math.log(cfg.vocab_size), math.log(cfg.codebook_size), math.log(B)
    with torch.no_grad():
        pairs, images, texts = (loss_fn(source, batch, seed=1) for source in ("pairs", "images", "texts"))
    assert set(pairs) == {"gc", "itm", "mmm_image", "mmm_text", "total"}
    assert set(images) == {"mim", "total"} and set(texts) == {"mlm", "total"}
    assert texts["mlm"].item() == pytest.approx(ln_v, abs=0.2)
    assert pairs["mmm_text"].item() == pytest.approx(ln_v, abs=0.2)
    assert images["mim"].item() == pytest.approx(ln_c, abs=0.3)
    assert pairs["mmm_image"].item() == pytest.approx(ln_c, abs=0.3)
    assert pairs["itm"].item() == pytest.approx(math.log(2), abs=0.05)
    assert ln_b - 0.05 < pairs["gc"].item() < 1.25 * ln_b
    for out in (pairs, images, texts):
        assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())


def test_total_is_the_weighted_sum_and_the_step_is_a_function_of_the_seed(tiny_cfg):
    """total = sum of weight x loss; the same seed draws the same masks (same losses), another seed others."""
    weights = dict(gc_weight=0.5, itm_weight=2.0, mmm_image_weight=0.25, mmm_text_weight=3.0, mim_weight=0.7,
                   mlm_weight=1.5)
    loss_fn = make_loss(tiny_cfg, **weights)
    batch = make_batch(tiny_cfg, 4)
    with torch.no_grad():
        for source in ("pairs", "images", "texts"):
            out = loss_fn(source, batch, seed=3)
            expected = sum(weights[f"{name}_weight"] * out[name] for name in out if name != "total")
            assert out["total"].item() == pytest.approx(expected.item(), rel=1e-6)
            again = loss_fn(source, batch, seed=3)
            assert all(torch.equal(out[k], again[k]) for k in out)
            assert any(not torch.equal(out[k], v) for k, v in loss_fn(source, batch, seed=4).items())
        with pytest.raises(ValueError):
            loss_fn("video", batch, seed=0)


def test_loss_config_validation():
    """Ratios outside their ranges and an unknown backprop mode are rejected by name."""
    for kw, name in ((dict(keep_ratio=0.0), "keep_ratio"), (dict(mask_ratio=1.0), "mask_ratio"),
                     (dict(mlm_prob=0.0), "mlm_prob"), (dict(itm_neg_prob=1.0), "itm_neg_prob"),
                     (dict(backprop="half"), "backprop")):
        with pytest.raises(ValueError, match=name):
            LossConfig(**kw)


class Spy:
    """Wraps a function, records its arguments and results, calls through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def arg(call, pos, name):
    """Argument `name` of a recorded call, given by position or keyword."""
    args, kwargs, _ = call
    return args[pos] if len(args) > pos else kwargs.get(name)


def run_pairs_with_spies(monkeypatch, loss_fn, batch, seed):
    """Run a paired step, recording ITM labels, the captions given to the masked pass, the MMM labels and the
    encoder calls (losses.py looks these names up at call time)."""
    spies = {name: Spy(getattr(losses, name)) for name in ("itm_loss", "masked_prediction")}
    for name, spy in spies.items():
        monkeypatch.setattr(losses, name, spy)
    spies["text_mask"] = Spy(masking.text_mask)
    monkeypatch.setattr(masking, "text_mask", spies["text_mask"])
    model = loss_fn.model
    for name in ("encode_image", "encode_multimodal"):
        spies[name] = Spy(getattr(model, name))
        monkeypatch.setattr(model, name, spies[name])
    with torch.no_grad():
        out = loss_fn("pairs", batch, seed)
    return out, spies


def test_itm_negatives_only_where_the_caption_really_differs(tiny_cfg, monkeypatch):
    """With itm_neg_prob 0.99 nearly every row is swapped, yet label 0 appears only where the partner's caption
    differs; identical captions give no negatives at all. Swapped rows carry another row's caption and mask."""
    loss_fn = make_loss(tiny_cfg, itm_neg_prob=0.99, masked_pass="joint")
    B = 8
    batch = make_batch(tiny_cfg, B, seed=1)
    batch["ids"][: B // 2] = batch["ids"][0]  # rows 0-3 share one caption, rows 4-7 have their own
    batch["attn"][: B // 2] = batch["attn"][0]
    n_neg = 0
    for seed in range(6):
        _, spies = run_pairs_with_spies(monkeypatch, loss_fn, batch, seed)
        itm_labels = spies["itm_loss"].calls[-1][0][1]  # (B,) 1 = matched
        mm_ids = spies["text_mask"].calls[-1][0][0]  # the captions of the masked pass, before masking
        for i in range(B):
            if itm_labels[i] == 0:
                assert not torch.equal(mm_ids[i], batch["ids"][i])
                assert any(torch.equal(mm_ids[i], batch["ids"][j]) for j in range(B) if j != i)
            else:
                assert torch.equal(mm_ids[i], batch["ids"][i])
        n_neg += int((itm_labels == 0).sum())
        monkeypatch.undo()
    assert n_neg >= 0.6 * 6 * B  # rows 4-7 always differ from their partner; rows 0-3 only if it is in 4-7
    same = {**batch, "ids": batch["ids"][:1].expand(B, -1).clone(), "attn": batch["attn"][:1].expand(B, -1).clone()}
    for seed in range(3):
        _, spies = run_pairs_with_spies(monkeypatch, loss_fn, same, seed)
        assert (spies["itm_loss"].calls[-1][0][1] == 1).all()  # every swap is a no-op: no false negatives
        monkeypatch.undo()


def test_mmm_learns_only_from_matched_pairs(tiny_cfg, monkeypatch):
    """MMM targets exist only in matched rows: there they are the image tokenizer codes of the masked patches and the
    original ids of the masked words; the fusion reads the *pre-LN* states of the masked pass."""
    loss_fn = make_loss(tiny_cfg, itm_neg_prob=0.5, masked_pass="joint")  # FLAVA's one masked pass
    B, P, L = 8, tiny_cfg.num_patches, tiny_cfg.text_len
    batch = make_batch(tiny_cfg, B, seed=2)
    model = loss_fn.model
    codes = loss_fn.image_tokenizer.codebook_indices(batch["image"].float() / 255)  # (B, P)
    seen_both = set()
    for seed in range(4):
        _, spies = run_pairs_with_spies(monkeypatch, loss_fn, batch, seed)
        matched = spies["itm_loss"].calls[-1][0][1].bool()  # (B,)
        seen_both |= set(matched.tolist())
        calls = {id(c[0][0]): c for c in spies["masked_prediction"].calls}
        image_call, text_call = calls[id(model.mmm_image_head)], calls[id(model.mmm_text_head)]
        (masked_img_call,) = [c for c in spies["encode_image"].calls if arg(c, 1, "patch_masked") is not None]
        patch_masked = arg(masked_img_call, 1, "patch_masked")  # (B, P), the BEiT pass
        image_labels = image_call[0][2]  # (B, P)
        expected = torch.where(patch_masked & matched[:, None], codes, IGNORE_INDEX)
        assert torch.equal(image_labels, expected)
        text_labels = text_call[0][2]  # (B, L)
        _, raw_labels = spies["text_mask"].calls[-1][2]
        assert torch.equal(text_labels, torch.where(matched[:, None], raw_labels, IGNORE_INDEX))
        assert (text_labels[~matched] == IGNORE_INDEX).all() and (image_labels[~matched] == IGNORE_INDEX).all()
        assert ((text_labels != IGNORE_INDEX).sum(1)[matched] >= 1).all()
        # The fusion gets the pre-LN image states of the masked pass; the heads read patches at 2 .. 1 + P
        # and the text at the last L positions of its output (the index map).
        mm_args, _, mm_out = spies["encode_multimodal"].calls[-1]
        assert mm_args[0] is masked_img_call[2][0]
        assert torch.equal(image_call[0][1], mm_out[:, 2 : 2 + P]) and torch.equal(text_call[0][1], mm_out[:, -L:])
        monkeypatch.undo()
    assert seen_both == {True, False}


def test_unimodal_heads_read_the_right_positions(tiny_cfg, monkeypatch):
    """MIM reads the final-LN patch tokens 1 .. P (not [CLS_I]) with the image tokenizer codes of masked patches as targets;
    MLM reads every text position with the original ids of the chosen tokens."""
    loss_fn = make_loss(tiny_cfg)
    batch = make_batch(tiny_cfg, 4, seed=4)
    model = loss_fn.model
    spy = Spy(losses.masked_prediction)
    monkeypatch.setattr(losses, "masked_prediction", spy)
    for name in ("encode_image", "encode_text"):
        monkeypatch.setattr(model, name, Spy(getattr(model, name)))
    with torch.no_grad():
        loss_fn("images", batch, seed=0)
        loss_fn("texts", batch, seed=0)
    (img_call, txt_call) = spy.calls
    assert img_call[0][0] is model.mim_head and txt_call[0][0] is model.mlm_head
    enc_img = model.encode_image.calls[-1]
    patch_masked = arg(enc_img, 1, "patch_masked")
    assert torch.equal(img_call[0][1], enc_img[2][1][:, 1:])
    codes = loss_fn.image_tokenizer.codebook_indices(batch["image"].float() / 255)
    assert torch.equal(img_call[0][2], torch.where(patch_masked, codes, IGNORE_INDEX))
    enc_txt = model.encode_text.calls[-1]
    assert torch.equal(txt_call[0][1], enc_txt[2][1])
    labels = txt_call[0][2]
    chosen = labels != IGNORE_INDEX
    assert chosen.any() and torch.equal(labels[chosen], batch["ids"][chosen])
    assert torch.equal(enc_txt[0][1], batch["attn"])  # padding stays masked in the MLM pass


def test_contrastive_rows_are_never_swapped(tiny_cfg):
    """GC is computed on the true pairs: the same seed gives the same gc whatever the ITM negative share."""
    batch = make_batch(tiny_cfg, 6, seed=3)
    with torch.no_grad():
        a = make_loss(tiny_cfg, itm_neg_prob=0.0)("pairs", batch, seed=5)
        b = make_loss(tiny_cfg, itm_neg_prob=0.99)("pairs", batch, seed=5)
    assert torch.equal(a["gc"], b["gc"])
    assert not torch.equal(a["itm"], b["itm"])


def test_the_model_overfits_one_small_batch():
    """200 AdamW steps on 8 fixed pairs (fixed masks): total loss falls below 10% of its start and GC near 0."""
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2, image_layers=1, text_layers=1, mm_layers=1,
                                  image_size=16, patch_size=4, vocab_size=64, codebook_size=32,
                                  text_len=12, embed_dim=32)
    loss_fn = make_loss(cfg, keep_ratio=0.5)
    batch = make_batch(cfg, 8, seed=1)
    opt = torch.optim.AdamW(loss_fn.model.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for _ in range(200):
        out = loss_fn("pairs", batch, seed=0)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        loss_fn.model.clamp_logit_scale_()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.1 * first["total"]
    assert last["gc"] < 0.1 and last["mmm_text"] < 0.2
    assert all(math.isfinite(h["total"]) for h in history)


def test_split_masked_pass_predicts_each_masked_modality_from_the_other_whole(tiny_cfg, monkeypatch):
    """masked_pass="split": the BERT-masked judged captions (own, or for ITM negatives another row's) meet the
    contrastive pass's unmasked image states (MMM-text on matched rows, ITM on [CLS_M]); the BEiT-masked image
    meets the contrastive pass's states of its own whole caption (MMM-image on every row, negatives' too)."""
    loss_fn = make_loss(tiny_cfg, itm_neg_prob=0.5, masked_pass="split")
    batch, model, seen = make_batch(tiny_cfg, 8, seed=1), loss_fn.model, set()
    codes = loss_fn.image_tokenizer.codebook_indices(batch["image"].float() / 255)  # (B, P)
    for seed in range(4):
        monkeypatch.setattr(model, "encode_text", Spy(model.encode_text))
        _, spies = run_pairs_with_spies(monkeypatch, loss_fn, batch, seed)
        (plain,) = [c for c in spies["encode_image"].calls if arg(c, 1, "patch_masked") is None]  # contrastive
        (masked,) = [c for c in spies["encode_image"].calls if arg(c, 1, "patch_masked") is not None]
        whole_text, masked_text = model.encode_text.calls  # the contrastive pass, then the masked captions
        text_mm, image_mm = spies["encode_multimodal"].calls
        assert torch.equal(text_mm[0][0], plain[2][0]) and text_mm[0][1] is masked_text[2][0]
        assert image_mm[0][0] is masked[2][0] and torch.equal(image_mm[0][1], whole_text[2][0])
        judged, labels = spies["text_mask"].calls[-1][0][0], spies["itm_loss"].calls[-1][0][1]  # (B, L), (B,)
        for i, label in enumerate(labels.tolist()):  # label 0 exactly where the judged caption is another's
            assert torch.equal(judged[i], batch["ids"][i]) == bool(label)
        calls = {id(c[0][0]): c for c in spies["masked_prediction"].calls}
        image_labels = calls[id(model.mmm_image_head)][0][2]  # (B, P)
        assert torch.equal(image_labels, torch.where(arg(masked, 1, "patch_masked"), codes, IGNORE_INDEX))
        text_labels = calls[id(model.mmm_text_head)][0][2]  # (B, L)
        assert (text_labels[labels == 0] == IGNORE_INDEX).all() and (text_labels[labels == 1] != IGNORE_INDEX).any()
        seen |= set(labels.tolist())
        monkeypatch.undo()
    assert seen == {0, 1}


def test_itm_learns_to_tell_matched_from_mismatched_pairs():
    """ITM (masked_pass="split": the whole image, the masked caption), trained with FLAVA's paired objectives on 8 fixed pairs (fresh swaps and
    masks each step): after 300 AdamW steps a matched pair outscores a mismatched one in at least 90% of the
    comparisons among all 64 (image, caption) combinations (measured: 0.975; chance 0.5). An ITM whose fusion
    cannot see one of its inputs cannot do that. (ITM alone, without GC and
    MMM, stays at ln 2 here: at initialisation the fusion's output barely depends on how image and text
    relate, so ITM's gradient vanishes; MMM-text is what first teaches text tokens to look at the image.)"""
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2, image_layers=1, text_layers=1, mm_layers=2,
                                  image_size=16, patch_size=4, vocab_size=64, codebook_size=32, text_len=12,
                                  embed_dim=32)
    loss_fn = make_loss(cfg, masked_pass="split", itm_neg_prob=0.5)
    batch, model = make_batch(cfg, 8, seed=1), loss_fn.model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(300):
        loss = loss_fn("pairs", batch, seed=step)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        opt.param_groups[0]["lr"] = 2e-3 * (1 - (step + 1) / 300)  # decayed to 0: the last steps settle the scores
    with torch.no_grad():
        image_hidden = model.encode_image(batch["image"].float() / 255)[0]  # (8, N, D)
        text_hidden = model.encode_text(batch["ids"], batch["attn"])[0]  # (8, L, D)
        i, t = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)  # all 64 (image, caption)
        logits = model.itm_head(model.encode_multimodal(image_hidden[i], text_hidden[t], batch["attn"][t])[:, 0])
    score = (logits[:, 1] - logits[:, 0]).view(8, 8)  # (image, caption)
    matched = torch.eye(8, dtype=torch.bool)
    auc = (score[matched][:, None] > score[~matched][None]).float().mean()  # P(a pair outscores a non-pair)
    assert auc >= 0.9, (auc, score)


def test_masked_pass_share_runs_the_masked_pass_on_rows_spread_over_the_batch(monkeypatch):
    """masked_pass_share trades MMM/ITM samples for speed: the contrastive pass still sees the whole batch,
    the masked pass round(fraction * B) rows spread evenly over it (every 4th at 0.25), so that with W ranks
    each holds its share of them, as their global row index, not their rank, decides."""
    cfg = ModelConfig.from_preset("tiny", width=32, heads=2, image_layers=1, text_layers=1, image_size=32,
                                  codebook_size=32, vocab_size=50)
    loss_fn = make_loss(cfg, masked_pass_share=0.25, itm_neg_prob=0.0)
    batch = make_batch(cfg, 16)
    _, spies = run_pairs_with_spies(monkeypatch, loss_fn, batch, seed=0)
    (masked_call,) = [c for c in spies["encode_image"].calls if arg(c, 1, "patch_masked") is not None]
    assert torch.equal(masked_call[0][0], batch["image"][[0, 4, 8, 12]].float() / 255)
    assert torch.equal(spies["text_mask"].calls[-1][0][0], batch["ids"][[0, 4, 8, 12]])
    assert spies["encode_multimodal"].calls[-1][2].size(0) == 4
    with torch.no_grad():
        out = loss_fn("pairs", batch, seed=0)
    assert set(out) == {"gc", "itm", "mmm_image", "mmm_text", "total"} and all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("source, reached", [
    ("pairs", ("image_encoder.", "text_encoder.", "mm_encoder.", "itm_head.", "mmm_image_head.", "mmm_text_head.",
               "image_projection.", "text_projection.", "logit_scale")),
    ("images", ("image_encoder.", "mim_head.")),
    ("texts", ("text_encoder.", "mlm_head.")),
])
def test_which_parameters_each_kind_of_batch_trains(tiny_cfg, source, reached):
    """Every parameter a kind of batch should train gets a non-zero gradient, every other one none: the set
    DDP finds unused each step, and where an accidental detach (or a loss left out of `total`) would show.
    Pairs reach both encoders, the fusion, ITM, both MMM heads, the projections and logit_scale but not the
    MIM / MLM heads; images the image encoder and the MIM head; texts the text encoder and the MLM head."""
    loss_fn = make_loss(tiny_cfg, keep_ratio=0.5, itm_neg_prob=0.5)
    loss_fn(source, make_batch(tiny_cfg, 8, seed=5), seed=2)["total"].backward()
    got = {n for n, p in loss_fn.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in loss_fn.model.named_parameters() if n.startswith(reached)}
    assert got == expected, (sorted(expected - got), sorted(got - expected))
