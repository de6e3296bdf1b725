"""The steps bench.py times: nanoFLAVA's (as train.py runs them, on random inputs) and Hugging Face's
FlavaForPreTraining at an equal config (the optional peer: transformers, imported only when asked for).

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


class Peer(Runner):
    """Hugging Face's FlavaForPreTraining from a config equal to ours (random weights, no hub, no
    codebook). It is handed precomputed targets: codebook indices as `mim_labels` (its DALL-E
    codebook never runs), the BEiT mask, MLM-masked ids and labels, ITM labels. Ours draws all of
    those and runs its image tokenizer (a codebook) inside the timed step."""
    name = "HF"

    def __init__(self, cfg, device, dtype):
        import transformers  # only here: the peer is optional
        transformers.logging.set_verbosity_error()
        common = dict(hidden_size=cfg.width, num_attention_heads=cfg.heads, intermediate_size=cfg.mlp_ratio * cfg.width,
                      layer_norm_eps=cfg.ln_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        hcfg = transformers.FlavaConfig(
            image_config=dict(common, num_hidden_layers=cfg.image_layers, image_size=cfg.image_size,
                              patch_size=cfg.patch_size, vocab_size=cfg.codebook_size),
            text_config=dict(common, num_hidden_layers=cfg.text_layers, vocab_size=cfg.vocab_size,
                             max_position_embeddings=cfg.text_len),
            multimodal_config=dict(common, num_hidden_layers=cfg.mm_layers), hidden_size=cfg.width,
            projection_dim=cfg.embed_dim, init_codebook=False)
        torch.manual_seed(0)
        self.setup(transformers.FlavaForPreTraining(hcfg), device, dtype)
        self.cfg, self.inputs = cfg, {}

    def make_inputs(self, case, batch):
        cfg, g = self.cfg, torch.Generator().manual_seed(0)
        B, ids, attn = batch["ids"].size(0), batch["ids"].cpu(), batch["attn"].cpu()
        mean, std = torch.tensor(M.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(M.CLIP_STD).view(1, 3, 1, 1)
        image = dict(pixel_values=(batch["image"].cpu().float() / 255 - mean) / std,  # (B, 3, S, S) as ours normalises
                     mim_labels=torch.randint(cfg.codebook_size, (B, cfg.num_patches), generator=g),  # (B, P)
                     bool_masked_pos=masking.block_mask(B, cfg.grid, round(0.383 * cfg.num_patches), generator=g))
        swap = torch.rand(B, generator=g) < 0.25  # ITM negatives: the previous sample's caption, as LossConfig
        mm_ids = torch.where(swap[:, None], ids.roll(1, 0), ids) if case == "pairs" else ids  # (B, L)
        masked, labels = masking.text_mask(mm_ids, mask_id=MASK_ID, special_ids=SPECIAL_IDS, vocab_size=cfg.vocab_size,
                                           generator=g)
        text = dict(input_ids=ids, attention_mask=attn.long(), input_ids_masked=masked, mlm_labels=labels)
        x = {"images": image, "texts": text, "pairs": {**image, **text, "itm_labels": (~swap).long()}}[case]
        return {k: v.to(self.device) for k, v in x.items()}

    def step(self, case, keep, batch, seed):
        if case not in self.inputs:
            self.inputs[case] = self.make_inputs(case, batch)
        x = {k: v.clone() if k.endswith("labels") else v for k, v in self.inputs[case].items()}  # HF edits labels
        with self.autocast:
            loss = self.model(**x, return_loss=True).loss
        self.update(loss)
