"""Fingerprints of what produces an answer: the model as loaded, and its tokenizer with its chat format.

The answer cache (eval/answers.py) keys each answer by these, so that another model, new
weights under the same folder name, another adapter, dtype, chat format or tokenizer
regenerates instead of silently reusing old answers.

    model_fingerprint(model):   blake2b over the architecture (model.config) and, for every
                                tensor of the state dict in order, its name, shape and dtype
                                and the bytes of its first and last SAMPLE elements
    prompt_fingerprint(tok, fmt, system):
                                blake2b over the token ids of a probe question rendered as every
                                prompt is, in the chat format with the system prompt (template,
                                default system, BOS, special tokens and tokenization all show in
                                them), and the stop tokens and strings

The model is read as it sits in memory, not from its files: a LoRA adapter loaded on top
(its lora_A/lora_B tensors are in the state dict), the dtype and weights that never came
from a file are covered alike. Hashing the ends of each tensor instead of all of it keeps
the cost to a few MB however large the model: a fine-tune, a LoRA update or a merge
(W + BA is dense) changes every element of the tensors it touches, ends included. A change
to the middle of a tensor only (say, some rows of an embedding) is what it would miss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

SAMPLE = 4096  # elements hashed at each end of every tensor
PROBE = "Probe: how is aspirin made? ČŽ 水 ∑ H₂O 🙂"


def model_fingerprint(model: torch.nn.Module) -> str:
    """32 hex digits identifying the model's architecture and weights as loaded (see the module doc)."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)  # (numel,)
        ends = flat if flat.numel() <= 2 * SAMPLE else torch.cat([flat[:SAMPLE], flat[-SAMPLE:]])  # (<= 2*SAMPLE,)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        h.update(ends.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def prompt_fingerprint(tokenizer, chat_format, system: str | None) -> str:
    """32 hex digits identifying how prompts become token ids and where answers stop."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    ids = tokenizer.encode(chat_format.render([*messages, {"role": "user", "content": PROBE}], add_generation_prompt=True))
    content = {"format": chat_format.name, "ids": ids, "stop_ids": sorted(tokenizer.stop_token_ids),
               "stop_strings": list(chat_format.stop_strings)}
    return hashlib.blake2b(json.dumps(content).encode(), digest_size=16).hexdigest()
