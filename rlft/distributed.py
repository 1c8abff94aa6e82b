"""Processes, and the sharded base under FSDP2: what PPO needs beyond one process (accelerate does the rest).

`accelerate launch --config_file configs/accelerate/fsdp.yaml` shards every decoder layer with FSDP2's
`fully_shard` (accelerate's own `fsdp2_prepare_model`): each process keeps 1/N of the frozen base and of
the adapters, gathers a layer's parameters just for its forward and backward, and reduce-scatters the
LoRA gradients. The reference is the same sharded weights with the adapter off, and generate() runs on
the shards too: each decoder layer is gathered for its step and freed after it (so every process runs
the same number of decoding steps: `synced_gpus`), and no process ever holds the whole base; or, with
`ppo.gather_for_generation`, on the whole policy gathered once (`gathered`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from rlft.models import default_device


def accelerator():
    """accelerate's Accelerator for this process (PPO's), FSDP on CPU processes too: see `fsdp_on_cpu`."""
    from accelerate import Accelerator

    return fsdp_on_cpu(Accelerator(cpu=default_device().type == "cpu"))


def fsdp_on_cpu(accelerator):
    """Switch a CPU process group that `accelerate launch` asked to shard to FSDP; return the accelerator.

    accelerate enables FSDP only where a GPU backend runs (`AcceleratorState` keeps a CPU process group as
    MULTI_CPU even when the launcher set ACCELERATE_USE_FSDP); PyTorch's FSDP2 itself runs over gloo. Setting
    the state to FSDP with the launcher's own plugin lets every CPU test take accelerate's FSDP2 path, the one
    GPUs take. (The state is shared by every Accelerator of the process, the HF Trainer's included.)
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_requested and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        accelerator.state.distributed_type = DistributedType.FSDP
        # mirrored into the process state, as AcceleratorState does itself: every later AcceleratorState() copies it
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def end_process_group(finished: bool = False) -> None:
    """Destroy `accelerate launch`'s process group, if this process joined one, before the interpreter exits;
    when the run `finished` on every process, after they all get here (no process tears down its end of the
    group while another still works: the main process saves last).

    Left to interpreter teardown, gloo's worker threads can still hold work and the process aborts ("terminate
    called without an active exception") after its run has finished and saved.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of `accelerate launch`'s processes (or the only process): the one that writes run files.
    Read from the launcher's environment, so a stage can claim its output_dir before any process group."""
    return int(os.environ.get("RANK", "0")) == 0


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one: an all-gather for a DTensor, so every process must call it."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """`module.state_dict()` entries whose name passes `keep`, gathered whole (collective under FSDP)."""
    return {name: full_tensor(value).detach().cpu() for name, value in module.state_dict().items() if keep(name)}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself when not sharded)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def all_finite(tensors, accelerator) -> bool:
    """True if every process's (shards of) `tensors` are finite: the same answer on every process.
    One count and one reduce per call (it runs every PPO step), not one sync per tensor."""
    bad = sum((~torch.isfinite(local(t))).sum() for t in tensors).float().to(accelerator.device)
    return accelerator.reduce(bad, "sum").item() == 0


def parameter_bytes(module) -> int:
    """Bytes of parameter and buffer storage this process holds for `module` (its shards under FSDP)."""
    storage = {}
    for tensor in map(local, [*module.parameters(), *module.buffers()]):
        storage[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storage.values())


@contextmanager
def gathered(model):
    """Every FSDP2 unit of `model` gathered whole and kept so until exit, then resharded: generate() inside
    runs with no collective per decoding step. Afterwards every unit reshards after its forward (FULL_SHARD
    throughout: accelerate's own setup kept the embedding/LM-head unit and the root gathered from forward to
    backward; FSDP2 offers no way to read a unit's setting back). A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
