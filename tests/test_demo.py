"""`minidpo demo`: its data slices, and a --quick smoke run on the real default model."""

import json

import pytest

from minidpo.demo import QUICK, SHIPPED, format_table, prepare_data, run_demo, stratified


def test_stratified_keeps_class_shares_and_is_stable():
    rows = [{"id": i, "label": "a" if i % 3 else "b"} for i in range(60)]
    picked = stratified(rows, 12, lambda r: r["label"], {"a": 0.5, "b": 0.5})
    assert sum(r["label"] == "b" for r in picked) == 6
    assert picked == stratified(list(reversed(rows)), 12, lambda r: r["label"], {"a": 0.5, "b": 0.5})


def test_stratified_names_every_compound_before_repeating_one():
    rows = [{"id": f"{c}{i}", "label": "a", "compound": c} for c in "xyz" for i in range(5)]
    picked = stratified(rows, 6, lambda r: r["label"], {"a": 1.0})
    assert sorted(r["compound"] for r in picked) == ["x", "x", "y", "y", "z", "z"]


def test_prepare_data_slices_the_shipped_sets(tmp_path):
    train, evals = prepare_data(tmp_path, QUICK)
    pairs = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(pairs) == QUICK.train_pairs
    shipped = {json.loads(line)["id"] for line in (SHIPPED / "train.jsonl").read_text().splitlines()}
    assert {p["id"] for p in pairs} <= shipped
    for path in evals:
        labels = [json.loads(line)["true_label"] for line in path.read_text().splitlines()]
        assert sorted(labels) == [0] * (QUICK.eval_per_split // 2) + [1] * (QUICK.eval_per_split // 2)


@pytest.fixture(scope="module")
def quick_demo(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, quick=True, model_dir=smollm2_dir, device="cpu", log=lambda message: None)


def test_quick_demo_runs_end_to_end(quick_demo):
    out, summary = quick_demo
    assert [(r["split"], r["model"]) for r in summary["rows"]] == [
        ("unseen phrasings", "base"), ("unseen phrasings", "sft"), ("unseen phrasings", "dpo"),
        ("unseen compounds", "base"), ("unseen compounds", "sft"), ("unseen compounds", "dpo"),
    ]
    for r in summary["rows"]:
        assert r["safety"]["n"] + r["utility"]["n"] == QUICK.eval_per_split
    assert (out / "demo.md").read_text().strip() == format_table(summary)
    assert (out / "sft_model" / "model.safetensors").is_file()
    assert json.loads((out / "dpo" / "train_config.json").read_text())["model"] == str(out / "sft_model")
    assert (out / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "demo.png").is_file()
    assert json.loads((out / "demo.json").read_text())["rows"] == summary["rows"]


def test_quick_demo_rerun_reuses_every_stage(quick_demo, smollm2_dir):
    out, first = quick_demo
    merged = (out / "sft_model" / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    again = run_demo(out, quick=True, model_dir=smollm2_dir, device="cpu", log=messages.append)
    assert again["rows"] == first["rows"]
    assert (out / "sft_model" / "model.safetensors").stat().st_mtime_ns == merged
    generated = [m for m in messages if m.startswith("answers:")]
    assert generated and all(" 0 generated" in m for m in generated)
