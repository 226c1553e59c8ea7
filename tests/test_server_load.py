"""benchmarks/server_load.py: a short load run against the real server, and its results file."""

from __future__ import annotations

import json

import pytest

from benchmarks import server_load


@pytest.mark.parametrize("mix", ["full", "plain"])
def test_a_short_load_run_counts_requests_and_fails_none(tiny_llama_dir, mix, capsys):
    code = server_load.main(["--model", str(tiny_llama_dir), "--duration", "4", "--clients", "3", "--burst", "6",
                             "--max-tokens", "8", "--mix", mix, "--no-write"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert result["mix"] == mix and result["server"] == "continuous"
    assert result["requests"] > 0 and result["failed"] == 0, result["failures"]
    assert result["burst_answered"] == 6
    assert result["requests_per_s"] > 0


def test_rows_of_one_day_merge_by_server_mix_round_and_model(tmp_path):
    row = {"server": "continuous", "mix": "plain", "round": 1, "model": "m", "requests": 10,
           "failures": {}, "burst_failures": {}}  # fmt: skip
    server_load.write(row, "quiet", tmp_path)
    server_load.write(row | {"server": "static"}, "quiet", tmp_path)
    server_load.write(row | {"requests": 12}, "second try", tmp_path)
    payload = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(r["server"], r["requests"]) for r in payload["rows"]] == [("static", 10), ("continuous", 12)]
    assert payload["notes"] == ["quiet", "second try"]
    table = next(tmp_path.glob("*.md")).read_text()
    assert table.count("| continuous |") == 1 and "| static |" in table


def test_the_results_file_names_the_servers_device():
    assert server_load.server_device(["--device=cpu"]) == "cpu"
    assert server_load.server_device(["--static-batching", "--device=cuda:0"]) == "cuda:0"
