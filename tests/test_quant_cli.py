"""--quantize nf4 on every command that loads a model, and QLoRA end to end through the CLI."""

import pytest
from tiny_lm import tiny_model_folder

from minidpo.cli import build_parser, main

REQUIRED = {
    "generate": ["--model", "M", "--prompt", "hi"],
    "chat": ["--model", "M"],
    "serve": ["--model", "M"],
    "sft": ["--model", "M", "--data", "D", "--out", "O"],
    "train": ["--model", "M", "--data", "D", "--out", "O"],
    "merge": ["--model", "M", "--adapter", "A", "--out", "O"],
    "eval": ["--model", "M", "--out", "O"],
    "demo": [],
}


@pytest.mark.parametrize("command", REQUIRED)
def test_every_model_command_takes_quantize_nf4(command):
    parser = build_parser(command)
    assert parser.parse_args([command, *REQUIRED[command]]).quantize is None
    assert parser.parse_args([command, *REQUIRED[command], "--quantize", "nf4"]).quantize == "nf4"
    with pytest.raises(SystemExit):
        parser.parse_args([command, *REQUIRED[command], "--quantize", "int8"])


def test_qlora_train_then_generate_with_the_adapter_on_the_4bit_base(tmp_path, capsys):
    model = tiny_model_folder(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello there", "rejected": "go away"}\n' * 4)
    common = ["--model", str(model), "--chat-format", "chatml", "--device", "cpu", "--quantize", "nf4"]
    assert main(["train", *common, "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--max-length", "32", "--max-prompt-length", "16", "--no-progress",
                 "--no-plot"]) == 0
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    assert main(["generate", *common, "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    assert "completion tokens" in capsys.readouterr().err
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(tmp_path / "merged"),
                 "--quantize", "nf4"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_quantize_with_full_finetune_is_one_line_naming_both_flags(tmp_path, capsys):
    model = tiny_model_folder(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "no"}\n')
    code = main(["train", "--model", str(model), "--chat-format", "chatml", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--device", "cpu", "--quantize", "nf4", "--full-finetune"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--quantize" in err and "--full-finetune" in err
