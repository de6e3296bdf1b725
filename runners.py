"""The steps bench.py times: nanoFLAVA's, as train.py runs them, on random inputs (bench.Peer runs Hugging Face's
FlavaForPreTraining at an equal config beside it: the optional transformers is imported there only).

Companion of bench.py. Each runner owns a model, the optimizer half of train.py's step (AdamW, a GradScaler for
fp16, clipping) and a `step(case, keep, batch, seed)`; the cases are the contrastive pass alone, the paired FLAVA
step ("accum": in GradCache's micro-batches), the image-only and the text-only step.
Exercise it with `python -m pytest tests/test_bench.py tests/test_fit.py`.
"""
import torch

import flops
import gradcache
import losses
import masking
import model as M
import train

SPECIAL_IDS, MASK_ID = tuple(range(5)), 4  # data.SPECIALS ([PAD] [UNK] [CLS] [SEP] [MASK]) open every vocabulary


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(cfg, B, device, seed=0):
    """Random uint8 images and captions of random length: [CLS] words [SEP] [PAD] ..."""
    g, S, L = torch.Generator().manual_seed(seed), cfg.image_size, cfg.text_len
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g)  # (B, 3, S, S)
    length = torch.randint(L // 2, L + 1, (B,), generator=g)  # (B,)
    attn = torch.arange(L)[None] < length[:, None]  # (B, L), True on real tokens
    ids = torch.randint(len(SPECIAL_IDS), cfg.vocab_size, (B, L), generator=g).masked_fill(~attn, 0)  # (B, L)
    ids[:, 0], ids[torch.arange(B), length - 1] = 2, 3  # [CLS] first, [SEP] last
    return {"image": images.to(device), "ids": ids.to(device), "attn": attn.to(device)}


def case_flops(cfg, case, keep, masked_pass_share=1.0):
    """Training FLOPs per sample (3 x forward): flops.py's count of the step, or of the contrastive pass alone."""
    case = "pairs" if case == "accum" else case  # the same model FLOPs: the extra forward is overhead
    if case != "contrastive":
        return flops.flops_per_sample(cfg, case, keep, masked_pass_share=masked_pass_share)
    return flops.contrastive_flops(cfg, keep)


class Runner:
    """A model with the optimizer half of train.py's step: its AdamW, a GradScaler for fp16, clipping."""

    def setup(self, model, device, dtype):
        self.model, self.device = model.to(device).train(), device
        self.opt = train.make_optimizer(self.model, train.TrainConfig())
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def update(self, loss=None):
        if loss is not None:
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


class Ours(Runner):
    name = "nanoFLAVA"

    def __init__(self, cfg, device, dtype, compile=False, masked_pass_share=1.0, micro=0):
        torch.manual_seed(0)
        self.micro = micro  # the "accum" case: the paired step in micro-batches of this many pairs (GradCache)
        self.setup(M.FLAVA(cfg), device, dtype)
        self.loss_cfgs = {}  # one LossConfig per keep ratio, reused (a compiled step guards on it); the full
        # FLAVA step runs the masked pass on the whole batch (masked_pass_share 1.0), as Hugging Face's does
        self.masked_pass_share = masked_pass_share
        image_tokenizer = M.KMeansTokenizer(cfg).to(device)
        self.objective = losses.FLAVALoss(self.model, image_tokenizer, self.loss_config(1.0), MASK_ID, SPECIAL_IDS)
        self.full, self.contrastive = self.objective, self._contrastive
        if compile:
            self.full, self.contrastive = losses.compile_step(self.objective), losses.compile_step(self._contrastive)

    def loss_config(self, keep):
        return self.loss_cfgs.setdefault(keep, losses.LossConfig(keep_ratio=keep,
                                                                     masked_pass_share=self.masked_pass_share))

    def _contrastive(self, images_u8, ids, attn, keep_idx):
        """The contrastive pass of losses.FLAVALoss.pairs on its own."""
        out = self.model.forward_contrastive(images_u8.float() / 255, ids, attn, keep_idx)
        return losses.contrastive_loss(out.image_emb, out.text_emb, self.model.logit_scale)

    def step(self, case, keep, batch, seed):
        if case == "contrastive":
            with self.autocast:
                B, P = batch["ids"].size(0), self.model.cfg.num_patches
                gen = torch.Generator(self.device).manual_seed(seed)
                keep_idx = masking.random_keep(B, P, keep, self.device, gen) if keep < 1 else None  # (B, K)
                loss = self.contrastive(batch["image"], batch["ids"], batch["attn"], keep_idx)
            self.scaler.scale(loss).backward()
        else:  # as train.py runs it
            self.objective.cfg = self.loss_config(keep)
            gradcache.accumulate(self.full, "pairs" if case == "accum" else case, batch, seed,
                              self.micro if case == "accum" else 0, lambda x: self.scaler.scale(x).backward(),
                              self.autocast)
        self.update()
        self.model.clamp_logit_scale_()
