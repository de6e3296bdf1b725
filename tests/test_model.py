"""Tests for model.py: shapes, config validation, attention parity, padding, BEiT masking and FLIP
dropping inside the image encoder, the multimodal index map, the image tokenizer's grid, FLOPs.

    python -m pytest tests/test_model.py
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import losses
import masking
from flops import flops_per_sample
from model import FLAVA, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, KMeansTokenizer, ModelConfig

CLS, SEP, PAD = 2, 3, 0  # the tokenizer's special ids ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)
SPECIALS = (0, 1, 2, 3, 4)


def rand_images(B, S, seed=0):
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S) in [0, 1]


def rand_text(B, L, V, seed=0, min_len=3):
    """[CLS] words [SEP] [PAD]...: ids (B, L) and attn (B, L) bool, lengths drawn in [min_len, L]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), V, (B, L), generator=g)
    lens = torch.randint(min_len, L + 1, (B,), generator=g)
    lens[0] = min_len  # at least one row with plenty of padding
    attn = torch.arange(L)[None] < lens[:, None]  # (B, L)
    ids[:, 0] = CLS
    ids[torch.arange(B), lens - 1] = SEP
    ids[~attn] = PAD
    return ids, attn


def patch_slices(k, G, p):
    """Pixel rows / cols of patch k in row-major order (the layout of every (B, P) tensor)."""
    r, c = divmod(int(k), G)
    return slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p)


def randomize_zero_inits(model, seed=0):
    """cls / pos / mask tokens start at zero, which would hide any mix-up of them: make them random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.image_encoder.cls_token, model.image_encoder.pos_embed, model.image_encoder.mask_token,
                  model.mm_encoder.cls_token):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def capture_transformer_input(model):
    """Record the token sequence that enters the image encoder's transformer (after embedding)."""
    seen = []
    handle = model.image_encoder.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    return seen, handle


# ---------------------------------------------------------------------------------------------
# shapes


def test_tiny_preset_shapes_of_every_encoder_and_head():
    """Every encoder, head and image-tokenizer output of the real `tiny` preset has its documented shape (M = 1 + N + L)."""
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model, image_tokenizer = FLAVA(cfg).eval(), KMeansTokenizer(cfg).eval()
    B, P, L, D, G = 2, cfg.num_patches, cfg.text_len, cfg.width, cfg.grid
    V, C, E = cfg.vocab_size, cfg.codebook_size, cfg.embed_dim
    images = rand_images(B, cfg.image_size)
    ids, attn = rand_text(B, L, V)
    with torch.no_grad():
        hidden, out = model.encode_image(images)
        assert hidden.shape == out.shape == (B, 1 + P, D)
        assert model.encode_image(images, patch_masked=torch.rand(B, P) < 0.4)[1].shape == (B, 1 + P, D)  # BEiT keeps N
        K = masking.num_kept(P, 0.25)
        kept = model.encode_image(images, keep_idx=masking.random_keep(B, P, 0.25))
        assert kept[0].shape == kept[1].shape == (B, 1 + K, D)  # FLIP shrinks N to 1 + K
        t_hidden, t_out = model.encode_text(ids, attn)
        assert t_hidden.shape == t_out.shape == (B, L, D)
        mm = model.encode_multimodal(hidden, t_hidden, attn)
        assert mm.shape == (B, 1 + (1 + P) + L, D)  # M = 1 + N + L
        assert model.encode_multimodal(kept[0], t_hidden, attn).shape == (B, 1 + (1 + K) + L, D)
        assert model.mim_head(out[:, 1:]).shape == (B, P, C)
        assert model.mlm_head(t_out).shape == (B, L, V)
        assert model.mmm_image_head(mm[:, 2 : 2 + P]).shape == (B, P, C)
        assert model.mmm_text_head(mm[:, -L:]).shape == (B, L, V)
        assert model.itm_head(mm[:, 0]).shape == (B, 2)
        for emb in (model.image_embeddings(images), model.text_embeddings(ids, attn)):
            assert emb.shape == (B, E) and emb.dtype == torch.float32
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(B))
        image_tokenizer.learn(images)
        assert image_tokenizer.codebook.shape == (C, 3 * cfg.patch_size**2)
        codes = image_tokenizer.codebook_indices(images)
        assert codes.shape == (B, P) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < C
        assert image_tokenizer.decode_indices(codes).shape == images.shape


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_base_preset_shapes_and_sizes_on_meta():
    """The paper-sized `base` preset, built and run on the meta device (no memory, no FLOPs): ViT-B/16 sizes, shapes."""
    cfg = ModelConfig.from_preset("base")
    with torch.device("meta"):
        model, image_tokenizer = FLAVA(cfg), KMeansTokenizer(cfg)
    D, P, L = 768, 196, 77
    assert (cfg.grid, cfg.num_patches, cfg.heads, cfg.image_layers, cfg.text_layers, cfg.mm_layers) == (14, P, 12, 12,
                                                                                                      12, 6)
    # One pre-LN block: qkv 3D^2+3D, proj D^2+D, MLP 8D^2+5D, two LayerNorms 4D  ->  12 D^2 + 13 D.
    block = 12 * D * D + 13 * D
    assert _count(model.image_encoder.transformer.blocks[0]) == block
    # timm's vit_base_patch16_224 without its classifier has 85,798,656 parameters; FLAVA adds a mask token.
    assert _count(model.image_encoder) == 85_798_656 + D
    assert _count(model.text_encoder) == 30522 * D + L * D + 2 * D + 12 * block + 2 * D  # words, positions, 2 LNs
    assert _count(model.mm_encoder) == 2 * (D * D + D) + D + 6 * block + 2 * D
    assert model.mim_head.decoder.weight.shape == (8192, D) and model.mlm_head.decoder.weight.shape == (30522, D)
    assert model.image_projection.weight.shape == model.text_projection.weight.shape == (768, D)
    assert model.image_encoder.pos_embed.shape == (1, 1 + P, D)
    B = 2
    images = torch.empty(B, 3, 224, 224, device="meta")
    ids = torch.empty(B, L, dtype=torch.long, device="meta")
    attn = torch.empty(B, L, dtype=torch.bool, device="meta")
    hidden, out = model.encode_image(images)
    t_hidden, _ = model.encode_text(ids, attn)
    mm = model.encode_multimodal(hidden, t_hidden, attn)
    assert hidden.shape == out.shape == (B, 197, D) and t_hidden.shape == (B, L, D)
    assert mm.shape == (B, 1 + 197 + L, D)
    kept = model.encode_image(images, keep_idx=torch.zeros(B, 98, dtype=torch.long, device="meta"))[1]
    assert kept.shape == (B, 1 + 98, D)
    assert model.itm_head(mm[:, 0]).shape == (B, 2) and model.image_embed(out).shape == (B, 768)
    assert image_tokenizer.codebook_indices(images).shape == (B, P)


def test_small_preset_image_encoder_is_vit_s16():
    """`small` is ViT-S/16 sized: timm's vit_small_patch16_224 backbone (21,665,664) plus a mask token."""
    with torch.device("meta"):
        model = FLAVA(ModelConfig.from_preset("small"))
    assert _count(model.image_encoder) == 21_665_664 + 384


# ---------------------------------------------------------------------------------------------
# config validation


@pytest.mark.parametrize("kwargs, names", [
    (dict(image_size=60, patch_size=8), ["image_size", "patch_size"]),
    (dict(width=100, heads=3), ["width", "heads"]),
    (dict(attn="flash"), ["attn"]),
    (dict(stem="resnet"), ["stem"]),
    (dict(text_layers=0), ["text_layers"]),
], ids=["image_vs_patch", "width_vs_heads", "attn", "stem", "depth"])
def test_config_rejects_inconsistent_fields(kwargs, names):
    """A bad config fails at construction with a ValueError that names the offending fields."""
    with pytest.raises(ValueError) as err:
        ModelConfig.from_preset("tiny", **kwargs)
    for name in names:
        assert name in str(err.value)


def test_config_reports_all_problems_and_unknown_names():
    """Several problems are reported together; unknown presets and override fields are named too."""
    with pytest.raises(ValueError) as err:
        ModelConfig(image_size=60, width=100, heads=3)
    assert "image_size" in str(err.value) and "width" in str(err.value)
    with pytest.raises(ValueError, match="gigantic"):
        ModelConfig.from_preset("gigantic")
    with pytest.raises(ValueError, match="widht"):
        ModelConfig.from_preset("tiny", widht=64)
    for name in ("tiny", "small", "base"):  # every preset is itself valid
        ModelConfig.from_preset(name)


# ---------------------------------------------------------------------------------------------
# attention paths and padding


@pytest.mark.parametrize("padding", [False, True])
def test_sdpa_manual_and_auto_attention_agree(tiny_cfg, padding, monkeypatch):
    """The explicit softmax gives SDPA's outputs, with and without padding: in fp32 and fp64 (tight), and under
    bf16 autocast on the CPU (bf16 tolerances, against SDPA in fp32 and in bf16), the case "auto" exists for:
    there it takes the explicit path (torch's CPU flash kernel is ~10x slower in bf16); otherwise SDPA. A spy
    on F.scaled_dot_product_attention says which path really ran."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, init_std=0.2)  # peaked attention (N(0, 0.02) leaves it near uniform)
    models = {mode: FLAVA(dataclasses.replace(cfg, attn=mode)) for mode in ("sdpa", "manual", "auto")}
    state = randomize_zero_inits(models["sdpa"]).state_dict()
    B, L = 3, tiny_cfg.text_len
    ids, attn = rand_text(B, L, tiny_cfg.vocab_size, seed=1)
    if not padding:
        attn = torch.ones_like(attn)
    images = rand_images(B, tiny_cfg.image_size, seed=1)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))

    def run(mode, dtype, autocast=None):
        """(image out, text out, fusion out) in fp32, and whether SDPA ran."""
        model = models[mode]
        model.load_state_dict(state)
        model.to(dtype)
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)):
            ih, io = model.encode_image(images.to(dtype))
            th, to = model.encode_text(ids, attn)
            outs = (io, to[attn], model.encode_multimodal(ih, th, attn))
        return [o.float() for o in outs], bool(calls)

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        (ref, used), (manual, used_manual), (auto, used_auto) = (run(m, dtype) for m in ("sdpa", "manual", "auto"))
        assert used and not used_manual  # two different paths compared
        assert used_auto == (dtype == torch.float32)  # on a CPU auto leaves SDPA for any other dtype
        for a, b, c in zip(ref, manual, auto):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
            assert torch.equal(c, a if used_auto else b)
    ref = run("sdpa", torch.float32)[0]
    low, used = run("sdpa", torch.float32, torch.bfloat16)
    auto, used_auto = run("auto", torch.float32, torch.bfloat16)
    assert used and not used_auto  # bf16 on a CPU: auto takes the explicit path
    for r, a, b in zip(ref, low, auto):  # relative errors ~0.006 measured (bf16 keeps 8 bits of mantissa)
        assert (b - r).norm() / r.norm() < 0.02 and (b - a).norm() / a.norm() < 0.02
        assert not torch.equal(b, r)  # it really ran in bf16


@pytest.mark.parametrize("attn_mode", ["sdpa", "manual"])
def test_padding_changes_no_output_of_real_tokens(tiny_cfg, attn_mode):
    """Whatever sits at padded positions, every real token's output (text and multimodal) is unchanged."""
    cfg = dataclasses.replace(tiny_cfg, attn=attn_mode)
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(cfg)).eval()
    B, L = 4, cfg.text_len
    ids, attn = rand_text(B, L, cfg.vocab_size, seed=2)
    assert (~attn).any()
    other = torch.where(attn, ids, torch.randint(0, cfg.vocab_size, ids.shape))  # new junk at the padding
    assert (other != ids).any()
    images = rand_images(B, cfg.image_size)
    with torch.no_grad():
        ih, _ = model.encode_image(images)
        runs = []
        for x in (ids, other):
            th, to = model.encode_text(x, attn)
            runs.append((to, model.encode_multimodal(ih, th, attn), model.text_embeddings(x, attn)))
        (to1, mm1, e1), (to2, mm2, e2) = runs
        torch.testing.assert_close(to1[attn], to2[attn], atol=1e-6, rtol=0)
        real_mm = torch.cat([torch.ones(B, mm1.size(1) - L, dtype=torch.bool), attn], dim=1)  # (B, M)
        torch.testing.assert_close(mm1[real_mm], mm2[real_mm], atol=1e-6, rtol=0)
        torch.testing.assert_close(e1, e2, atol=1e-6, rtol=0)
        # Also directly on the fusion: junk text states at padded positions change nothing real.
        th, _ = model.encode_text(ids, attn)
        junk = torch.where(attn[..., None], th, 100 * torch.randn_like(th))
        torch.testing.assert_close(model.encode_multimodal(ih, junk, attn)[real_mm], mm1[real_mm], atol=1e-5, rtol=0)
        # Control: the same change at a *real* position does change the outputs.
        changed = ids.clone()
        changed[:, 1] = (ids[:, 1] + 1 - 5) % (cfg.vocab_size - 5) + 5
        assert not torch.allclose(model.encode_text(changed, attn)[1][attn], to1[attn], atol=1e-4)


def test_grad_checkpointing_matches_plain_backward(tiny_cfg):
    """grad_ckpt recomputes blocks in backward: same loss and same gradients as the plain path."""
    torch.manual_seed(0)
    plain = FLAVA(tiny_cfg)
    ckpt = FLAVA(dataclasses.replace(tiny_cfg, grad_ckpt=True))
    ckpt.load_state_dict(plain.state_dict())
    ids, attn = rand_text(2, tiny_cfg.text_len, tiny_cfg.vocab_size)
    images = rand_images(2, tiny_cfg.image_size)
    grads = []
    for model in (plain, ckpt):
        model.train()
        ih, io = model.encode_image(images)
        th, _ = model.encode_text(ids, attn)
        loss = model.encode_multimodal(ih, th, attn).square().mean() + io.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# init, embeddings, logit scale, multimodal index map


def test_initialisation_follows_flava(tiny_cfg):
    """N(0, 0.02) weights, zero biases, unit LayerNorms, N(0, 0.02) tokens (not zero: see
    test_no_exploding_gradient_at_init), He-initialised conv stem, CLIP's logit scale."""
    torch.manual_seed(0)
    model = FLAVA(dataclasses.replace(tiny_cfg, width=128))
    w = model.text_encoder.transformer.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert model.text_encoder.word_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert (model.image_encoder.transformer.blocks[0].attn.qkv.bias == 0).all()
    assert (model.mm_encoder.transformer.ln_f.weight == 1).all()
    for p in (model.image_encoder.cls_token, model.image_encoder.pos_embed, model.image_encoder.mask_token,
              model.mm_encoder.cls_token, model.text_encoder.pos_embed):
        assert p.std().item() == pytest.approx(0.02, rel=0.3) and (p != 0).all()
    first_stage = model.image_encoder.patch_embed.stages[0]  # a 2 x 2 conv as a Linear on 12 inputs
    assert first_stage.weight.std().item() == pytest.approx(math.sqrt(2 / 12), rel=0.3)  # He: sqrt(2 / fan_in)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) == LOGIT_SCALE_INIT


def test_no_exploding_gradient_at_init():
    """A zero token entering LayerNorm (eps 1e-12) gets a 1e6-scaled gradient; with zero-initialised
    tokens the mask token's gradient norm was ~8e4, which gradient clipping turns into a frozen model.
    Every parameter's gradient of every loss must stay moderate at initialisation."""
    from losses import FLAVALoss, LossConfig

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2, image_layers=1, text_layers=1)
    model, image_tokenizer = FLAVA(cfg), KMeansTokenizer(cfg)
    loss_fn = FLAVALoss(model, image_tokenizer, LossConfig(), mask_id=4, special_ids=(0, 1, 2, 3, 4))
    images = torch.randint(0, 256, (16, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    ids, attn = rand_text(16, cfg.text_len, cfg.vocab_size)
    for source in ("pairs", "images", "texts"):
        model.zero_grad()
        loss_fn(source, {"image": images, "ids": ids, "attn": attn}, seed=0)["total"].backward()
        worst = max((p.grad.norm().item(), n) for n, p in model.named_parameters() if p.grad is not None)
        assert worst[0] < 50, f"{source}: gradient norm {worst[0]:.0f} at {worst[1]}"


def test_encoders_return_pre_and_post_final_layernorm(tiny_cfg):
    """encode_* return (pre-LN, post-LN): the fusion must get index 0, the embeddings index 1 (FLAVA §3.1)."""
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(tiny_cfg))
    images = rand_images(2, tiny_cfg.image_size)
    ids, attn = rand_text(2, tiny_cfg.text_len, tiny_cfg.vocab_size)
    with torch.no_grad():
        ih, io = model.encode_image(images)
        th, to = model.encode_text(ids, attn)
        torch.testing.assert_close(io, model.image_encoder.transformer.ln_f(ih))
        torch.testing.assert_close(to, model.text_encoder.transformer.ln_f(th))
        assert not torch.allclose(ih, io)
        # Contrastive embeddings: token 0 of the final-LN output -> projection -> L2 normalise.
        torch.testing.assert_close(model.image_embeddings(images),
                                   F.normalize(model.image_projection(io[:, 0]), dim=-1))
        torch.testing.assert_close(model.text_embeddings(ids, attn),
                                   F.normalize(model.text_projection(to[:, 0]), dim=-1))


def test_mean_pooling_averages_the_patch_tokens_without_cls(tiny_cfg):
    """image_pool="mean" (FLIP): the image embedding is the projection of the mean of the final-LN patch tokens,
    [CLS_I] left out, over the kept patches only when FLIP drops some; "cls" reads [CLS_I] alone."""
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(dataclasses.replace(tiny_cfg, image_pool="mean"))).eval()
    B, P = 3, tiny_cfg.num_patches
    images = rand_images(B, tiny_cfg.image_size)
    keep_idx = masking.random_keep(B, P, 0.25, generator=torch.Generator().manual_seed(2))  # (B, 4)
    with torch.no_grad():
        for keep in (None, keep_idx):
            out = model.encode_image(images, keep_idx=keep)[1]  # (B, 1 + K, D)
            assert out.size(1) == 1 + (P if keep is None else 4)
            expected = F.normalize(model.image_projection(out[:, 1:].mean(dim=1)), dim=-1)  # (B, E)
            torch.testing.assert_close(model.image_embed(out), expected)
            other_cls = torch.cat([torch.randn_like(out[:, :1]), out[:, 1:]], dim=1)  # [CLS_I] plays no part
            torch.testing.assert_close(model.image_embed(other_cls), expected)
        torch.testing.assert_close(model.image_embeddings(images), model.image_embed(model.encode_image(images)[1]))
        model.cfg = dataclasses.replace(model.cfg, image_pool="cls")
        cls_emb = model.image_embed(out)
        torch.testing.assert_close(cls_emb, F.normalize(model.image_projection(out[:, 0]), dim=-1))
        assert not torch.allclose(cls_emb, expected, atol=1e-3)


def test_multimodal_index_map(tiny_cfg):
    """Output index map of the fusion: 0 = CLS_M, 1 .. N = image tokens (CLS_I first), last L = text."""
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(tiny_cfg))
    mm = model.mm_encoder
    with torch.no_grad():  # make every block the identity: no attention or MLP output gets added
        for block in mm.transformer.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    B, N, L, D = 2, 1 + tiny_cfg.num_patches, tiny_cfg.text_len, tiny_cfg.width
    image_hidden, text_hidden = torch.randn(B, N, D), torch.randn(B, L, D)
    attn = torch.ones(B, L, dtype=torch.bool)
    with torch.no_grad():
        out = model.encode_multimodal(image_hidden, text_hidden, attn)
        ln = mm.transformer.ln_f
        assert out.shape == (B, 1 + N + L, D)
        torch.testing.assert_close(out[:, 0], ln(mm.cls_token[:, 0]).expand(B, D))
        torch.testing.assert_close(out[:, 1 : 1 + N], ln(mm.image_to_mm(image_hidden)))
        torch.testing.assert_close(out[:, -L:], ln(mm.text_to_mm(text_hidden)))


def test_logit_scale_is_clamped_to_ln100(tiny_cfg):
    """scale() stays in [1, 100] and clamp_logit_scale_ puts the parameter back in [0, ln 100]."""
    model = FLAVA(tiny_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert model.scale().item() == pytest.approx(100.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(LOGIT_SCALE_MAX)
    with torch.no_grad():
        model.logit_scale.fill_(-3.0)
    assert model.scale().item() == pytest.approx(1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


# ---------------------------------------------------------------------------------------------
# BEiT masking and FLIP dropping inside the image encoder


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_flip_drops_patches_after_positions_are_added(tiny_cfg, stem):
    """FLIP: kept tokens carry their *own* positions, [CLS_I] is always first, dropped pixels leak nowhere."""
    cfg = dataclasses.replace(tiny_cfg, stem=stem)
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(cfg)).eval()
    B, P, G, p = 3, cfg.num_patches, cfg.grid, cfg.patch_size
    images = rand_images(B, cfg.image_size)
    keep_idx = masking.random_keep(B, P, 0.5, generator=torch.Generator().manual_seed(3))  # (B, K)
    seen, handle = capture_transformer_input(model)
    with torch.no_grad():
        full = model.encode_image(images)
        kept = model.encode_image(images, keep_idx=keep_idx)
        everything = model.encode_image(images, keep_idx=torch.arange(P).expand(B, P))
    handle.remove()
    x_full, x_kept, _ = seen  # (B, 1 + P, D), (B, 1 + K, D)
    D = x_full.size(-1)
    # The sequence that enters the transformer is the full one (positions included) gathered at 1 + keep_idx.
    torch.testing.assert_close(x_kept[:, 0], x_full[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(x_kept[:, 1:], x_full[:, 1:].gather(1, keep_idx[..., None].expand(-1, -1, D)),
                               atol=0, rtol=0)
    assert kept[1].shape == (B, 1 + keep_idx.size(1), cfg.width)
    for a, b in zip(everything, full):  # keeping every patch is the unmasked encoder
        torch.testing.assert_close(a, b)
    # Pixels of dropped patches influence nothing (kernel = stride in both stems).
    noisy = images.clone()
    for b in range(B):
        for k in sorted(set(range(P)) - set(keep_idx[b].tolist())):
            rows, cols = patch_slices(k, G, p)
            noisy[b, :, rows, cols] = torch.rand(3, p, p)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(noisy, keep_idx=keep_idx)[1], kept[1], atol=0, rtol=0)
        assert not torch.allclose(model.encode_image(noisy)[1], full[1])  # control: they matter when kept


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_beit_mask_token_replaces_patches_before_positions(tiny_cfg, stem):
    """BEiT: a masked patch becomes mask_token + its position (length unchanged) and its pixels influence nothing."""
    cfg = dataclasses.replace(tiny_cfg, stem=stem)
    torch.manual_seed(0)
    model = randomize_zero_inits(FLAVA(cfg)).eval()
    enc = model.image_encoder
    B, P, G, p = 3, cfg.num_patches, cfg.grid, cfg.patch_size
    images = rand_images(B, cfg.image_size)
    patch_masked = masking.block_mask(B, G, 6, 2, generator=torch.Generator().manual_seed(1))  # (B, P)
    patch_masked[0] = False
    patch_masked[0, 1 * G + 2] = True  # row 1, column 2: a row-/column-major mix-up would hit another patch
    seen, handle = capture_transformer_input(model)
    with torch.no_grad():
        full = model.encode_image(images)
        masked = model.encode_image(images, patch_masked=patch_masked)
    handle.remove()
    x_full, x_masked = seen
    assert masked[1].shape == full[1].shape == (B, 1 + P, cfg.width)
    expected = (enc.mask_token + enc.pos_embed[:, 1:]).expand(B, -1, -1)  # (B, P, D)
    torch.testing.assert_close(x_masked[:, 1:][patch_masked], expected[patch_masked])
    torch.testing.assert_close(x_masked[:, 1:][~patch_masked], x_full[:, 1:][~patch_masked], atol=0, rtol=0)
    torch.testing.assert_close(x_masked[:, 0], x_full[:, 0], atol=0, rtol=0)
    noisy = images.clone()
    for b, k in patch_masked.nonzero().tolist():
        rows, cols = patch_slices(k, G, p)
        noisy[b, :, rows, cols] = torch.rand(3, p, p)
    with torch.no_grad():
        for a, b in zip(model.encode_image(noisy, patch_masked=patch_masked), masked):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert not torch.allclose(model.encode_image(noisy)[1], full[1])  # control: unmasked, the pixels matter


# ---------------------------------------------------------------------------------------------
# FLOPs


def _measured_forward_flops(cfg, source, B=2, keep_ratio=0.5, mask_ratio=0.4, mlm_prob=0.15, masked_pass="split"):
    """FLOPs that FlopCounterMode counts in one forward of the real FLAVA step, per sample, minus the image tokenizer pass."""
    torch.manual_seed(0)
    model, image_tokenizer = FLAVA(cfg), KMeansTokenizer(cfg)
    loss_fn = losses.FLAVALoss(model, image_tokenizer, losses.LossConfig(keep_ratio=keep_ratio, mask_ratio=mask_ratio,
                                                              mlm_prob=mlm_prob, masked_pass_share=1.0,
                                                              masked_pass=masked_pass),
                               mask_id=4, special_ids=SPECIALS)
    images = (rand_images(B, cfg.image_size) * 255).to(torch.uint8)
    ids, attn = rand_text(B, cfg.text_len, cfg.vocab_size, min_len=cfg.text_len)  # no padding: L tokens each
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        image_tokenizer.codebook_indices(images.float() / 255)
    codes_flops = counter.get_total_flops() / B
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss_fn(source, {"image": images, "ids": ids, "attn": attn}, seed=0)
    total = counter.get_total_flops() / B
    return total - (codes_flops if source != "texts" else 0), codes_flops


@pytest.mark.parametrize("source, masked_pass", [("images", "split"), ("texts", "split"), ("pairs", "split"),
                                                 ("pairs", "joint")])
def test_flops_per_sample_matches_flop_counter(source, masked_pass):
    """flops_per_sample / 3 equals the forward matmul FLOPs torch counts (linear stem, manual attention).

    With the paper's linear patch embedding every counted term is exact; the only one the estimate leaves
    out on purpose is the contrastive logits (2 x 2 B E per sample, batch-dependent), added here. SDPA on
    the CPU is not seen by FlopCounterMode, hence attn='manual'. The image tokenizer's term (forward only) must be exact.
    text_len=16 makes the estimate's ceil(0.15 L) text-head positions equal the static bound floor(0.15 L) + 1
    that losses.py really runs the head on (they differ by one when 0.15 L is an integer, e.g. L = 20)."""
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2, image_layers=2, text_layers=2, mm_layers=1,
                                  stem="linear", attn="manual", vocab_size=300, codebook_size=128, text_len=16)
    B = 2
    measured, codes_flops = _measured_forward_flops(cfg, source, B=B, masked_pass=masked_pass)
    estimate = flops_per_sample(cfg, source, keep_ratio=0.5, mask_ratio=0.4, mlm_prob=0.15, masked_pass=masked_pass)
    codes_term = codes_flops if source != "texts" else 0
    if source == "pairs":
        measured -= 2 * 2 * B * cfg.embed_dim  # the B x B logits, outside the estimate
    assert (estimate - codes_term) / 3 == pytest.approx(measured, rel=1e-3)


def test_flops_per_sample_with_conv_stem_is_close():
    """With the conv stem (tiny's default) the patch term is only approximate: the estimate stays within 10%."""
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2, image_layers=2, text_layers=2, mm_layers=1,
                                  attn="manual", vocab_size=300, codebook_size=128, text_len=16)
    measured, codes_flops = _measured_forward_flops(cfg, "images")
    assert (flops_per_sample(cfg, "images", mask_ratio=0.4) - codes_flops) / 3 == pytest.approx(measured, rel=0.10)


def test_flops_per_sample_monotone_in_keep_ratio():
    """Keeping more patches costs more (pairs only); the other sources ignore keep_ratio; unknown source fails."""
    for name in ("tiny", "base"):
        cfg = ModelConfig.from_preset(name)
        pairs = [flops_per_sample(cfg, "pairs", keep_ratio=r) for r in (0.1, 0.25, 0.5, 0.75, 1.0)]
        assert all(a < b for a, b in zip(pairs, pairs[1:]))
        for source in ("images", "texts"):
            assert flops_per_sample(cfg, source, keep_ratio=0.25) == flops_per_sample(cfg, source, keep_ratio=1.0)
    with pytest.raises(ValueError):
        flops_per_sample(ModelConfig.from_preset("tiny"), "video")


def test_conv_stem_is_a_stack_of_kernel_2_stride_2_convolutions():
    """The stem runs as Linear layers on 2 x 2 pixel blocks (fast matmuls); it must equal the
    kernel-2, stride-2 convolutions it stands for, so each patch sees only its own pixels."""
    cfg = ModelConfig.from_preset("tiny", width=64, heads=2)
    stem = FLAVA(cfg).image_encoder.patch_embed
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    z = x
    for i, lin in enumerate(stem.stages):
        weight = lin.weight.view(lin.out_features, 2, 2, lin.in_features // 4).permute(0, 3, 1, 2)  # (out, C, kh, kw)
        z = F.conv2d(z, weight, lin.bias, stride=2)
        z = F.gelu(z) if i < len(stem.stages) - 1 else z
    torch.testing.assert_close(stem(x), z, atol=1e-5, rtol=1e-5)
    assert z.shape == (2, cfg.width, cfg.grid, cfg.grid)
