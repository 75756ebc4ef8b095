"""Method comparison across seeds: runs, table, intervals, plots, resumption, ensemble."""
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
        "labels_changed": [np.nan] * 3 + [0.1, 0.2, 0.3] + [0.05] * 3,
    })
    summary, diffs = advtrain.summarize(results)
    assert summary.loc["fgm", ("score", "mean")] == pytest.approx(2.24 / 3)
    assert summary.loc["baseline", ("score", "std")] == pytest.approx(0.02)
    fgm = diffs.set_index("method").loc["fgm"]
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
                            "score": [0.60, 0.62, 0.61, 0.55, 0.58, 0.56], "labels_changed": np.nan})
    awp = advtrain.summarize(results)[1].set_index("method").loc["awp"]
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
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["method"]) == {"baseline", "fgm"}
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
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a: pytest.fail("a finished run was run again"))
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
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a: (ran.append((cfg.method, cfg.seed)), real_run(cfg, *a))[1])
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    assert ran == [("fgm", 2)]


def test_compare_rejects_unknown_methods(capsys):
    assert advtrain.main(["compare", "--methods", "baseline,magic"]) == 2
    assert "compare needs methods from" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_refuses_a_finished_run_made_with_other_settings(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a: pytest.fail("ran before refusing"))
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
    results = pd.read_csv(out / "results.csv")
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
    assert "fgm-seed1/metrics.json is not a metrics.json of this advtrain version" in capsys.readouterr().err
