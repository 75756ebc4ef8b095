"""tools/studies.py: RESULTS.md's study blocks rebuilt in place, and a blend study's paired table from blend.json."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import studies  # noqa: E402


def test_splice_replaces_only_the_named_block():
    text = "# R\n\n<!-- study:a -->\nold a\n<!-- /study:a -->\nkeep\n<!-- study:b -->\nold b\n<!-- /study:b -->\n"
    out = studies.splice(text, "a", "new a\n")
    assert out == text.replace("old a", "new a")
    with pytest.raises(SystemExit, match="no <!-- study:c --> block"):
        studies.splice(text, "c", "x")


def test_every_study_prints_its_command_without_machine_paths():
    for name in studies.STUDIES:
        command = studies.command(name)
        assert command.startswith("python advtrain.py compare --model <all-MiniLM-L6-v2> --data-dir bench/data/")
        assert "/work" not in command and f"--output-dir bench/runs/{name}" in command


def test_a_blend_study_pairs_the_two_kinds_seed_by_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "RUNS", tmp_path)
    (tmp_path / "train").mkdir()
    pairs = {"mix": [["base-1", "fgm-1"], ["base-2", "fgm-2"], ["base-3", "fgm-3"]],
             "seeds": [["base-1", "base-4"], ["base-2", "base-5"], ["base-3", "base-6"]]}
    monkeypatch.setitem(studies.BLENDS, "toy", ("train", pairs, [("mix", "blend", "seeds", "blend"),
                                                                  ("mix", "blend", "mix", 0)], "A toy study."))
    for run in {m for groups in pairs.values() for g in groups for m in g}:
        (tmp_path / "train" / run).mkdir()
        (tmp_path / "train" / run / "metrics.json").write_text("{}")
    scores = {"mix": [0.80, 0.82, 0.79], "seeds": [0.78, 0.80, 0.80]}
    for kind, folders in studies.blend_folders("toy").items():
        for (out, members), score in zip(folders, scores[kind]):
            out.mkdir(parents=True)
            names = [m.name for m in members]
            (out / "blend.json").write_text(json.dumps({
                "metric": "f1", "higher_is_better": True, "weights": dict(zip(names, (0.5, 0.5))),
                "scores": {names[0]: 0.75, names[1]: 0.70, "equal": score - 0.01, "blend": score}}))
    table = studies.blend_table("toy")
    assert "| mix | 1 | base-1 (0.50), fgm-1 (0.50) | 0.7500 / 0.7000 | 0.7900 | 0.8000 |" in table
    gains = [0.02, 0.02, -0.01]
    mean, lo, hi = studies.advtrain.paired_interval(gains)
    assert f"| mix blend vs seeds blend | 3 | {mean:+.4f} | {lo:+.4f} to {hi:+.4f} | 2 of 3 |" in table
    assert "| mix blend vs mix member 1 | 3 | +0.0533 |" in table  # 0.05, 0.07, 0.04
