"""Devices and processes: which device a run uses, the process group torchrun starts, and the
few collectives training needs. train.py and hellaswag.py both start here.

    rank, world, device = setup("auto", "bf16")   # under torchrun: NCCL on CUDA, gloo on CPU
    ...
    teardown()
"""
import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def pick_device(name):
    """The device for --device: "auto" is the best one here (cuda, then mps, then cpu); a named one
    must exist here, else a ValueError says so in one line."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        return next(n for n, ok in available.items() if ok)
    if name not in available:
        raise ValueError(f"--device {name}: use auto, cpu, cuda or mps (torchrun picks the GPU of "
                         "each rank)")
    if not available[name]:
        raise ValueError(f"--device {name}: this machine has no {name.upper()} device that torch "
                         f"{torch.__version__} can use; use --device cpu or auto")
    return name


def setup(device_arg, precision="bf16"):
    """(rank, world, device). Under torchrun (RANK and WORLD_SIZE set) this joins the process
    group: NCCL on CUDA, gloo on CPU; each rank takes the GPU of its LOCAL_RANK. On CUDA, TF32
    matmuls go with bf16 and stay off for fp32 (the authors' precision)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    name = pick_device(device_arg)
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = precision == "bf16"
        torch.backends.cudnn.allow_tf32 = precision == "bf16"
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world):
    """Wait for every rank (e.g. while rank 0 downloads); nothing to wait for alone."""
    if world > 1:
        dist.barrier()


def all_sum(t, world):
    """Sum a tensor over ranks, in place (SUM, not AVG: gloo has no AVG)."""
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(module, world, device):
    """DDP around the module under torchrun, the module itself alone. DDP registers the
    parameters that require grad when it is built: wrap again whenever they change."""
    if world == 1:
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def autocast(device, precision="bf16"):
    """bf16 autocast on CUDA (no grad scaler needed) unless fp32 is asked for; fp32 elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and precision == "bf16")


def check_fits(cfg, device):
    """Refuse a model whose fp32 weights, gradients and two AdamW moments (16 bytes a parameter)
    exceed the device's memory, before trying to build it."""
    d, L = cfg.n_embd, cfg.n_layer
    params = L * (12 * d * d + 13 * d) + (cfg.vocab_size + cfg.block_size + 2) * d
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if 16 * params > total:
        raise ValueError(f"a model of {L} layers of width {d} has {params / 1e9:,.1f}B parameters "
                         f"and needs {16 * params / 2**30:,.0f} GiB for weights, gradients and "
                         f"AdamW; {device} has {total / 2**30:,.0f} GiB: "
                         "lower --n-layer or --n-embd")


def teardown():
    """Leave the process group last. The DDP wrappers (their reducers hold the group) sit in
    reference cycles that only the garbage collector frees: freed after destroy_process_group,
    gloo's worker thread can deadlock against the GIL and the process never exits. So collect
    them first."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
