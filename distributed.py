"""Devices, processes and precision: what lets one train.py run on a laptop, one GPU or many nodes.

Companion of train.py and eval.py (the device and precision rules), of losses.py and model.py (is this one
process or several), and of checkpoints.py (bytes broadcast from rank 0). torchrun sets RANK, LOCAL_RANK and
WORLD_SIZE; without them a run is one process. NCCL on CUDA, gloo on a CPU, so that every multi-process path
is testable on a laptop. FSDP2 (`shard`) keeps DDP's numerics: fp32 master weights, an fp32 residual stream,
autocast choosing each op's precision. Exercise it with
`python -m pytest tests/test_fsdp.py tests/test_distributed.py tests/test_reliability.py -k "gpu or device"`.
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

# ---------------------------------------------------------------------------------------------
# One process or several; the device; the precision
# ---------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    """(this process's rank, the number of processes): (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device: cpu, or cuda:LOCAL_RANK (one GPU per torchrun process); auto = cuda when available."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={name!r} must be auto, cpu or cuda")
    if name == "cpu" or name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError(f"device=cuda, but this torch ({torch.__version__}) sees no GPU; use --device cpu")
    if local_rank >= n:  # rather than asking for a GPU that is not there
        raise ValueError(f"device={name}: process {local_rank} on this node needs cuda:{local_rank}, but {n} GPU(s) "
                         "are visible; start at most that many processes per node (torchrun --nproc_per_node) "
                         "or use --device cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto"):
    """-> (rank, local rank, world size, device); the process group is joined under torchrun."""
    if "RANK" not in os.environ:
        return 0, 0, 1, pick_device(device)
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return rank, local_rank, world_size, device


def resolve_dtype(name: str, device) -> torch.dtype:
    """--dtype -> the autocast precision: auto = fp16 on CUDA (with a GradScaler, as FLAVA trained), bf16 on a CPU
    with native bf16 (AVX512-BF16 / AMX: ~2x faster here), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            name = "fp16"
        else:
            name = "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"--dtype={name!r} must be one of auto, fp16, bf16, fp32")
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype=fp16 needs CUDA; use bf16 or fp32 on a CPU")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def autocast(device, dtype):
    """AMP written once: every forward of training and evaluation runs under this context (fp32: autocast off)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def out_of_memory(cfg, world_size):
    """What to say when a forward + backward runs out of GPU memory."""
    local = cfg.batch_size // world_size
    micro = cfg.micro_batch if 0 < cfg.micro_batch < local else local
    return (f"train.py: out of GPU memory in the forward + backward of a micro-batch of {micro} rows per process "
            f"(--batch_size {cfg.batch_size} over {world_size} process(es), --micro_batch {cfg.micro_batch}). "
            "What helps: a smaller --micro_batch dividing the process's batch (the step stays the same: gradients "
            "accumulate), --grad_ckpt true (blocks recomputed in backward: ~30% more compute), --fsdp true (weights, "
            f"gradients and AdamW state sharded). `python bench.py --fit --preset {cfg.preset} --gpu_gb N` tells "
            "which micro-batch fits.")


def broadcast_bytes(blob, rank, device, chunk=1 << 28):
    """Rank 0's bytes (a bytearray, or None) on every rank, in chunks through the process group."""
    size = torch.tensor([-1 if blob is None else len(blob)], device=device)
    dist.broadcast(size, 0)
    if size.item() < 0:
        return None
    buf = torch.frombuffer(blob, dtype=torch.uint8) if rank == 0 else torch.empty(size.item(), dtype=torch.uint8)
    for i in range(0, len(buf), chunk):
        part = buf[i: i + chunk].to(device)  # NCCL moves device tensors only; gloo's device is the CPU
        dist.broadcast(part, 0)
        buf[i: i + chunk] = part.cpu()
    return buf.numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# FSDP2: weights, gradients and AdamW state sharded over the ranks
# ---------------------------------------------------------------------------------------------


def shard(objective):
    """--fsdp, with FSDP2 (ZeRO-3, as FLAVA trained with FSDP): each transformer block, each encoder, then the rest
    (projections, heads) is a unit whose weights, gradients and AdamW state are sharded over the ranks and gathered
    only while it computes. The gathered weights stay fp32 (no param_dtype) and gradients are reduced in fp32:
    autocast decides each op's precision exactly as under DDP, so the residual stream, the position add and the
    embedding lookup stay fp32. (FSDP's param_dtype=bf16/fp16 would halve the all-gather's bytes, but it casts the
    weights themselves: every op autocast leaves alone, the residual adds included, would run in reduced precision,
    and in fp16 the residual stream would meet the 65,504 ceiling.) Not sharded: the frozen image tokenizer, and
    logit_scale (FSDP cannot shard a 0-d parameter; train.optimizer_step averages its gradient)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    m = objective.model
    for encoder in (m.image_encoder, m.text_encoder, m.mm_encoder):
        for block in encoder.transformer.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(encoder, mp_policy=policy)
    fully_shard(objective, mp_policy=policy, ignored_params={m.logit_scale, *objective.image_tokenizer.parameters()})
    register_fsdp_forward_method(objective, "contrastive_pass")  # gradcache.accumulate calls it outside forward
    return objective


def whole(t):
    """A tensor whole: an FSDP shard (DTensor) gathered, anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_states(model, optimizer=None):
    """The state dicts with every FSDP shard gathered into its whole tensor (a collective: every rank calls it), so a
    checkpoint is the same with or without FSDP, and eval, resume and another world size read it alike."""
    model_state = {k: whole(v) for k, v in model.state_dict().items()}
    if optimizer is None:
        return model_state
    optim_state = optimizer.state_dict()
    optim_state["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in optim_state["state"].items()}
    return model_state, optim_state


def load_optimizer(optimizer, state):
    """A checkpoint's (whole) optimizer state; under FSDP each tensor is cut to its parameter's shard."""
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in s.items():
                if k != "step":
                    s[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)  # this rank's part


def unsharded(model, device, fsdp, rank):
    """The model that rank 0 evaluates: itself, or under FSDP a whole copy (gathered: every rank calls this)."""
    if not fsdp:
        return model
    state = whole_states(model)
    if rank == 0:
        copy = type(model)(model.cfg).to(device)
        copy.load_state_dict(state)
        return copy
