"""The papers' ablations at small scale, run by `python bench.py --ablate`: what each objective and FLIP's masking
buy (learning, not speed), each row a train.py run evaluated by eval.py; and `python bench.py --precision`, fp16
beside bf16 on a GPU.

Companion of bench.py. FLAVA Table 4 (GC alone, + ITM and MMM, + unimodal MIM and MLM), FLAVA §3.2's global vs
local contrastive backprop, FLIP Table 1a/1e (keep 1.0 / 0.5 / 0.25 at equal wall-clock time, with and without
unmasked tuning). Rerunning resumes: a finished row is read back, a cut one continues with train.py --resume.

    python bench.py --ablate                 # ~45 minutes on 2 CPU cores; runs/ablate/ablation.json
    python bench.py --precision --preset tiny  # a GPU
"""
import json
import os
import statistics
import subprocess
import sys

import torch
from tqdm import tqdm

PAIRED_ONLY = ["--p_pairs", "1", "--p_images", "0", "--p_texts", "0"]
ABLATIONS = [  # (row, train.py flags, processes): equal steps, the default recipe otherwise
    ("GC only", PAIRED_ONLY + ["--itm_weight", "0", "--mmm_image_weight", "0", "--mmm_text_weight", "0"], 1),
    ("GC + ITM + MMM (FLAVA's paired objectives)", PAIRED_ONLY, 1),
    ("full FLAVA: + MIM and MLM batches (the default run)", [], 1),
    ("2 processes, global contrastive backprop (FLAVA)", ["--backprop", "global"], 2),
    ("2 processes, local contrastive backprop (CLIP)", ["--backprop", "local"], 2)]
FLIP_ROWS = [(0.5, False), (0.25, False), (0.5, True), (0.25, True)]  # keep 1.0 is the default row
COLUMNS = ("zeroshot_top1", "zeroshot_heldout_top1", "i2t_r1", "t2i_r1", "vqa_multimodal", "itm_auc", "itm_auc_hard",
           "mmm_attr_acc", "mmm_image_acc", "code_majority_acc")


def train_and_eval(out, flags, processes=1):
    """One run of train.py (under torchrun for several processes) and the full eval.py suite -> eval.json. Rerunning
    the ablation resumes it: a row cut short continues from its last checkpoint (--resume, the same flags, so the
    same run), a finished row is not trained again, and an evaluated one not evaluated again."""
    result, ckpt = os.path.join(out, "eval.json"), os.path.join(out, "ckpt.pt")
    if not (os.path.exists(result) and os.path.getmtime(result) > os.path.getmtime(ckpt)):
        launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                           "--standalone", f"--nproc_per_node={processes}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // processes))}
        subprocess.run([*launch, "train.py", "--out_dir", out, "--eval", "false", "--resume", *flags], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--skip_figures"], check=True,
                       stdout=subprocess.DEVNULL)
    with open(result) as f:
        return json.load(f)


def ms_per_step(out):
    """Median training time per step of a run, from its log (evaluation excluded)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return statistics.median(r["ms_per_step"] for r in map(json.loads, f) if r.get("stage") == "joint")


def ablate(args):
    """FLAVA Table 4 (GC alone, + ITM and MMM, + unimodal MIM and MLM), FLAVA §3.2's global vs local contrastive
    backprop, and FLIP Table 1a/1e (keep 1.0 / 0.5 / 0.25 at equal wall-clock time, with and without unmasked
    tuning) -> one table of held-out figures. FLIP's rows get the steps that fit the time the default row took,
    from each keep ratio's speed measured in a short run; unmasked tuning takes 10% of that time at keep 1.0."""
    seed, root, results = ["--seed", str(args.seed)], args.ablate_dir, {}
    steps = ["--steps", str(args.ablate_steps)] if args.ablate_steps else []
    for i, (row, flags, processes) in enumerate(tqdm(ABLATIONS, desc="ablations")):
        results[row] = train_and_eval(os.path.join(root, f"row{i}"), [*flags, *seed, *steps], processes)
    default = os.path.join(root, "row2")
    budget = ms_per_step(default) * results[ABLATIONS[2][0]]["step"]  # the default row's training time, ms
    image_tokenizer = ["--image_tokenizer_ckpt", os.path.join(default, "image_tokenizer.pt")]  # the same tokenizer: only the masking differs
    speed = {1.0: ms_per_step(default)}
    for keep in sorted({k for k, _ in FLIP_ROWS}):
        probe_dir = os.path.join(root, f"speed{keep}")
        if not os.path.exists(os.path.join(probe_dir, "log.jsonl")):  # measured once, also when the ablation resumes
            subprocess.run([sys.executable, "train.py", "--out_dir", probe_dir, "--keep_ratio", str(keep), "--steps",
                            "60", "--warmup", "10", "--log_every", "20", "--eval", "false", *image_tokenizer, *seed], check=True,
                           stdout=subprocess.DEVNULL)
        speed[keep] = ms_per_step(probe_dir)
    for keep, tuned in tqdm(FLIP_ROWS, desc="FLIP rows"):
        tune = round(0.1 * budget / speed[1.0]) if tuned else 0
        n = round((budget - tune * speed[1.0]) / speed[keep])
        row = f"FLIP keep {keep:g}, {n} steps{f' + {tune} unmasked' if tuned else ''} (equal time)"
        results[row] = train_and_eval(os.path.join(root, f"flip{keep}{'t' if tuned else ''}"),
                                      ["--keep_ratio", str(keep), "--steps", str(n), "--unmasked_steps", str(tune),
                                       *image_tokenizer, *seed])
    print(f"\nseed {args.seed}; training time of each FLIP row: {budget / 1e3:.0f} s; ms/step by keep ratio: "
          + ", ".join(f"{k:g}: {v:.0f}" for k, v in speed.items()))
    print("\n| run | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 1) + "|")
    for row, r in results.items():
        print(f"| {row} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in COLUMNS) + " |")
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump({"seed": args.seed, "budget_ms": budget, "ms_per_step": speed, "results": results}, f, indent=1)
    return results


# ---------------------------------------------------------------------------------------------
# A batch that fits (--fit), and fp16 beside bf16 (--precision)


def precision(args):
    """fp16 with its GradScaler beside bf16, on a GPU: the same short train.py run in each (its first
    --precision_steps joint steps), their median time per step and their losses side by side."""
    if not torch.cuda.is_available():
        print("--precision compares fp16 and bf16 on a GPU (fp16 autocast needs CUDA); no GPU here: skipped")
        return None
    runs = {}
    for dtype in ("fp16", "bf16"):
        out = os.path.join(args.ablate_dir, f"precision_{dtype}")
        subprocess.run([sys.executable, "train.py", "--preset", args.preset, "--dtype", dtype, "--out_dir", out,
                        "--steps", str(args.precision_steps), "--image_tokenizer_steps", "50", "--log_every", "1", "--eval",
                        "false", "--seed", str(args.seed), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "log.jsonl")) as f:
            runs[dtype] = [r for r in map(json.loads, f) if r.get("stage") == "joint"]
    ms = {d: ms_per_step(os.path.join(args.ablate_dir, f"precision_{d}")) for d in runs}
    print(f"\n{args.preset}: ms/step (median) fp16 {ms['fp16']:.0f}, bf16 {ms['bf16']:.0f}\n\n"
          "| step | fp16 total | bf16 total |\n|---|---|---|")
    for a, b in zip(runs["fp16"], runs["bf16"]):
        if a["step"] == 1 or a["step"] % max(1, args.precision_steps // 10) == 0:
            print(f"| {a['step']} | {a['total']:.4f} | {b['total']:.4f} |")
    return runs
