"""DPO with LoRA in one short file: no Trainer, only the algorithm (nanoGPT's train.py in spirit).

    python examples/dpo_minimal.py                    # SmolLM2-135M-Instruct (minidpo fetch-default)
    python examples/dpo_minimal.py --model DIR --data train.jsonl --steps 20 --batch-size 4

One step (Rafailov et al. 2023, "Direct Preference Optimization", arXiv 2305.18290):
    1. B preference pairs become one (2B, T) batch: the chosen responses' rows, then the
       rejected ones', prompt and padding masked out of the labels (minidpo.data.collate).
    2. The policy's log pi(y|x) of every response: one forward, summed response token
       log-probs from the fused lm_head kernel (minidpo.logprobs.sequence_logprobs).
    3. The reference's log ref(y|x): the same weights with the LoRA adapters switched off
       (minidpo.lora.adapters_disabled), without gradients; no second model in memory.
    4. The loss, mean over the pairs of
           -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
       (minidpo.losses.dpo_loss), then backward and an AdamW step on the adapter weights.

minidpo.train.Trainer runs exactly this step (tests/test_examples.py checks the loss and
the gradients) and adds what a long run needs: gradient accumulation, the lr schedule,
clipping, checkpoints and resume, evaluation, metrics.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from minidpo import load_model, load_tokenizer
from minidpo.data import Batch, collate, load_dataset
from minidpo.logprobs import sequence_logprobs
from minidpo.lora import LoRAConfig, adapters_disabled, apply_lora
from minidpo.losses import dpo_loss

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "minidpo" / "data" / "librachem_mini" / "train.jsonl"


def dpo_batch_loss(model: torch.nn.Module, batch: Batch, beta: float) -> tuple[torch.Tensor, dict]:
    """Steps 2-4 above for one batch of B pairs: (the mean DPO loss, its metrics)."""
    B = len(batch.keys)
    with torch.no_grad(), adapters_disabled(model):
        ref_logps, _ = sequence_logprobs(model, batch.input_ids, batch.labels)  # (2B,)
    logps, _ = sequence_logprobs(model, batch.input_ids, batch.labels)  # (2B,): chosen rows, then rejected
    return dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta=beta)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a few DPO steps with LoRA, bare")
    parser.add_argument("--model", help="HF-format folder (default: SmolLM2-135M-Instruct, fetched once)")
    parser.add_argument("--data", default=str(SHIPPED_DATA), help="prompt/chosen/rejected JSONL")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.model is None:
        from minidpo.fetch import fetch_default

        args.model = fetch_default(log=print)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(args.model)
    model, _ = load_model(args.model, device=device)  # float32 weights
    torch.manual_seed(args.seed)  # a script may seed the global RNG: LoRA's init and dropout
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules="q_proj,k_proj,v_proj"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]  # only lora_A / lora_B
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)

    examples = load_dataset(
        args.data, tokenizer, tokenizer.chat_format, max_length=256, max_prompt_length=128
    ).examples
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    print(f"{len(examples)} pairs, {sum(p.numel() for p in trainable):,} trainable parameters, {device}")

    for step in range(args.steps):
        start = step * args.batch_size % len(examples)
        batch = collate(examples[start : start + args.batch_size], pad_id).to(device)  # 1.
        loss, metrics = dpo_batch_loss(model, batch, args.beta)  # 2.-4.
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(
            f"step {step + 1}: loss {loss.item():.4f}  reward accuracy {metrics['rewards/accuracies']:.2f}  "
            f"margin {metrics['rewards/margins']:+.4f}  over {metrics['count']} pairs"
        )


if __name__ == "__main__":
    main()
