"""The image tokenizer (model.KMeansTokenizer): one code per patch in the ViT's order, a codebook that stage 1 keeps
alive and that reconstructs far better than the mean image, codes that no autocast precision can change,
and one codebook on every rank.

    python -m pytest tests/test_tokenizer.py
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import shapes
from losses import codebook_stats
from model import KMeansTokenizer, ModelConfig

CFG = ModelConfig.from_preset("tiny", image_size=32, patch_size=8, width=32, heads=2, codebook_size=64)  # 4 x 4


def world_images(split, start, n, size=32):
    world = shapes.ShapesWorld(image_size=size, seed=0)
    return torch.stack([torch.from_numpy(world.render(world.scene(split, start + i))).permute(2, 0, 1)
                        for i in range(n)]).float() / 255  # (n, 3, S, S) in [0, 1]


def health(image_tokenizer, images):
    """What eval.py reports: hard-code reconstruction MSE beside the mean image's, perplexity, share used."""
    codes = image_tokenizer.codebook_indices(images)
    stats = codebook_stats(codes, image_tokenizer.codebook.size(0))
    mean_image = F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images).item()
    return F.mse_loss(image_tokenizer.decode_indices(codes), images).item(), mean_image, stats["perplexity"], stats["used"]


def healthy(image_tokenizer, images):
    recon, mean_image, perplexity, used = health(image_tokenizer, images)
    return recon <= 0.5 * mean_image and perplexity >= image_tokenizer.codebook.size(0) / 4 and used >= 0.75


def test_codes_follow_the_patches_in_row_major_order():
    """Code k belongs to pixels [r p, (r + 1) p) x [c p, (c + 1) p) with (r, c) = divmod(k, G), the ViT's order;
    decoding pastes each code's vector back, so an image made of codebook vectors survives the round trip."""
    image_tokenizer, G, p = KMeansTokenizer(CFG), CFG.grid, CFG.patch_size
    image_tokenizer.codebook.copy_(torch.rand(image_tokenizer.codebook.shape, generator=torch.Generator().manual_seed(0)))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    patches = image_tokenizer.patches(images)  # (B, P, 3 p p)
    for k in (0, 6, 15):
        r, c = divmod(k, G)
        assert torch.equal(patches[:, k], images[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(2, -1))
    codes = torch.randint(0, CFG.codebook_size, (2, CFG.num_patches), generator=torch.Generator().manual_seed(2))
    pictures = image_tokenizer.decode_indices(codes)  # (2, 3, S, S)
    assert torch.equal(image_tokenizer.codebook_indices(pictures), codes)
    changed, other = pictures.clone(), (codes[:, 1 * G + 2] + 1) % CFG.codebook_size  # (2,) another code each
    changed[:, :, 1 * p : 2 * p, 2 * p : 3 * p] = image_tokenizer.codebook[other].view(2, 3, p, p)  # patch (1, 2) takes its pixels
    moved = (image_tokenizer.codebook_indices(changed) != codes).nonzero()[:, 1].unique().tolist()
    assert moved == [1 * G + 2]  # only that patch's code changes


def test_stage_one_learns_a_codebook_that_is_used_and_reconstructs():
    """40 k-means steps on 32 scenes each: on held-out scenes the hard codes reconstruct at most half the mean
    image's error, with a perplexity of at least C / 4 and three quarters of the codes in use. A collapsed
    codebook (every code the mean patch; what the Gumbel dVAE this replaced came close to) fails each bound."""
    image_tokenizer, gen = KMeansTokenizer(CFG), torch.Generator().manual_seed(0)
    for step in range(40):
        image_tokenizer.learn(world_images("train", 32 * step, 32), decay=0.5 + 0.49 * step / 39, reseed=step < 32, generator=gen)
    held_out = world_images("val", 0, 200)
    recon, mean_image, perplexity, used = health(image_tokenizer, held_out)
    assert recon <= 0.5 * mean_image and perplexity >= 16 and used >= 0.75, (recon, mean_image, perplexity, used)
    collapsed = KMeansTokenizer(CFG)
    collapsed.codebook.copy_(image_tokenizer.patches(held_out).mean((0, 1)).expand_as(collapsed.codebook))
    assert not healthy(collapsed, held_out)
    recon, mean_image, perplexity, used = health(collapsed, held_out)
    assert recon > 0.5 * mean_image and perplexity == pytest.approx(1.0) and used == 1 / 64


def test_dead_codes_are_moved_to_the_patches_served_worst():
    """Codes placed where no patch is (pixels of 5, far outside [0, 1]) are never picked; once their usage has
    decayed, learn() re-seeds them at badly served patches and nearly all codes are in use again. Without
    re-seeding they stay dead."""
    images = world_images("train", 0, 80)
    for reseed, expected in ((True, 0.9), (False, None)):
        image_tokenizer, gen = KMeansTokenizer(CFG), torch.Generator().manual_seed(0)
        image_tokenizer.learn(images[:8], generator=gen)  # seeds the codebook with patches
        image_tokenizer.codebook[32:] = 5.0  # half the codes in a place no patch goes
        for step in range(9):  # usage halves each step: below 3% of an even share after 6
            image_tokenizer.learn(images[8 * step + 8 : 8 * step + 16], decay=0.5, reseed=reseed, generator=gen)
        used = codebook_stats(image_tokenizer.codebook_indices(images), 64)["used"]
        if expected:
            assert used >= expected, used
        else:
            assert used <= 0.5 and (image_tokenizer.codebook[32:] == 5.0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_codes_do_not_depend_on_the_autocast_precision(dtype):
    """Codes are computed in fp32 outside autocast: under bf16 / fp16 autocast they are the fp32 codes, even
    for patches that sit between two codes closer than a 16-bit float can tell apart."""
    image_tokenizer = KMeansTokenizer(CFG)
    base = torch.rand(CFG.codebook_size, 192, generator=torch.Generator().manual_seed(0))
    base[1::2] = base[0::2] + 2e-3  # pairs of codes 0.002 apart in every pixel
    image_tokenizer.codebook.copy_(base)
    # patches near the midpoint of each pair, on either side by 1e-4: the fp32 choice flips from code to code
    side = torch.where(torch.arange(32) % 2 == 0, -1e-4, 1e-4)[:, None]  # (32, 1)
    patches = (base[0::2] + 1e-3 + side).clamp(0, 1)  # (32, 192)
    images = patches.view(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)
    want = image_tokenizer.codebook_indices(images)
    assert set((want % 2).flatten().tolist()) == {0, 1}  # the fp32 answers go both ways
    with torch.autocast("cpu", dtype=dtype):
        got = image_tokenizer.codebook_indices(images)
    assert got.dtype == torch.long and torch.equal(got, want)


def _learn_on_a_rank(rank, world, port, images, init, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        image_tokenizer, half = KMeansTokenizer(CFG), 32 // world
        image_tokenizer.codebook.copy_(init)
        image_tokenizer.usage.fill_(1.0)  # already seeded: no first-step draw
        for step in range(3):  # this rank's half of each step's 32 images
            image_tokenizer.learn(images[32 * step + rank * half : 32 * step + (rank + 1) * half], reseed=False)
        moved = image_tokenizer.codebook.clone()
        image_tokenizer.codebook[:2] = 9.0  # two dead codes, re-seeded from rank 0's patches whatever each rank draws
        image_tokenizer.usage[:2] = 0.0
        image_tokenizer.learn(images[rank * half : (rank + 1) * half], generator=torch.Generator().manual_seed(rank))
        gathered = [torch.empty_like(image_tokenizer.codebook) for _ in range(world)]
        dist.all_gather(gathered, image_tokenizer.codebook)
        if rank == 0:
            torch.save({"moved": moved, "ranks": gathered}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_one_codebook_equal_to_one_process_with_the_whole_batch(tmp_path):
    """Counts and sums are summed over ranks: 2 gloo ranks with 16 images each move the codebook as one process
    with the 32 images does; and codes that rank 0 re-seeds reach every rank (one codebook everywhere)."""
    import torch.multiprocessing as mp

    from test_distributed import free_port

    images = world_images("train", 0, 96)
    init = torch.rand(CFG.codebook_size, 192, generator=torch.Generator().manual_seed(3))
    single = KMeansTokenizer(CFG)
    single.codebook.copy_(init)
    single.usage.fill_(1.0)
    for step in range(3):
        single.learn(images[32 * step : 32 * step + 32], reseed=False)
    out = tmp_path / "codebooks.pt"
    mp.start_processes(_learn_on_a_rank, args=(2, free_port(), images, init, str(out)), nprocs=2,
                       start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
    result = torch.load(out)
    torch.testing.assert_close(result["moved"], single.codebook, atol=1e-6, rtol=1e-5)
    assert not torch.equal(result["moved"], init)  # it did move
    first, second = result["ranks"]
    assert torch.equal(first, second) and (first[:2] != 9.0).all()
