"""The CUDA paths, on a machine with a GPU (every test is marked `gpu` and skipped where torch sees none;
the rest of the suite runs on the CPU whatever the machine has): fp16 with GradScaler, overflowing steps
included; SDPA against the explicit attention in fp16 and bf16 with padding; the step's random draws on a
CUDA generator; pinned-memory copies; a one-process NCCL group under DDP.

    python -m pytest -m gpu -v
"""
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

import data
import shapes
import losses
import distributed
import train
from conftest import SMALL
from model import KMeansTokenizer, FLAVA, ModelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda", 0)
SPECIALS, MASK = (0, 1, 2, 3, 4), 4


def make_batch(cfg, B, device=CUDA, seed=0, min_len=4):
    """uint8 images and [CLS] words [SEP] [PAD]... captions on the device, as train.to_device delivers them."""
    g, L = torch.Generator().manual_seed(seed), cfg.text_len
    images = torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, generator=g)
    ids = torch.randint(len(SPECIALS), cfg.vocab_size, (B, L), generator=g)
    lens = torch.randint(min_len, L + 1, (B,), generator=g)
    attn = torch.arange(L)[None] < lens[:, None]  # (B, L)
    ids[:, 0], ids[torch.arange(B), lens - 1] = 2, 3
    ids[~attn] = 0
    return {"image": images.to(device), "ids": ids.to(device), "attn": attn.to(device)}


def make_step(device=CUDA, **loss_kw):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    model, image_tokenizer = FLAVA(cfg).to(device), KMeansTokenizer(cfg).to(device)
    with torch.no_grad():  # codes that vary: a random codebook in pixel space
        image_tokenizer.codebook.uniform_()
    loss_kw = {"keep_ratio": 0.5, "itm_neg_prob": 0.5, "masked_pass_share": 0.5, "masked_pass": "split", **loss_kw}
    return losses.FLAVALoss(model, image_tokenizer, losses.LossConfig(**loss_kw), mask_id=MASK, special_ids=SPECIALS), cfg


def test_fp16_steps_with_grad_scaler_skip_exactly_the_overflowing_ones():
    """fp16 autocast + GradScaler on a paired step: from a scale of 2^40 the scaled gradients overflow fp16;
    each such step leaves every weight untouched and halves the scale, until one fits and updates them."""
    loss_fn, cfg = make_step()
    batch, params = make_batch(cfg, 8), list(loss_fn.model.parameters())
    opt = train.make_optimizer(loss_fn.model, train.TrainConfig())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    history = []  # (scale used, gradient norm finite, weights changed)
    for _ in range(40):
        before = [p.detach().clone() for p in params]
        with torch.autocast("cuda", dtype=torch.float16):
            out = loss_fn("pairs", batch, seed=0)
        assert all(torch.isfinite(v) for v in out.values()), out  # the losses themselves are fp32
        scale = scaler.get_scale()
        scaler.scale(out["total"]).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        changed = any(not torch.equal(b, p) for b, p in zip(before, params))
        history.append((scale, math.isfinite(grad_norm.item()), changed))
        if history[-1][2]:
            break
    assert len(history) > 1 and history[-1][1:] == (True, True), history
    assert all(not finite and not changed for _, finite, changed in history[:-1]), history
    assert [s for s, _, _ in history] == [2.0**40 / 2**i for i in range(len(history))]
    assert all(torch.isfinite(p).all() for p in params)


def test_fp16_training_counts_the_overflowing_steps(tmp_path, monkeypatch):
    """train.py on the GPU in fp16: steps whose loss is made infinite (3 and 5) are skipped by the scaler and
    counted in overflow_steps, with any that overflowed on their own; the weights stay finite."""
    from test_reliability import ckpt, log_rows, poison, run

    poison(monkeypatch, {3, 5}, math.inf)
    run(tmp_path, "--steps", 8, "--ckpt_every", 100, "--device", "cuda", "--dtype", "fp16")
    saved = ckpt(tmp_path)
    skipped = round(math.log2(65536.0 / saved["scaler"]["scale"]))  # GradScaler's initial scale, halved per skip
    last = [r for r in log_rows(tmp_path) if r.get("stage") == "joint"][-1]
    assert last["step"] == 8 and last["overflow_steps"] == skipped >= 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_and_manual_attention_agree_on_cuda_with_padding(dtype):
    """Under fp16 / bf16 autocast on the GPU (flash or memory-efficient kernels) SDPA gives what the explicit
    softmax gives, for the real tokens of padded captions, in the text encoder and the fusion; "auto" is SDPA."""
    cfg = ModelConfig.from_preset("tiny", **SMALL)
    torch.manual_seed(0)
    models = {mode: FLAVA(dataclasses.replace(cfg, attn=mode)).to(CUDA).eval() for mode in ("sdpa", "manual", "auto")}
    for model in models.values():
        model.load_state_dict(models["sdpa"].state_dict())
    batch = make_batch(cfg, 6, seed=1)
    ids, attn = batch["ids"], batch["attn"]
    assert (~attn).any()
    outs = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        for mode, model in models.items():
            ih, io = model.encode_image(batch["image"].float() / 255)
            th, to = model.encode_text(ids, attn)
            real_mm = torch.cat([torch.ones(6, ih.size(1) + 1, dtype=torch.bool, device=CUDA), attn], 1)  # (B, M)
            outs[mode] = (io.float(), to[attn].float(), model.encode_multimodal(ih, th, attn)[real_mm].float())
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(outs["sdpa"], outs["manual"]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for a, b in zip(outs["sdpa"], outs["auto"]):
        torch.testing.assert_close(a, b)  # fp32 tolerances: the same kernels, far closer than manual


def test_the_draws_of_a_step_on_a_cuda_generator():
    """FLAVALoss.draw on CUDA tensors: every draw on the device, a function of the seed (the same seed, the
    same draws; another, others), BEiT masks identical to the CPU's (Python draws them), the text masks'
    share and the kept patches' form right."""
    loss_fn, cfg = make_step()
    B, P = 256, cfg.num_patches
    batch = make_batch(cfg, B, min_len=cfg.text_len)  # 10 words a caption: BERT's k = 1 or 2, a share of 0.15
    draws = loss_fn.draw("pairs", batch, seed=3)
    again, other = loss_fn.draw("pairs", batch, seed=3), loss_fn.draw("pairs", batch, seed=4)
    on_cpu = loss_fn.to("cpu").draw("pairs", {k: v.cpu() for k, v in batch.items()}, seed=3)
    tensors = [k for k, v in draws._asdict().items() if torch.is_tensor(v)]
    assert all(getattr(draws, k).device == CUDA and torch.equal(getattr(draws, k), getattr(again, k)) for k in tensors)
    assert not torch.equal(draws.keep_idx, other.keep_idx)
    assert not torch.equal(draws.masked_ids, other.masked_ids)
    assert torch.equal(draws.patch_masked.cpu(), on_cpu.patch_masked)
    n = B // 2
    assert draws.keep_idx.shape == (B, P // 2) and (draws.keep_idx.diff(dim=1) > 0).all()
    assert draws.rows.tolist() == list(range(0, B, 2)) and draws.patch_masked.shape == (n, P)
    assert (draws.patch_masked.sum(1) <= loss_fn.n_masked).all()
    labels, swapped = draws.text_labels, draws.swap.float().mean().item()
    assert (labels != -100).sum().item() / (n * (cfg.text_len - 2)) == pytest.approx(0.15, abs=0.03)
    assert 0.3 < swapped < 0.7  # itm_neg_prob 0.5 (a partner with the same caption does not count)


def test_pinned_memory_copies_arrive_intact():
    """A DataLoader with pin_memory gives pinned batches; train.to_device's non-blocking copies of them, and
    the block masks losses.py pins and copies, equal their sources once the stream has run."""
    world = shapes.ShapesWorld(image_size=32)
    tokenizer = data.Tokenizer.from_corpus(world.vocabulary())
    mixture = data.Mixture({"pairs": data.SyntheticPairs(world, "train", tokenizer, 16)})
    sampler = data.MixtureBatchSampler({"pairs": len(mixture.sources["pairs"])}, {"pairs": 1.0}, 64, steps=2)
    for _, batch in data.make_loader(mixture, sampler, num_workers=0, pin_memory=True):
        batch.pop("skipped")
        assert all(v.is_pinned() for v in batch.values())
        moved = train.to_device(batch, CUDA)
        torch.cuda.synchronize()
        assert all(moved[k].device == CUDA and torch.equal(moved[k].cpu(), v) for k, v in batch.items())
    loss_fn, _ = make_step()
    masks = loss_fn._block_mask(7, range(64), CUDA)
    torch.cuda.synchronize()
    assert torch.equal(masks.cpu(), loss_fn._block_mask(7, range(64), torch.device("cpu")))


def test_one_process_nccl_group_runs_the_distributed_step(monkeypatch):
    """distributed.setup_distributed under torchrun's variables with one GPU: NCCL on cuda:0. The differentiable
    all_gather runs through NCCL, and DDP over the FLAVA step gives the gradients of the plain step."""
    from test_distributed import free_port

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    rank, local_rank, world, device = distributed.setup_distributed("auto")
    try:
        assert (rank, local_rank, world, device) == (0, 0, 1, CUDA) and dist.get_backend() == "nccl"
        x = torch.randn(4, 8, device=CUDA, requires_grad=True)
        y = losses._AllGatherWithGrad.apply(x)  # the gather itself (one process skips it in gather_with_grad)
        y.square().sum().backward()
        assert torch.equal(y, x) and torch.equal(x.grad, 2 * x)
        loss_fn, cfg = make_step()
        batch = make_batch(cfg, 8)
        plain = loss_fn("pairs", batch, seed=0)
        plain["total"].backward()
        expected = [p.grad.clone() for p in loss_fn.model.parameters() if p.grad is not None]
        loss_fn.model.zero_grad(set_to_none=True)
        ddp = torch.nn.parallel.DistributedDataParallel(loss_fn, find_unused_parameters=True)
        out = ddp("pairs", batch, seed=0)
        out["total"].backward()
        assert out["total"].item() == pytest.approx(plain["total"].item(), rel=1e-6)
        got = [p.grad for p in loss_fn.model.parameters() if p.grad is not None]
        assert len(got) == len(expected) > 10
        for a, b in zip(got, expected):  # CUDA's atomic adds (embedding, gather backward) may reorder sums
            assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() < 1e-5
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_in_ddps_precision_under_fp16_on_nccl(monkeypatch):
    """One process, NCCL, fp16 autocast with its GradScaler: FSDP (distributed.shard) keeps the encoders' residual
    streams in fp32 as DDP does, and five steps of every kind give DDP's losses (test_fsdp.py's check in bf16 on
    gloo; here the 65,504 ceiling that FSDP's param_dtype=fp16 would bring into the residual stream)."""
    from test_distributed import free_port
    from test_fsdp import SOURCES, precision_run

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    distributed.setup_distributed("auto")
    try:
        (ddp, ddp_dtypes), (fsdp, fsdp_dtypes) = (precision_run(kind, CUDA, torch.float16, 0, 1) for kind in ("ddp", "fsdp"))
    finally:
        dist.destroy_process_group()
    assert ddp_dtypes == fsdp_dtypes == [("fused", "torch.float32"), ("hidden", "torch.float32")]
    for t, (a, b) in enumerate(zip(ddp, fsdp)):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), (t, SOURCES[t], k)
