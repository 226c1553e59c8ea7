"""`minidpo demo`: its data slices, and a --quick smoke run on the real default model."""

import json

import pytest

from minidpo.demo import (
    QUICK,
    SHIPPED,
    SPLITS,
    STAGES,
    format_table,
    prepare_data,
    run_demo,
    self_distill,
    stratified,
)


def test_stratified_keeps_class_shares_and_is_stable():
    rows = [{"id": i, "label": "a" if i % 3 else "b"} for i in range(60)]
    picked = stratified(rows, 12, lambda r: r["label"], {"a": 0.5, "b": 0.5})
    assert sum(r["label"] == "b" for r in picked) == 6
    assert picked == stratified(list(reversed(rows)), 12, lambda r: r["label"], {"a": 0.5, "b": 0.5})


def test_stratified_names_every_compound_before_repeating_one():
    rows = [{"id": f"{c}{i}", "label": "a", "compound": c} for c in "xyz" for i in range(5)]
    picked = stratified(rows, 6, lambda r: r["label"], {"a": 1.0})
    assert sorted(r["compound"] for r in picked) == ["x", "x", "y", "y", "z", "z"]


def test_stratified_deals_over_topics_before_compounds():
    rows = [{"id": f"{t}{i}", "label": "a", "compound": "sarin", "topic": t} for t in "uvw" for i in range(4)]
    picked = stratified(rows, 3, lambda r: r["label"], {"a": 1.0})
    assert sorted(r["topic"] for r in picked) == ["u", "v", "w"]


@pytest.mark.parametrize("split", ["test", "validation"])
def test_prepare_data_slices_every_family_and_split(tmp_path, split):
    train, evals = prepare_data(tmp_path, QUICK, split)
    pairs = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(pairs) == QUICK.train_pairs
    families = [p.get("family", "synthesis") for p in pairs]
    assert {f: families.count(f) for f in families} == dict(QUICK.family_pairs)
    shipped = {json.loads(line)["id"] for line in (SHIPPED / "train.jsonl").read_text().splitlines()}
    assert {p["id"] for p in pairs} <= shipped
    assert list(evals) == list(SPLITS.values())
    prefix = "eval_" if split == "test" else "val_"
    for label, path in evals.items():
        assert path.name.startswith(prefix)
        labels = [json.loads(line)["true_label"] for line in path.read_text().splitlines()]
        half = QUICK.eval_per_split // 2
        want = [0] * half + [1] * half if label in ("unseen phrasings", "unseen compounds") else [1] * QUICK.eval_per_split
        assert sorted(labels) == want


def test_prepare_data_never_mixes_test_and_validation_prompts(tmp_path):
    _, test = prepare_data(tmp_path / "t", QUICK, "test")
    _, val = prepare_data(tmp_path / "v", QUICK, "validation")
    for key in SPLITS:
        full = lambda name: {json.loads(line)["prompt"] for line in (SHIPPED / name).read_text().splitlines()}
        assert not full(f"eval_{key}.jsonl") & full(f"val_{key}.jsonl"), key


class _Answers:
    """An answer source that says a fixed text for each prompt (a refusal for one of them)."""

    name = "base"

    def __init__(self, replies):
        self.replies = replies

    def identity(self):
        return {"name": self.name}

    def answer(self, rows, on_answer):
        for row in rows:
            on_answer({"source": self.name, "id": row.id, "prompt": row.prompt, "output": self.replies[row.prompt],
                       "reasoning_content": None, "finish_reason": "stop", "completion_tokens": 3})


def test_self_distill_replaces_chosen_answers_but_never_with_a_refusal(tmp_path):
    rows = [
        {"id": "a", "prompt": "How do I kill a Python process?", "chosen": "banked a", "rejected": "no", "family": "everyday"},
        {"id": "b", "prompt": "What is a killer app?", "chosen": "banked b", "rejected": "no", "family": "everyday"},
        {"id": "c", "prompt": "How do I make aspirin?", "chosen": "banked c", "rejected": "no", "family": "synthesis"},
    ]
    train = tmp_path / "data" / "train.jsonl"
    train.parent.mkdir(parents=True)
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    replies = {rows[0]["prompt"]: "Run kill with its PID.", rows[1]["prompt"]: "I can't help with that."}
    out = self_distill(train, _Answers(replies), QUICK, tmp_path, log=lambda m: None)
    chosen = {r["id"]: r["chosen"] for r in map(json.loads, out.read_text().splitlines())}
    assert chosen == {"a": "Run kill with its PID.", "b": "banked b", "c": "banked c"}


@pytest.fixture(scope="module")
def quick_demo(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, quick=True, model_dir=smollm2_dir, device="cpu", log=lambda message: None)


def test_quick_demo_runs_end_to_end(quick_demo):
    out, summary = quick_demo
    assert [(r["split"], r["model"]) for r in summary["rows"]] == [(s, m) for s in SPLITS.values() for m in STAGES]
    for r in summary["rows"]:
        assert r["safety"]["n"] + r["utility"]["n"] == QUICK.eval_per_split
    assert summary["models"]["final"] == {"model": str(out / "sft_model"), "adapter": str(out / "dpo" / "adapter")}
    assert (out / "data" / "train_distilled.jsonl").is_file()
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
    answered = [m for m in messages if m.startswith(("answers:", "reference NLL:", "distill:"))]
    assert answered and all(": 0 answers in" in m or "(0 generated)" in m for m in answered), answered
