"""Method comparison across seeds: runs, table, intervals, plots, resumption, ensemble."""
import dataclasses
import shutil
import struct

import numpy as np
import pandas as pd
import pytest

import advtrain


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_paired_interval_matches_a_hand_computation():
    mean, lo, hi = advtrain.paired_interval([0.01, 0.02, 0.03])
    half = 4.303 * 0.01 / np.sqrt(3)
    assert mean == pytest.approx(0.02) and lo == pytest.approx(0.02 - half, rel=1e-3)
    assert hi == pytest.approx(0.02 + half, rel=1e-3)
    assert np.isnan(advtrain.paired_interval([0.5])[1])


@pytest.mark.parametrize("n,quantile", [(12, 2.201), (32, 2.040), (3, 4.303)])
def test_paired_interval_uses_the_exact_t_quantile(n, quantile):
    diffs = np.arange(n) / 100.0
    mean, lo, hi = advtrain.paired_interval(diffs)
    assert (hi - mean) / (diffs.std(ddof=1) / np.sqrt(n)) == pytest.approx(quantile, abs=5e-4)


def test_summary_on_a_hand_made_results_table():
    results = pd.DataFrame({
        "method": ["baseline"] * 3 + ["fgm"] * 3 + ["awp"] * 3,
        "seed": [1, 2, 3] * 3, "metric": "f1", "higher_is_better": True,
        "valid_best": [0.80, 0.81, 0.82, 0.81, 0.82, 0.83, 0.80, 0.80, 0.80],
        "score": [0.70, 0.72, 0.74, 0.72, 0.75, 0.77, 0.69, 0.73, 0.73],
        "attack_seen": [False] * 3 + [True, True, False] + [True] * 3,
        "labels_changed": [np.nan] * 3 + [0.1, 0.2, 0.3] + [0.05] * 3, "run": [f"run{i}" for i in range(9)],
    })
    summary = advtrain.summarize(results).set_index("method")
    assert summary.loc["fgm", "score_mean"] == pytest.approx(2.24 / 3)
    assert summary.loc["baseline", "score_std"] == pytest.approx(0.02)
    assert np.isnan(summary.loc["baseline", "diff"])
    fgm = summary.loc["fgm"]
    # paired F1 differences: 0.02, 0.03, 0.03 -> mean 0.02667, sd 0.005774
    assert fgm["diff"] == pytest.approx(0.08 / 3) and fgm["gain"] == pytest.approx(0.08 / 3)
    assert fgm["lo"] == pytest.approx(0.0266667 - 4.303 * 0.0057735 / np.sqrt(3), rel=1e-4)
    text = advtrain.results_markdown(results)
    assert ("fgm vs baseline: +0.0267 f1 (95% CI +0.0123 to +0.0410, 3 seeds; higher is better): better, "
            "distinguishable from zero." in text)
    assert "awp vs baseline: -0.0033 f1" in text and "not distinguishable from zero" in text
    assert "| fgm | 3 | 2/3 | 20.0% (min 10.0%) | 0.8200 ± 0.0100 | 0.7467 ± 0.0252 |" in text
    assert "| baseline | 3 | n/a | n/a |" in text and "| awp | 3 | 3/3 |" in text


def test_a_lower_rmse_is_a_gain():
    results = pd.DataFrame({"method": ["baseline"] * 3 + ["awp"] * 3, "seed": [1, 2, 3] * 2, "metric": "rmse",
                            "higher_is_better": False, "valid_best": 0.5, "attack_seen": [False] * 3 + [True] * 3,
                            "score": [0.60, 0.62, 0.61, 0.55, 0.58, 0.56], "labels_changed": np.nan,
                            "run": [f"run{i}" for i in range(6)]})
    awp = advtrain.summarize(results).set_index("method").loc["awp"]
    assert awp["diff"] == pytest.approx(-0.04666667) and awp["gain"] == pytest.approx(0.04666667)
    assert awp["gain_lo"] > 0
    text = advtrain.results_markdown(results)
    assert "awp vs baseline: -0.0467 rmse" in text and "lower is better): better, distinguishable" in text
    assert "| awp | 3 | 3/3 | n/a |" in text


def compare_args(data_dir, model_dir, out, *extra):
    return ["compare", "--methods", "baseline,fgm", "--seeds", "1,2", "--model", str(model_dir), "--data-dir",
            str(data_dir), "--output-dir", str(out), "--epochs", "1", "--batch-size", "16", "--lr", "2e-3",
            "--holdout-size", "100", "--valid-size", "100", "--adv-start", "0", "--eval-every", "0.5", "--device",
            "cpu", "--no-progress", "--no-save-model", *extra]


@pytest.mark.slow
def test_compare_runs_tables_plots_resumes_and_ensembles(data_dir, model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    args = compare_args(data_dir, model_dirs["deberta-v2"], out, "--ensemble", "baseline,fgm")
    assert advtrain.main(args) == 0
    for run in ("baseline-seed1", "baseline-seed2", "fgm-seed1", "fgm-seed2"):
        assert (out / run / "metrics.json").is_file() and (out / run / "submission.csv").is_file()
    results = pd.read_csv(out / "runs.csv")
    assert len(results) == 4 and set(results["method"]) == {"baseline", "fgm"}
    summary = pd.read_csv(out / "results.csv")
    assert list(summary["method"]) == ["baseline", "fgm"] and list(summary["seeds"]) == [2, 2]
    text = (out / "results.md").read_text()
    for method in ("baseline", "fgm"):
        rows = results[results["method"] == method]
        cell = f"{rows['score'].mean():.4f} ± {rows['score'].std():.4f}"
        assert f"| {method} | 2 |" in text and cell in text
    fgm = results[results["method"] == "fgm"].iloc[0]
    mine = pd.read_csv(out / "fgm-seed1" / "submission.csv")["target"]
    theirs = pd.read_csv(out / "baseline-seed1" / "submission.csv")["target"]
    assert fgm["labels_changed"] == pytest.approx((mine != theirs).mean())
    diff = (results[results.method == "fgm"].set_index("seed")["score"]
            - results[results.method == "baseline"].set_index("seed")["score"]).mean()
    assert f"| fgm | 2 | {diff:+.4f} |" in text
    for png in ("valid.png", "score.png"):
        width, height = png_size(out / png)
        assert width >= 600 and height >= 400 and (out / png).stat().st_size > 10_000
    sub = pd.read_csv(out / "ensemble_submission.csv")
    advtrain.check_submission(sub, pd.read_csv(data_dir / "sample_submission.csv")["id"])
    assert "Ensemble of baseline, fgm" in text

    # A second call runs nothing and rebuilds the same table; a lost table is rebuilt from the runs.
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a, **k: pytest.fail("a finished run was run again"))
    (out / "results.md").unlink()
    assert advtrain.main(args) == 0
    assert (out / "results.md").read_text() == text


@pytest.mark.slow
def test_compare_reruns_only_what_did_not_finish(data_dir, model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    (out / "fgm-seed2" / "metrics.json").unlink()  # as if that run had crashed
    ran = []
    real_run = advtrain.run
    monkeypatch.setattr(advtrain, "run",
                        lambda cfg, *a, **k: (ran.append((cfg.method, cfg.seed)), real_run(cfg, *a, **k))[1])
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    assert ran == [("fgm", 2)]


def test_compare_rejects_unknown_methods(capsys):
    assert advtrain.main(["compare", "--methods", "baseline,magic"]) == 2
    assert "compare needs methods from" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_refuses_a_finished_run_made_with_other_settings(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a, **k: pytest.fail("ran before refusing"))
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out) + ["--lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "was run with other settings (lr)" in err and "--overwrite" in err
    monkeypatch.undo()
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out) + ["--lr", "1e-4", "--overwrite"]) == 0
    for run in ("baseline-seed1", "fgm-seed2"):
        assert advtrain.json.loads((out / run / "metrics.json").read_text())["config"]["lr"] == 1e-4
    assert "lr 0.0001" in (out / "results.md").read_text()


@pytest.mark.slow
def test_compare_counts_only_the_runs_it_defines(data_dir, model_dirs, tmp_path):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    shutil.copytree(out / "fgm-seed1", out / "fgm-seed1-copy")  # a copied folder is no extra seed
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    results = pd.read_csv(out / "runs.csv")
    assert len(results) == 4 and sorted(results["run"]) == ["baseline-seed1", "baseline-seed2", "fgm-seed1",
                                                            "fgm-seed2"]


def test_compare_ensemble_must_name_methods_it_runs(capsys):
    assert advtrain.main(["compare", "--methods", "baseline", "--ensemble", "fgm"]) == 2
    assert "--ensemble names fgm" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_names_a_broken_metrics_json(data_dir, model_dirs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    (out / "fgm-seed1" / "metrics.json").write_text('{"config": ')
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 2
    assert "fgm-seed1/metrics.json is not a run record of this advtrain (not readable JSON" in capsys.readouterr().err


def test_grid_flags_are_typed_config_fields_and_touch_only_their_methods():
    grid = advtrain.parse_grid(["awp_lr=1e-4,1", "awp-objective=adversarial,sum", "epochs=2"])
    assert grid == {"awp_lr": [1e-4, 1.0], "awp_objective": ["adversarial", "sum"], "epochs": [2]}
    assert advtrain.grid_settings(grid, "baseline") == [{"epochs": 2}]
    assert len(advtrain.grid_settings(grid, "awp")) == 4 and len(advtrain.grid_settings(grid, "fgm")) == 1
    assert advtrain.touches("adv_start", "sift") and not advtrain.touches("adv_start", "baseline")
    assert not advtrain.touches("fgm_eps", "awp") and advtrain.touches("lr", "baseline")
    for bad, says in [("awp_lr", "write KEY=V1,V2"), ("seed=1,2", "other than method, seed"),
                      ("epochs=1.5", "'1.5' is not a int"), ("magic=1", "write KEY=V1,V2")]:
        with pytest.raises(advtrain.UserError, match=says):
            advtrain.parse_grid([bad])
    with pytest.raises(advtrain.UserError, match="names awp_lr twice"):
        advtrain.parse_grid(["awp_lr=1", "awp_lr=2"])
    with pytest.raises(advtrain.UserError, match="changes none of --methods baseline,fgm"):
        advtrain.compare(advtrain.Config(output_dir="unused"), ["baseline", "fgm"], [1], grid={"awp_lr": [1.0]})


def test_a_grid_pairs_every_setting_with_the_baseline_of_the_same_seed():
    runs = pd.DataFrame({
        "method": ["baseline"] * 2 + ["awp"] * 4, "seed": [1, 2, 1, 2, 1, 2], "metric": "f1",
        "higher_is_better": True, "valid_best": 0.8, "attack_seen": [False] * 2 + [True] * 4,
        "score": [0.70, 0.72, 0.71, 0.74, 0.69, 0.70], "labels_changed": np.nan,
        "awp_lr": [np.nan, np.nan, 0.5, 0.5, 1.0, 1.0], "run": [f"run{i}" for i in range(6)]})
    summary = advtrain.summarize(runs, keys=["awp_lr"])
    assert list(summary["method"]) == ["baseline", "awp", "awp"] and np.isnan(summary["awp_lr"][0])
    assert list(summary["awp_lr"][1:]) == [0.5, 1.0]
    assert summary["diff"][1:].tolist() == pytest.approx([0.015, -0.015])
    text = advtrain.results_markdown(runs, keys=["awp_lr"])
    assert "| awp | 0.5 | 2 | +0.0150 |" in text and "| baseline | - | 2 | n/a |" in text
    assert "awp (awp_lr=1.0) vs baseline: -0.0150 f1" in text


@pytest.mark.slow
def test_compare_grid_trains_the_baseline_once_per_seed_and_resumes_without_training(data_dir, model_dirs,
                                                                                     tmp_path, monkeypatch):
    out = tmp_path / "grid"
    args = compare_args(data_dir, model_dirs["bert"], out, "--grid", "awp_lr=0.5,1.0")
    args[args.index("--methods") + 1] = "baseline,awp"
    ran = []
    real_run = advtrain.run
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a, **k: (ran.append((cfg.method, cfg.awp_lr, cfg.seed)),
                                                               real_run(cfg, *a, **k))[1])
    assert advtrain.main(args) == 0
    assert sorted(m for m, _, _ in ran) == ["awp"] * 4 + ["baseline"] * 2
    assert sorted((lr, s) for m, lr, s in ran if m == "awp") == [(0.5, 1), (0.5, 2), (1.0, 1), (1.0, 2)]
    summary = pd.read_csv(out / "results.csv")
    assert list(summary["method"]) == ["baseline", "awp", "awp"] and list(summary["awp_lr"][1:]) == [0.5, 1.0]
    runs = pd.read_csv(out / "runs.csv").set_index("run")
    for _, row in summary.iloc[1:].iterrows():
        mine = [runs.loc[f"awp-awp_lr={row['awp_lr']}-seed{s}", "score"] - runs.loc[f"baseline-seed{s}", "score"]
                for s in (1, 2)]
        assert row["diff"] == pytest.approx(np.mean(mine)) and row["paired_seeds"] == 2
        assert not np.isnan(row["lo"]) and row["lo"] <= row["diff"] <= row["hi"]
    assert (out / "grid.png").stat().st_size > 10_000
    ran.clear()
    assert advtrain.main(args + ["--resume"]) == 0
    assert ran == []


def test_changed_labels_of_a_run_without_its_pair_is_nan(tmp_path, monkeypatch):
    """A search cut by --budget leaves attacked runs whose paired baseline has not run (paired NaN, as runs.csv
    reads it back): their share of changed labels is NaN, not a KeyError."""
    monkeypatch.setattr(advtrain, "read_run_record",
                        lambda folder: {"task": dataclasses.asdict(advtrain.DISASTER_TWEETS)})
    for run, labels in (("base", [0, 1, 1, 0]), ("fgm1", [0, 1, 0, 0]), ("fgm2", [1, 1, 1, 0])):
        (tmp_path / run).mkdir()
        pd.DataFrame({"id": [1, 2, 3, 4], "target": labels}).to_csv(tmp_path / run / "submission.csv", index=False)
    results = pd.DataFrame({"run": ["base", "fgm1", "fgm2"], "method": ["baseline", "fgm", "fgm"],
                            "paired": [np.nan, "base", np.nan]})
    changed = advtrain.with_changed_labels(tmp_path, results, "baseline")["labels_changed"].tolist()
    assert np.isnan(changed[0]) and changed[1] == 0.25 and np.isnan(changed[2])
