"""Several processes, one run: torchrun's ranks with DDP or FSDP2 computing one process's steps.

    torchrun --nproc_per_node 4 -m minidpo train --model DIR --data train.jsonl --out OUT [--parallel fsdp]

torchrun starts N processes and gives each RANK, LOCAL_RANK, WORLD_SIZE and a rendezvous
address; `Distributed.from_environment` joins them in one process group (NCCL on CUDA, rank
r on GPU LOCAL_RANK; gloo on the CPU). Without torchrun (WORLD_SIZE unset or 1) the same
code runs as one process and every collective below is the identity.

What the ranks share (minidpo.train uses each piece):
- Data: a global micro-batch is `batch_size x N` examples of the one-process order, and
  rank r takes the r-th `batch_size` of them (`shard`). A rank left without examples (a
  short last micro-batch) runs one example with weight 0, so every rank runs the same
  forwards and collectives.
- Loss: normalised by the pairs and tokens of the whole global step, summed over the ranks
  first (`sum`), so the gradients summed over the ranks are those of one process with the
  same global batch. DDP and FSDP2 average gradients over the ranks: each rank's loss is
  scaled by N to undo it.
- Wrapping (`wrap`): "ddp" (DistributedDataParallel) keeps a whole model on every rank and
  all-reduces the gradients of the trainable parameters: LoRA on a base that fits one
  device, the default with LoRA. "fsdp" (FSDP2) shards every parameter, the frozen base
  included: fully_shard on each decoder block, then on the root; the default for full
  fine-tuning and the way to bases too large for one device. The root is the module that
  computes the response log-probs (logprobs.SequenceLogprobs), so the embedding and lm_head
  are gathered for the whole of the loss.
- I/O: rank 0 alone logs and writes; what it writes is gathered from all ranks first as
  full tensors (`gather_state`), so a checkpoint holds the same files at any world size.
"""

from __future__ import annotations

import contextlib
import os
import re
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minidpo.device import resolve_device
from minidpo.errors import MiniDPOError, ParameterError

PARALLEL = ("ddp", "fsdp")


def world_size_from_environment() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where collectives put their tensors

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, requested_device: str | None = None) -> Distributed:
        """Join torchrun's process group (once per process); the device is this rank's."""
        device = resolve_device(requested_device)
        if world_size_from_environment() == 1:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def close(self) -> None:
        """Leave the process group (after the run's last collective)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, items: list, size: int) -> list:
        """This rank's `size` items of a global list of `size x world_size` (one process: all of them)."""
        return items[self.rank * size : (self.rank + 1) * size] if self.enabled else items

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (K,)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (one shape on all), stacked in rank order: (world_size, *t.shape)."""
        if not self.enabled:
            return t[None]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def is_main_process() -> bool:
    """Rank 0 of torchrun's ranks, or a process started without torchrun."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def rank_errors():
    """Under torchrun, one line per failing rank, naming it.

    A MiniDPOError gets the rank's name; a collective that fails because another rank
    stopped (its peer closed the connection) becomes one line saying so, not a traceback.
    torchrun then stops the remaining ranks.
    """
    world = world_size_from_environment()
    if world == 1:
        yield
        return
    tag = f"rank {os.environ.get('RANK', '?')} of {world}"
    try:
        yield
    except ParameterError as e:
        raise ParameterError(f"{tag}: {e}", *e.parameters) from None
    except MiniDPOError as e:
        raise MiniDPOError(f"{tag}: {e}") from None
    except RuntimeError as e:
        frames = traceback.extract_tb(e.__traceback__)
        if not any("torch/distributed/" in frame.filename.replace("\\", "/") for frame in frames):
            raise
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip() or type(e).__name__).splitlines()[0])  # no source path
        raise MiniDPOError(f"{tag}: stopped, another rank failed ({first})") from None


def default_parallel(full_finetune: bool) -> str:
    return "fsdp" if full_finetune else "ddp"


def check_parallel(parallel: str | None) -> None:
    if parallel is not None and parallel not in PARALLEL:
        raise ParameterError(f"parallel {parallel!r} is unknown; choose one of {', '.join(PARALLEL)}", "parallel")


def wrap(scorer: nn.Module, decoder_blocks: nn.ModuleList, parallel: str, d: Distributed) -> nn.Module:
    """`scorer` as its ranks run it: DDP over its trainable parameters, or FSDP2-sharded."""
    if not d.enabled:
        return scorer
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(scorer, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On CUDA the float32 shards are gathered as bf16 for the forward and the gradients reduced in float32.
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if d.device.type == "cuda" else MixedPrecisionPolicy()
    for block in decoder_blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(scorer, mp_policy=mp)
    return scorer


def gather_state(model: nn.Module, d: Distributed, *, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Full tensors by parameter name, gathered from every rank; on rank 0 only (CPU) when distributed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=d.enabled, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if trainable_only:  # a tied weight's second name (lm_head.weight) escapes ignore_frozen_params
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: t for name, t in state.items() if name in trainable}
    return state


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Distributed) -> dict:
    """The optimizer's state with full tensors, keyed by parameter name; on rank 0 only when distributed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=d.enabled)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, optimizer_state: dict) -> None:
    """Put full tensors (as `gather_state` and `gather_optimizer_state` give them) back, sharding them as needed."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
