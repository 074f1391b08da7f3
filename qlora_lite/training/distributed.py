"""More than one process: who this process is, launch checks, DDP or FSDP2 around the model, and collectives.

`torchrun --standalone --nproc_per_node N -m qlora_lite train RECIPE` (or `accelerate launch
--multi_gpu --num_processes N -m qlora_lite train RECIPE`) starts N copies of fit(). Each one
reads the same recipe and data, and takes its own share of every optimizer step's examples: at
micro-batch index i the N processes together take the examples a single process would take
with a micro-batch of N x micro_batch_size, rank r the r-th slice. The engines are torch's own:

- `ddp` (DistributedDataParallel, through accelerate): each process holds the whole 4-bit base
  and the adapter; gradients are averaged after the step's last micro-batch.
- `fsdp` (FSDP2, `fully_shard`): each decoder layer, the embeddings and the rest are sharded
  across the processes, the 4-bit weights too. bitsandbytes keeps a 4-bit weight as packed
  bytes; FSDP shards a parameter by its elements, so the bytes are stored as the compute dtype
  (`bnb_4bit_quant_storage`) and FSDP's `param_dtype` is that same dtype, so that gathering a
  weight never converts its bytes. Only LoRA runs sharded, with torch's AdamW (bitsandbytes'
  8-bit optimizers cannot take the sharded DTensor parameters).

Both engines act in hooks around a module's forward, so they wrap objective.TrainingModule, whose
forward computes the loss (or generates).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import RecipeConfig
from ..errors import DistributedError, QloraLiteError
from ..methods.prompt_tuning import unwrap_base
from .objective import TrainingModule

# bitsandbytes optimizers keep their state in plain tensors beside each parameter; under FSDP2
# the parameters are DTensors and their step fails ("got mixed torch.Tensor and DTensor").
FSDP_OPTIMIZERS = ("adamw",)


@dataclass(frozen=True)
class World:
    """This process's place in the job, as the launcher (torchrun, accelerate launch) set it."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


def read_world() -> World:
    """WORLD_SIZE, RANK and LOCAL_RANK from the environment; one process when they are not set."""
    return World(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)))


def is_sharded(cfg: RecipeConfig, world: World) -> bool:
    """FSDP only shards with more than one process; one process runs as it always did."""
    return world.is_distributed and cfg.dist.strategy == "fsdp"


# ---------------------------------------------------------------------------- checks before anything loads


def check_recipe(cfg: RecipeConfig, world: World, mixed_precision: str, compute_dtype: torch.dtype, prequantized_storage: str | None) -> None:
    """Refuse, before the model loads, the settings FSDP2 cannot train with; nothing to check for ddp or one process."""
    if cfg.dist.cpu_offload and cfg.dist.strategy != "fsdp":
        raise DistributedError("dist.cpu_offload moves FSDP's shards to the CPU; it needs dist.strategy=fsdp (DDP keeps the whole model on every GPU)")
    if not is_sharded(cfg, world):
        return
    if cfg.method != "lora":
        raise DistributedError(f"dist.strategy fsdp trains method lora only, not {cfg.method}; use dist.strategy=ddp for it")
    if cfg.train.optimizer not in FSDP_OPTIMIZERS:
        raise DistributedError(
            f"train.optimizer {cfg.train.optimizer} cannot step FSDP2's sharded parameters (bitsandbytes' optimizers "
            "keep plain tensors beside DTensors); set train.optimizer=adamw, whose fp32 state is sharded across the processes too"
        )
    if mixed_precision == "fp16":
        raise DistributedError(
            "dist.strategy fsdp with fp16 mixed precision (loss scaling) is not supported; use a GPU with bf16, "
            "train.mixed_precision=no, or dist.strategy=ddp"
        )
    autocast = {"bf16": torch.bfloat16}.get(mixed_precision)
    if autocast is not None and autocast != compute_dtype:
        raise DistributedError(
            f"dist.strategy fsdp computes in one dtype, but train.mixed_precision is {mixed_precision} and "
            f"quant.compute_dtype resolves to {str(compute_dtype).removeprefix('torch.')}; set quant.compute_dtype=bfloat16 "
            "(or train.mixed_precision=no)"
        )
    if prequantized_storage is not None and prequantized_storage.removeprefix("torch.") != str(compute_dtype).removeprefix("torch."):
        raise DistributedError(
            f"{cfg.model.name_or_path} is a pre-quantized 4-bit checkpoint stored as {prequantized_storage}, which FSDP "
            f"cannot shard as {str(compute_dtype).removeprefix('torch.')}; point model.name_or_path at the unquantized "
            "checkpoint (qlora-lite quantizes it as it loads), or use dist.strategy=ddp"
        )


def check_launch(processes_seen: int, world: World) -> None:
    """WORLD_SIZE says N processes, but accelerate sees a different number: N runs would each train alone."""
    if world.size != processes_seen:
        raise DistributedError(
            f"the launcher started {world.size} processes (WORLD_SIZE={world.size}) but this one sees {processes_seen}: "
            f"each would train alone and they would all write to output_dir. Launch with `torchrun --standalone "
            f"--nproc_per_node {world.size} -m qlora_lite train ...` or `accelerate launch --multi_gpu --num_processes "
            f"{world.size} -m qlora_lite train ...` (on CPUs too; `accelerate launch --cpu` starts one process)"
        )


def describe_device(device: torch.device) -> tuple[str, str]:
    """(host, device) as the device check compares them: the kind of device, and which one on its host."""
    if device.type == "cuda":
        return socket.gethostname(), f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return socket.gethostname(), device.type


def check_devices(descriptions: list[tuple[str, str]]) -> None:
    """Every process on the same kind of device, and no two on one GPU (the rank's LOCAL_RANK picks it)."""
    kinds = sorted({device.split(":")[0] for _, device in descriptions})
    if len(kinds) > 1:
        where = ", ".join(f"rank {rank}: {device}" for rank, (_, device) in enumerate(descriptions))
        raise DistributedError(
            f"the processes run on different kinds of device ({where}); give every process a GPU "
            "(CUDA_VISIBLE_DEVICES) or run all of them on CPUs"
        )
    seen: dict[tuple[str, str], int] = {}
    for rank, description in enumerate(descriptions):
        if description[1].startswith("cuda") and description in seen:
            raise DistributedError(
                f"ranks {seen[description]} and {rank} both run on {description[1]} of {description[0]}; start them "
                "with torchrun or accelerate launch, which give each process its LOCAL_RANK's GPU"
            )
        seen[description] = rank


def select_device(world: World) -> torch.device:
    """The GPU of this process's LOCAL_RANK (set as the current one), else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on GPUs that have it, fp16 on older GPUs, none on the CPU.

    Beside select_device, since it follows the device this process got; evaluation reads it too.
    """
    if name != "auto":
        return name
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ---------------------------------------------------------------------------- the engines


def shard_with_fsdp(module: TrainingModule, dtype: torch.dtype, cpu_offload: bool = False) -> None:
    """FSDP2 over each decoder layer, the input embeddings (unless tied to the head) and the root.

    param_dtype equals the dtype the 4-bit bytes are stored as, so gathering a packed weight
    never converts it; gradients are reduced in fp32. cpu_offload: the shards (and so the
    optimizer's step) live in CPU RAM; each unit is copied to the GPU for its all-gather.
    """
    base = unwrap_base(module.model)
    for layer in base.get_decoder().layers:
        shard_unit(layer, dtype, cpu_offload)  # already sharded when the base was loaded layer by layer (layerwise.py)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or embeddings.weight is not head.weight:  # a tied head shares the weight: both stay in the root
        shard_unit(embeddings, dtype, cpu_offload)
    shard_unit(module, dtype, cpu_offload)


def shard_unit(module: nn.Module, dtype: torch.dtype, cpu_offload: bool = False) -> None:
    """fully_shard one unit (a decoder layer, the embeddings, the root) with the run's policies, unless it is sharded already."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if isinstance(module, FSDPModule):
        return
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32), offload_policy=offload)


@contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Average gradients across processes in this backward (the step's last micro-batch) or not (the others)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(module, "no_sync") and not enabled:  # DDP
        with module.no_sync():
            yield
    else:
        yield


# ---------------------------------------------------------------------------- collectives (no-ops on one process)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the processes, in fp64 (target counts, loss sums, tokens)."""
    if not is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """obj from every process, in rank order (one process: [obj])."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(params: list[torch.Tensor]) -> None:
    """Rank 0's values into every process: all start the adapter from the same weights, whatever their seeds.

    A parameter FSDP2 has sharded already (a DTensor: each process holds another part) is left as it is:
    it was broadcast whole before its unit was sharded (layerwise.py).
    """
    if not is_initialized():
        return
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for param in params:
            if not isinstance(param, DTensor):
                dist.broadcast(param.data, src=0)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


# How long a process other than rank 0 waits before it exits on an error rank 0 reports: torchrun stops
# every process as soon as one ends (it looks every 0.1 s), and rank 0's one line must get out first.
# Not a barrier: a process leaving a gloo barrier first may close it under the other (a traceback again).
RANK_ZERO_GRACE_S = 2.0


def wait_for_rank_zero_to_report() -> None:
    time.sleep(RANK_ZERO_GRACE_S)


@contextmanager
def one_error_for_all(world: World) -> Iterator[None]:
    """Every process runs the block; when any raises a QloraLiteError, every process raises one, and rank 0's alone is printed.

    A recipe, data or checkpoint error found on one process would otherwise leave the others
    waiting at their next collective until the first one's exit breaks it ("Connection closed by
    peer", a traceback per process). After the block the processes compare outcomes (one
    all-gather): the first error, by rank, is the run's; rank 0 raises it (a process's own error
    keeps its class; another's is named with its rank), the others raise it quietly.

    The block must make no collective call: a process that raised skips the rest of it, and its
    all-gather here would meet another process's collective inside the block.
    """
    error: QloraLiteError | None = None
    try:
        yield
    except QloraLiteError as err:
        if not is_initialized():
            raise
        error = err
    if not is_initialized():
        return
    reports = gather_objects(None if error is None else str(error))
    failed = next((rank for rank, report in enumerate(reports) if report is not None), None)
    if failed is None:
        return
    if failed == world.rank and error is not None:
        agreed = error
    else:
        agreed = DistributedError(reports[failed] if failed == 0 else f"rank {failed}: {reports[failed]}")
    # Rank 0's error reaches cli.main, which prints its one line; the others stay quiet and give
    # that line time to get out before their exit makes torchrun stop everyone.
    agreed.quiet = not world.is_main
    if not world.is_main:
        wait_for_rank_zero_to_report()
    raise agreed


# ---------------------------------------------------------------------------- sharded state, whole on rank 0


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def gather_trainable_state(module: TrainingModule) -> dict[str, torch.Tensor]:
    """The trained tensors, whole, by their name in the inner model; every process must call it, rank 0 gets them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_state_dict_options(ignore_frozen_params=True))
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}


def gather_optimizer_state(module: TrainingModule, optimizer) -> dict:
    """The optimizer's state, whole and keyed by parameter name (so any number of processes can load it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_state_dict_options())


def load_optimizer_state(module: TrainingModule, optimizer, state: dict) -> None:
    """gather_optimizer_state's dict back into this process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
