"""Processes and devices: world size and rank, the Accelerator every hand-written loop uses, precision, and the
checks that all ranks still train one model (finite signals, parameter checksums)."""

from __future__ import annotations

import os

from pipeline.config import StageFailed


def world_size() -> int:
    """Processes in this launch (1 when not launched distributed); read from the launcher's environment."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched distributed); read from the launcher's environment, so it works
    before any Accelerator or process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def on_gpu() -> bool:
    """A CUDA device is there and the launch did not ask for the CPU."""
    import torch

    return torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")


def deepspeed_launch() -> bool:
    """The launch config chose DeepSpeed (accelerate launch sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")


def join_deepspeed_comm() -> None:
    """In a DeepSpeed launch on CPU, set up deepspeed.comm now (on a GPU Accelerate does it). A model that
    transformers builds while a ZeRO-3 config is active (trl's DPO reference, loaded from its path after the trl
    config exists) is partitioned at load by `deepspeed.zero.Init`, which reads the world size from deepspeed.comm:
    unset, it takes 1 and refuses the batch size ("train_batch_size is not equal to ... * world_size"). With
    torch.distributed already up, DeepSpeed adopts its process group; otherwise it starts one (gloo) that
    Accelerate adopts later."""
    if not deepspeed_launch() or world_size() == 1 or on_gpu():
        return
    from deepspeed import comm

    if not comm.is_initialized():
        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed_precision ("no", "bf16", "fp16") for a config's `precision` (auto, fp32, bf16, fp16); the
    one rule for our loops and trl's trainers. auto: under DeepSpeed bf16 on a GPU that has it (the launch's JSON
    holds the precision, and Accelerate reports "no" for it); else the launch config's mixed_precision if it set
    one; else bf16 on a GPU that has it, and fp32 on a CPU (bf16 matmuls there are ~200x slower)."""
    import torch

    if precision == "fp32":
        return "no"
    if precision != "auto":
        return precision
    gpu_default = "bf16" if on_gpu() and torch.cuda.is_bf16_supported() else "no"
    if deepspeed_launch():
        return gpu_default
    return os.environ.get("ACCELERATE_MIXED_PRECISION") or gpu_default


def weights_dtype(precision: str):
    """The dtype to load weights in for inference-only work (sampling, evaluation): bf16 where resolve_precision
    picks it, else fp32."""
    import torch

    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32


def make_accelerator(precision: str, project_dir, report_to: list[str] | None = None, accumulation: int = 1):
    """An Accelerator with the launch config's settings; gloo on CPU (DeepSpeed would otherwise pick a GPU
    backend and every rank would silently act as rank 0)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    on_cpu = not on_gpu()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu and world_size() > 1 else []
    # cpu=True would turn a DeepSpeed launch into plain MULTI_CPU; DeepSpeed finds the CPU by itself.
    return Accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=resolve_precision(precision),
        cpu=on_cpu and not deepspeed_launch(),
        log_with=report_to or None,
        project_dir=str(project_dir),
        kwargs_handlers=handlers,
    )


def all_finite(accelerator, *values) -> bool:
    """True when every value (tensors or floats; None is ignored) is finite on every rank: one all-reduce, so all
    ranks agree and stop together."""
    import torch

    bad = torch.zeros((), device=accelerator.device)
    for value in values:
        if value is not None:
            bad = bad + (~torch.isfinite(torch.as_tensor(value, device=accelerator.device))).float().sum()
    return accelerator.reduce(bad, "sum").item() == 0


def param_checksums(accelerator, model) -> list[float] | None:
    """Sum of all parameters on each rank (every rank must call it), or None where parameters are sharded (ZeRO-3,
    FSDP: each rank holds a different shard, so the sums say nothing)."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        return None
    total = sum(p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters())
    return accelerator.gather(total.reshape(1).to(accelerator.device)).tolist()


def check_same_parameters(checksums: list[float] | None) -> None:
    """Stop, before anything is saved, when the ranks ended with different weights: gradients were not averaged,
    and the saved model would be rank 0's alone."""
    if checksums and len(set(checksums)) > 1:
        raise StageFailed(
            f"parameters differ across ranks after training ({checksums}): the processes did not "
            "train as one model; check the launch config (see launch/README.md)"
        )


def launch_facts(accelerator, model) -> dict:
    """How the run was laid out, for the manifest: processes, Accelerate's distributed type, ZeRO stage, mixed
    precision, and each rank's parameter checksum, checked equal (check_same_parameters). Every rank must call it,
    after training and before saving."""
    checksums = param_checksums(accelerator, model)
    check_same_parameters(checksums)
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": getattr(accelerator.state.deepspeed_plugin, "zero_stage", None),
        "mixed_precision": str(accelerator.mixed_precision),
        "param_checksum_by_rank": checksums,
    }


def on_every_rank(items: list, fn, accelerator) -> list:
    """`fn(share) -> one result per item` over this process's share of `items` (every world-th), results gathered in
    item order on every process. The shares are padded to one length with copies of an item, so that a `fn` that
    batches by count makes the same forward calls on every process: under ZeRO-3 each forward gathers the
    parameters collectively, and a process that made one call fewer would leave the others waiting (issue 19:
    reward hung after training). Generation needs more: its number of steps depends on when answers stop."""
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1:
        return list(fn(items))
    mine = list(range(rank, len(items), world))
    length = -(-len(items) // world)
    padded = mine + [mine[0] if mine else 0] * (length - len(mine))
    results = list(fn([items[i] for i in padded]))[: len(mine)]
    return [result for _, result in sorted(gather_object(list(zip(mine, results, strict=True))))]
