"""DPO's reference log-probs: from the same weights, a separate model, or a disk cache.

DPO compares the policy with a frozen reference (the model before training). Three ways
to get log ref(y|x), in order of memory:

Both models are given as scorers, logprobs.SequenceLogprobs modules (or their DDP / FSDP2
wrappers): (input_ids, labels) -> (summed response log-probs, counts).

1. `ReferenceModel(policy)`: the policy's own weights with every LoRA adapter switched off
   (lora.adapters_disabled). No second model; one extra no-grad forward per batch. The
   default for LoRA training, as the LibraChem reference code and TRL with PEFT do.
2. `ReferenceModel(policy, ref_model)`: a separate frozen model (`--ref-model DIR`), for
   full fine-tuning or a reference that differs from the starting weights.
3. `precompute_reference_logps`: one no-grad pass over the data before training, kept on
   disk as JSONL ({"key", "chosen", "rejected"} per example, appended and flushed as it
   goes) and reused by later runs on the same model, data and settings: training then
   runs no reference forward at all (`--precompute-ref`; TRL issues #2423, #3985).
   The file is named by a fingerprint of the model files, the data file and every setting
   that changes the numbers (chat format, lengths, dtype, device type), so a stale cache is
   never read. A killed precompute resumes where it stopped. Under torchrun each rank
   computes its share of every chunk of `batch_size x N` examples, the ranks gather the
   numbers, and rank 0 alone writes the file.

Model files are fingerprinted without reading a multi-GB checkpoint whole: small files
(configs, tokenizer) are hashed entirely; each weight file contributes its size, its
safetensors header (names, shapes, dtypes, offsets) and 16 evenly spaced 64 KiB samples
of its bytes, enough to tell apart two checkpoints of the same architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from minidpo.data import Example, collate
from minidpo.distributed import Distributed
from minidpo.io import JsonlAppender, load_jsonl_tolerant
from minidpo.lora import adapters_disabled

CACHE_VERSION = 1
SAMPLES, SAMPLE_BYTES = 16, 64 * 1024
WHOLE_FILE_LIMIT = 64 * 1024 * 1024


def default_cache_dir() -> Path:
    root = os.environ.get("MINIDPO_CACHE") or Path.home() / ".cache" / "minidpo"
    return Path(root) / "ref_logps"


class ReferenceModel:
    """Computes reference log-probs for a batch: the policy's scorer with adapters off, or a separate one."""

    def __init__(self, policy: torch.nn.Module, ref_model: torch.nn.Module | None = None):
        self.policy, self.ref_model = policy, ref_model

    @torch.no_grad()
    def logps(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed response log-probs (N,) float32 (float64 for a float64 model) under the reference."""
        if self.ref_model is not None:
            return self.ref_model(input_ids, labels)[0]
        with adapters_disabled(self.policy):
            return self.policy(input_ids, labels)[0]


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            h.update(f.read())
            return
        if path.suffix == ".safetensors":
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, WHOLE_FILE_LIMIT)))
        for i in range(SAMPLES):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def fingerprint(model_dir: str | Path, data_path: str | Path, settings: dict) -> str:
    """A hex digest naming the reference log-probs of (model files, data file, settings)."""
    h = hashlib.sha256(f"minidpo-ref-logps-v{CACHE_VERSION}\0".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".model", ".jinja"):
            _file_fingerprint(path, h)
    _file_fingerprint(Path(data_path), h)
    return h.hexdigest()[:32]


def precompute_reference_logps(
    reference: ReferenceModel,
    examples: list[Example],
    cache_file: str | Path,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: Callable[[int], None] | None = None,
    ranks: Distributed | None = None,
) -> dict[str, tuple[float, float]]:
    """{example key: (ref chosen logp, ref rejected logp)}, read from `cache_file` or computed into it.

    With `ranks` (torchrun), every rank calls this: each computes its share, rank 0 writes.
    """
    ranks = ranks or Distributed()
    cache_file = Path(cache_file)
    cached = {r["key"]: (r["chosen"], r["rejected"]) for r in load_jsonl_tolerant(cache_file)}
    missing = [e for e in examples if e.key not in cached]
    ranks.barrier()  # every rank has read the file before rank 0 appends to it
    step = batch_size * ranks.world_size
    with JsonlAppender(cache_file, fsync=False) if missing and ranks.is_main else contextlib.nullcontext() as out:
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]  # the global chunk; this rank scores its share
            mine = ranks.shard(chunk, batch_size) or chunk[:1]  # a rank without a share scores one, unused
            batch = collate(mine, pad_id).to(device)
            with autocast():
                logps = reference.logps(batch.input_ids, batch.labels).double()  # (2b,)
            pairs = torch.full((batch_size, 2), math.nan, dtype=torch.float64, device=logps.device)  # (B, 2)
            pairs[: len(mine)] = torch.stack([logps[: len(mine)], logps[len(mine) :]], 1)  # (b, 2)
            scores = ranks.gather(pairs).flatten(0, 1)[: len(chunk)].tolist()  # (len(chunk), 2), rank order
            for example, (chosen, rejected) in zip(chunk, scores):
                cached[example.key] = (chosen, rejected)
                if out is not None:
                    out.write({"key": example.key, "chosen": chosen, "rejected": rejected})
            if progress is not None:
                progress(len(chunk))
    return {e.key: cached[e.key] for e in examples}
