"""Benchmark: what a training step of nanoFLAVA costs, and what FLIP's patch dropping saves.

Times complete training steps (forward, backward, gradient clipping, AdamW) on random inputs after
warm-up, synchronising before every clock read. All cases run interleaved, one step each per round in
a shuffled order, so a noisy machine slows them alike; a ratio is the median of per-round ratios.
Cases: the contrastive pass alone at FLIP keep ratios (arXiv 2212.00794 §3), the full paired FLAVA
step (arXiv 2112.04482 §3.2) at keep 1.0 / 0.5, the image-only (MIM) and text-only (MLM) steps, and
with --peer the same three steps of Hugging Face's FlavaForPreTraining at an equal config. Memory is
measured in a fresh process per case. MFU: model FLOPs (flops.flops_per_sample) over the GPU's peak.

    python bench.py --preset small --batch 32 --threads 1 --peer         # CPU: the README table
    python bench.py --preset base --device cuda --batch max [--compile]  # GPU: largest batch, MFU
    python bench.py --ablate                                               # the papers' ablations, small scale
    python bench.py --preset base --micro 8 --cases pairs --batch 32       # GradCache: 4 micro-steps vs 1 step
    python bench.py --fit --preset base --gpu_gb 80                        # the largest micro-batch that fits
    python bench.py --precision --preset tiny                              # GPU: fp16 beside bf16
"""
import argparse
import json
import multiprocessing as mp
import platform
import random
import resource
import statistics
import sys
import time
from dataclasses import asdict, fields, replace

import torch
from tqdm import tqdm

import ablations
import cli
import distributed
import losses
import masking
import model as M
import runners
import train

PEAK_TFLOPS = {"A100": 312, "H100": 989, "H200": 989}  # dense fp16/bf16 tensor-core peaks (data sheets, SXM)
GOALS = [  # (target, slower case, faster case, goal): x times faster = median over rounds of t(slower) / t(faster)
    ("FLIP: contrastive pass, keep 0.5 vs 1.0", ("ours", "contrastive", 1.0), ("ours", "contrastive", 0.5), 1.8),
    ("FLIP: contrastive pass, keep 0.25 vs 1.0", ("ours", "contrastive", 1.0), ("ours", "contrastive", 0.25), 3.0),
    ("FLIP: paired step, keep 0.5 vs 1.0", ("ours", "pairs", 1.0), ("ours", "pairs", 0.5), 1.3),
    ("vs HF: paired step, ours at keep 1.0", ("peer", "pairs", 1.0), ("ours", "pairs", 1.0), 1.2),
    ("vs HF: paired step, ours at keep 0.5", ("peer", "pairs", 1.0), ("ours", "pairs", 0.5), None),
    ("vs HF: image-only (MIM) step", ("peer", "images", 1.0), ("ours", "images", 1.0), 1.0),
    ("vs HF: text-only (MLM) step", ("peer", "texts", 1.0), ("ours", "texts", 1.0), 1.0)]


class Peer(runners.Runner):
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
        masked, labels = masking.text_mask(mm_ids, mask_id=runners.MASK_ID, special_ids=runners.SPECIAL_IDS, vocab_size=cfg.vocab_size,
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


def probe(spec):
    """Memory of one case in this process (meant to be a fresh one): a warm-up step creates the optimizer
    state, then one measured step. `peak`: the CUDA allocator's peak, or the process's peak RSS (torch
    runtime included). `rise`: the step's own peak above its starting level (what a bigger batch must fit),
    from the allocator on CUDA, from the profiler's allocation records on a CPU."""
    device, cfg, case, keep = torch.device(spec["device"]), M.ModelConfig(**spec["cfg"]), spec["case"], spec["keep"]
    torch.set_num_threads(spec["threads"])
    dtype = distributed.resolve_dtype(spec["dtype"], device)
    if device.type == "cuda" and spec.get("gpu_gb"):  # --fit: as if the GPU had this much memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["gpu_gb"] * 2**30 / torch.cuda.mem_get_info()[1]))
    share, micro = spec.get("masked_pass_share", 1.0), spec.get("micro", 0)
    runner = runners.Ours(cfg, device, dtype, masked_pass_share=share, micro=micro) if spec["side"] == "ours" \
        else Peer(cfg, device, dtype)
    batch = runners.make_batch(cfg, spec["batch"], device)
    try:
        runner.step(case, keep, batch, 0)
        if device.type == "cuda":
            runners.sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            runner.step(case, keep, batch, 1)
            runners.sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            return {"oom": False, "peak": peak, "rise": peak - base}
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(case, keep, batch, 1)
    level = rise = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):  # bytes allocated minus freed, in order
        level += event.self_cpu_memory_usage
        rise = max(rise, level)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"oom": False, "peak": rss, "rise": rise}


def probe_fresh(spec):
    with mp.get_context("spawn").Pool(1) as pool:  # a new interpreter: the peak is this case's alone
        return pool.apply(probe, (spec,))


# ---------------------------------------------------------------------------------------------
# Memory: the largest micro-batch that fits a GPU
# ---------------------------------------------------------------------------------------------


def saved_bytes(cfg, loss_cfg, batch):
    """Bytes autograd keeps for backward through one paired step of `batch` pairs (bf16 autocast, on the CPU):
    every saved tensor's storage once (a saved-tensors hook), weights excluded. With --grad_ckpt a block saves only
    its input, which the hook sees too (tests/test_fit.py checks both against the profiler's allocations)."""
    runner = runners.Ours(cfg, torch.device("cpu"), torch.bfloat16)
    runner.objective.cfg = loss_cfg
    weights, kept = {p.untyped_storage().data_ptr() for p in runner.model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runner.autocast:
        runner.objective("pairs", runners.make_batch(cfg, batch, torch.device("cpu")), 0)
    return sum(kept.values())


def fit(args, cfg, device):
    """The largest micro-batch (pairs per GPU and forward) of the paired step, at the preset recipe's losses, that
    fits --gpu_gb, with and without --grad_ckpt. On a GPU: searched, doubling in a fresh process each until one
    runs out of memory. On a CPU: estimated, from the activations per pair (saved_bytes at 4 and 8 pairs; SDPA,
    as on a GPU), 16 bytes per parameter (fp32 weights and gradients, AdamW's two moments; / --world_size with --fsdp),
    2 for autocast's copies of the weights, and 10% of the memory left to the CUDA context and fragmentation."""
    recipe = train.RECIPES[args.preset]
    loss_cfg = losses.LossConfig(**{f.name: recipe[f.name] for f in fields(losses.LossConfig) if f.name in recipe})
    with torch.device("meta"):
        n_params = sum(p.numel() for p in M.FLAVA(cfg).parameters())
    print(f"\n{args.preset}: {n_params / 1e6:.0f}M parameters, {args.gpu_gb:g} GB per GPU, keep_ratio "
          f"{loss_cfg.keep_ratio:g}, masked_pass_share {loss_cfg.masked_pass_share:g}, "
          f"masked_pass {loss_cfg.masked_pass}\n")
    print("| --grad_ckpt | activations MiB / pair | largest micro-batch | with --fsdp over --world_size |\n"
          + "|---" * 4 + "|")
    rows = []
    for ckpt in (False, True):
        c = replace(cfg, grad_ckpt=ckpt, attn="sdpa")
        if device.type == "cuda":
            spec = {"cfg": asdict(c), "device": str(device), "dtype": args.dtype, "threads": args.threads, "keep":
                    loss_cfg.keep_ratio, "masked_pass_share": loss_cfg.masked_pass_share, "side": "ours",
                    "case": "pairs", "gpu_gb": args.gpu_gb}
            b, largest = 8, 0
            while not probe_fresh({**spec, "batch": b})["oom"]:
                largest, b = b, 2 * b
            row = {"grad_ckpt": ckpt, "per_pair_mib": None, "largest": largest, "largest_fsdp": None}
        else:
            per_pair = (saved_bytes(c, loss_cfg, 8) - saved_bytes(c, loss_cfg, 4)) / 4
            room = [0.9 * args.gpu_gb * 1e9 - n_params * (16 / w + 2) for w in (1, args.world_size)]
            row = {"grad_ckpt": ckpt, "per_pair_mib": per_pair / 2**20, "largest": int(room[0] // per_pair),
                   "largest_fsdp": int(room[1] // per_pair)}
        rows.append(row)
        print(f"| {ckpt} | {row['per_pair_mib'] or 0:.0f} | {row['largest']} | {row['largest_fsdp']} |")
    if device.type != "cuda":
        print("\nCPU estimate: measured activations, computed weights and optimizer state (see bench.fit)")
    with open(args.json, "w") as f:
        json.dump({"preset": args.preset, "gpu_gb": args.gpu_gb, "device": str(device), "rows": rows}, f, indent=1)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, text in [
            ("preset", "small", "model preset: tiny | small | base"),
            ("batch", "32", "samples per step, or 'max' (CUDA: doubled until the joint step runs out of memory)"),
            ("dtype", "auto", "auto | fp16 | bf16 | fp32 (auto: as train.py)"),
            ("device", "auto", "auto | cpu | cuda (auto: cuda when available)"),
            ("threads", torch.get_num_threads(), "CPU threads (1 on a machine shared with other jobs)"),
            ("steps", 10, "timed steps per case"), ("warmup", 3, "untimed steps per case before them"),
            ("cases", "contrastive,pairs,images,texts", "which steps to time"),
            ("keep", "1.0,0.5,0.25", "FLIP keep ratios of the contrastive pass"),
            ("pair_keep", "1.0,0.5", "FLIP keep ratios of the full paired step"),
            ("mem", "true", "measure memory, in a fresh process per case: true | false"),
            ("masked_pass_share", 1.0, "share of a paired batch's rows in the masked pass (1.0 = FLAVA; tiny: 0.5)"),
            ("micro", 0, "also time the paired step in micro-batches of this many pairs (GradCache; 0 = not)"),
            ("gpu_gb", 80.0, "--fit: GPU memory in GB"), ("world_size", 8, "--fit: processes that --fsdp shards over"),
            ("precision_steps", 300, "--precision: steps of each short train.py run"),
            ("json", "bench.json", "where to write the results")]:
        p.add_argument(f"--{flag}", type=type(default), default=default, help=text)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ModelConfig overrides, e.g. text_len=64")
    p.add_argument("--peer", action="store_true", help="also time Hugging Face's FlavaForPreTraining (transformers)")
    p.add_argument("--compile", action="store_true", help="torch.compile our step (the peer stays eager)")
    p.add_argument("--ablate", action="store_true", help="run the papers' ablations (trains 9 models; see ablations.py)")
    p.add_argument("--ablate_dir", default="runs/ablate", help="where the ablation runs go")
    p.add_argument("--ablate_steps", type=int, default=0, help="joint steps of each ablation run (0: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="the ablation runs' seed")
    p.add_argument("--fit", action="store_true", help="the largest micro-batch that fits --gpu_gb (see fit())")
    p.add_argument("--precision", action="store_true", help="GPU: fp16 beside bf16 (see ablations.precision)")
    try:  # a renamed flag's old name works for one release, as in train.py
        return p.parse_args(cli.new_flag_names(sys.argv[1:] if argv is None else argv, "bench.py"))
    except ValueError as e:
        p.error(str(e))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ablate:
        return ablations.ablate(args)
    if args.precision:
        return ablations.precision(args)
    try:
        device = distributed.pick_device(args.device)
    except ValueError as e:
        raise SystemExit(f"bench.py: {e}") from None
    sets = dict(kv.split("=", 1) for kv in args.set)
    kinds = {k: type(getattr(M.ModelConfig, k)) for k in sets}
    cfg = M.ModelConfig.from_preset(args.preset, **{k: v == "true" if kinds[k] is bool else kinds[k](v)
                                                    for k, v in sets.items()})
    if args.fit:
        return fit(args, cfg, device)
    jobs = timing_jobs(args)
    spec = {"cfg": asdict(cfg), "device": str(device), "dtype": args.dtype, "threads": args.threads,
            "masked_pass_share": args.masked_pass_share, "micro": args.micro}
    B = largest_batch(spec, device) if args.batch == "max" else int(args.batch)
    mem = {j: probe_fresh({**spec, "side": j[0], "case": j[1], "keep": j[2], "batch": B})
           for j in tqdm(jobs, desc="memory")} if args.mem == "true" else {}
    dtype = distributed.resolve_dtype(args.dtype, device)
    sides = {"ours": runners.Ours(cfg, device, dtype, args.compile, args.masked_pass_share, args.micro)}
    if any(side == "peer" for side, _, _ in jobs):
        sides["peer"] = Peer(cfg, device, dtype)
    wall = time_interleaved(sides, jobs, runners.make_batch(cfg, B, device), args.warmup, args.steps, device)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    cpuinfo = open("/proc/cpuinfo").read().splitlines() if sys.platform == "linux" else []
    cpu = next((line.split(":")[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    info = {"gpu": gpu, "cpu": cpu, "threads": args.threads, "torch": torch.__version__}
    print(f"\n{args.preset} preset{' ' + str(sets) if sets else ''}, batch {B}, {str(dtype)[6:]}"
          f"{', compiled' if args.compile else ''} on {gpu or cpu + ' (' + str(args.threads) + ' threads)'}, "
          f"torch {torch.__version__}: median of {args.steps} interleaved steps after {args.warmup} warm-up")
    rows = timing_table(cfg, sides, wall, mem, B, args.masked_pass_share, peak)
    checks = goal_checks(wall, mem, rows, args.micro)
    if "peer" in sides:
        n = {k: sum(q.numel() for q in r.model.parameters()) / 1e6 for k, r in sides.items()}
        print(f"\nparameters: nanoFLAVA {n['ours']:.1f}M, HF FlavaForPreTraining {n['peer']:.1f}M (codebook not built)")
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "machine": info, "model": asdict(cfg), "dtype": str(dtype), "batch": B,
                   "results": rows, "checks": checks}, f, indent=1)
    print(f"wrote {args.json}")
    return rows, checks


def timing_jobs(args):
    """The (side, case, keep) jobs --cases, --keep, --pair_keep, --micro and --peer ask for."""
    cases = args.cases.split(",")
    jobs = [("ours", "contrastive", float(k)) for k in args.keep.split(",") if "contrastive" in cases]
    jobs += [("ours", "pairs", float(k)) for k in args.pair_keep.split(",") if "pairs" in cases]
    jobs += [("ours", "accum", float(k)) for k in args.pair_keep.split(",") if "pairs" in cases and args.micro]
    jobs += [("ours", c, 1.0) for c in ("images", "texts") if c in cases]
    if args.peer:
        try:
            import transformers  # noqa: F401
            jobs += [("peer", c, 1.0) for c in ("pairs", "images", "texts") if c in cases]
        except ImportError:
            print("note: transformers is not installed; the Hugging Face comparison is skipped")
    return jobs


def largest_batch(spec, device):
    """--batch max: double from 8 until the joint step no longer fits the GPU, each try in a fresh process."""
    if device.type != "cuda":
        raise SystemExit("--batch max finds the limit by running out of GPU memory: it needs --device cuda")
    B, b = None, 8
    while not probe_fresh({**spec, "side": "ours", "case": "pairs", "keep": 1.0, "batch": b})["oom"]:
        B, b = b, 2 * b
    if B is None:
        raise SystemExit("not even a batch of 8 fits the joint step")
    print(f"largest batch that fits the joint step (doubling from 8): {B}")
    return B


def time_interleaved(sides, jobs, batch, warmup, steps, device):
    """Wall time of each job's step, the jobs in a new random order every round (so that drift in the machine's
    speed falls on all of them alike) -> {job: [seconds after warm-up]}. A job out of memory is reported, not timed."""
    order, rng, wall = list(jobs), random.Random(0), {j: [] for j in jobs}
    for r in tqdm(range(warmup + steps), desc="rounds"):
        rng.shuffle(order)
        for job in list(order):
            runners.sync(device)
            t0 = time.perf_counter()
            try:
                sides[job[0]].step(job[1], job[2], batch, seed=r)
            except torch.cuda.OutOfMemoryError:  # e.g. the peer at our largest batch
                order.remove(job)
                del wall[job]
                sides[job[0]].opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"\n{sides[job[0]].name} {job[1]} keep {job[2]:g}: out of memory at batch {len(batch['ids'])}")
                continue
            runners.sync(device)
            if r >= warmup:
                wall[job].append(time.perf_counter() - t0)
    return wall


def timing_table(cfg, sides, wall, mem, B, masked_pass_share, peak):
    """Print one row per job (median and range of ms/step, throughput, memory, TFLOP/s, MFU) -> the rows."""
    print("\n| model | step | keep | ms/step median [min-max] | samples/s | peak MiB (step rise) | TFLOP/s | MFU |\n"
          + "|---" * 8 + "|")
    rows = []
    for (side, case, keep), t in wall.items():
        med, m = statistics.median(t), mem.get((side, case, keep), {})
        tflops = runners.case_flops(cfg, case, keep, masked_pass_share) * B / med / 1e12
        rows.append({"model": sides[side].name, "case": case, "keep": keep, "batch": B, "ms": [1e3 * x for x in t],
                     "ms_median": 1e3 * med, "samples_per_s": B / med, "tflops": tflops,
                     "mfu": tflops / peak if peak else None, "oom": m.get("oom", False),
                     "peak_mib": m.get("peak", 0) / 2**20, "rise_mib": m.get("rise", 0) / 2**20})
        mem_txt = "OOM" if m.get("oom") else f"{m['peak'] / 2**20:.0f} ({m['rise'] / 2**20:.0f})" if m else "-"
        print(f"| {sides[side].name} | {case} | {keep:g} | {1e3 * med:.0f} [{1e3 * min(t):.0f}-{1e3 * max(t):.0f}] | "
              f"{B / med:.1f} | {mem_txt} | {tflops:.3f} | {'-' if peak is None else f'{100 * tflops / peak:.1f}%'} |")
    return rows


def goal_checks(wall, mem, rows, micro):
    """The project's speed and memory goals (GOALS: ratios of interleaved step times; FLIP's memory; MFU), each
    with its measured value, printed as a table -> the checks."""
    checks = [{"name": n, "value": statistics.median(x / y for x, y in zip(wall[a], wall[b])), "goal": g, "op": ">="}
              for n, a, b, g in GOALS if a in wall and b in wall]
    for k in [k for _, case, k in wall if case == "accum" and ("ours", "pairs", k) in wall]:
        ratio = statistics.median(x / y for x, y in zip(wall["ours", "accum", k], wall["ours", "pairs", k]))
        checks.append({"name": f"GradCache: paired step at keep {k:g}, time in micro-batches of {micro} / in one",
                       "value": ratio, "goal": None, "op": ">="})
    m1, m5 = mem.get(("ours", "contrastive", 1.0), {}), mem.get(("ours", "contrastive", 0.5), {})
    if m1.get("rise") and m5.get("rise"):
        checks += [{"name": f"memory: contrastive pass {k}, keep 0.5 / 1.0", "value": m5[k] / m1[k], "goal": 0.6,
                    "op": "<="} for k in ("rise", "peak")]
    checks += [{"name": f"MFU: {r['case']} keep {r['keep']:g}", "value": r["mfu"], "goal": 0.4, "op": ">="}
               for r in rows if r["mfu"] and r["model"] == "nanoFLAVA" and r["case"] == "pairs" and r["keep"] == 1.0]
    print("\n| target | measured | goal | met |\n|---|---|---|---|")
    for c in checks:
        if c["goal"] is not None:
            c["met"] = c["value"] >= c["goal"] if c["op"] == ">=" else c["value"] <= c["goal"]
        goal, met = f"{c['op']} {c['goal']}" if c["goal"] else "-", {True: "yes", False: "no"}.get(c.get("met"), "-")
        print(f"| {c['name']} | {c['value']:.2f}{'' if c['name'].startswith('MFU') else 'x'} | {goal} | {met} |")
    return checks


if __name__ == "__main__":
    main()
