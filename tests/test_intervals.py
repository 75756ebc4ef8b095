"""Intervals that count the scored rows as well as the seeds (issue 37): the metric under resampled rows as
metric_value computes it, a paired bootstrap over seeds and rows where the runs share their scored rows, the
t interval over seeds where each seed scores rows of its own, and what each interval covers said."""
import json

import numpy as np
import pandas as pd
import pytest

import advtrain


def scored(task, y, pred, threshold=0.5, ids=None):
    return {"ids": np.arange(len(y)) if ids is None else ids, "y": y, "pred": pred, "threshold": threshold,
            "task": task, "metric": task.metric}


@pytest.mark.parametrize("kind,metric", [("binary", "f1"), ("binary", "accuracy"), ("binary", "logloss"),
                                         ("multiclass", "logloss"), ("multiclass", "accuracy"),
                                         ("regression", "rmse"), ("regression2", "mcrmse"), ("binary", "auc")])
def test_the_metric_under_row_counts_is_metric_value_on_those_rows(kind, metric):
    rng = np.random.default_rng(1)
    n = 300
    if kind == "binary":
        task, y = advtrain.Task("binary", ["t"], metric, ["0", "1"]), rng.integers(0, 2, n)
        p = rng.random(n)
        pred = np.stack([1 - p, p], 1)
    elif kind == "multiclass":
        task, y = advtrain.Task("multiclass", ["a"], metric, ["x", "y", "z"]), rng.integers(0, 3, n)
        pred = rng.dirichlet(np.ones(3), n)
    else:
        cols = ["c"] if kind == "regression" else ["c", "d"]
        task, y = advtrain.Task("regression", cols, metric), rng.normal(size=(n, len(cols)))
        pred = y + rng.normal(scale=0.5, size=y.shape)
    rows = scored(task, y, pred, threshold=0.4)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=3)
    got = advtrain.weighted_metric(rows, np.vstack([np.ones(n, dtype=int), counts]))
    assert got[0] == pytest.approx(advtrain.metric_value(metric, task, y, pred, 0.4), rel=1e-9)
    for value, w in zip(got[1:], counts):
        picked = np.repeat(np.arange(n), w)
        assert value == pytest.approx(advtrain.metric_value(metric, task, y[picked], pred[picked], 0.4), rel=1e-9)


def test_the_bootstrap_counts_the_rows_that_the_seeds_interval_leaves_out():
    rng = np.random.default_rng(0)
    task = advtrain.Task("regression", ["c"], "rmse")
    y = rng.normal(size=(400, 1))
    noise, pairs = rng.normal(size=y.shape), []
    for seed in range(5):  # the seeds agree; the gain lies on 20 of the 400 rows, so it hangs on which rows are scored
        base = y + noise + rng.normal(scale=1e-3, size=y.shape)
        better = base.copy()
        better[:20] = y[:20]
        pairs.append((scored(task, y, better), scored(task, y, base)))
    diffs = [advtrain.metric_value("rmse", task, y, a["pred"]) - advtrain.metric_value("rmse", task, y, b["pred"])
             for a, b in pairs]
    _, t_lo, t_hi = advtrain.paired_interval(diffs)
    lo, hi = advtrain.row_interval(pairs)
    assert lo < np.mean(diffs) < hi and (hi - lo) > 10 * (t_hi - t_lo)  # the rows' sampling is counted
    assert advtrain.row_interval(pairs) == (lo, hi)  # one seed for the draws: the same interval every time
    same = [(a, a) for a, _ in pairs]
    assert advtrain.row_interval(same) == (0.0, 0.0)
    own = [(scored(task, y, a["pred"], ids=np.arange(400) + 1000 * i), scored(task, y, b["pred"],
                                                                               ids=np.arange(400) + 1000 * i))
           for i, (a, b) in enumerate(pairs)]
    assert advtrain.row_interval(own) is None  # each seed its own rows: the seeds' interval holds them


def compare_args(data_dir, model_dir, out, *extra):
    return ["compare", "--methods", "baseline,fgm", "--seeds", "1,2,3", "--model", str(model_dir), "--data-dir",
            str(data_dir), "--output-dir", str(out), "--epochs", "1", "--batch-size", "16", "--lr", "2e-3",
            "--holdout-size", "100", "--valid-size", "100", "--eval-every", "1", "--adv-start", "0", "--device", "cpu",
            "--no-progress", "--no-save-model", *extra]


@pytest.mark.slow
def test_compare_says_what_each_interval_covers_and_refuses_runs_without_predictions(data_dir, model_dirs,
                                                                                    tmp_path, capsys):
    shared, own = tmp_path / "shared", tmp_path / "own"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], shared, "--split-seed", "0")) == 0
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], own)) == 0
    row = pd.read_csv(shared / "results.csv").set_index("method").loc["fgm"]
    assert row["ci_covers"] == "seeds and rows (paired bootstrap)" and row["ci_draws"] == advtrain.BOOTSTRAP_DRAWS
    pairs = [(advtrain.ScoredRows(shared)(f"fgm-seed{s}"), advtrain.ScoredRows(shared)(f"baseline-seed{s}"))
             for s in (1, 2, 3)]
    assert (row["lo"], row["hi"]) == pytest.approx(advtrain.row_interval(pairs))
    text = (shared / "results.md").read_text()
    assert advtrain.COVERS["seeds and rows (paired bootstrap)"] in text and "| better in |" in text
    mine = pd.read_csv(own / "results.csv").set_index("method").loc["fgm"]
    assert mine["ci_covers"] == "seeds and rows (each seed scores rows of its own)" and mine["ci_draws"] == 0
    fgm, base = (pd.read_csv(own / "runs.csv").query(f"method == '{m}'").sort_values("seed")["score"].to_numpy()
                 for m in ("fgm", "baseline"))
    assert (mine["lo"], mine["hi"]) == pytest.approx(advtrain.paired_interval(fgm - base)[1:])
    (shared / "fgm-seed2" / "oof.csv").unlink()
    capsys.readouterr()
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], shared, "--split-seed", "0", "--no-train")) == 2
    err = capsys.readouterr().err
    assert "fgm-seed2 has no oof.csv, so its scored rows cannot be resampled" in err and len(err.splitlines()) == 1


def test_scored_rows_give_back_each_runs_recorded_score(tmp_path, data_dir, model_dirs):
    out = tmp_path / "run"
    metrics = advtrain.run(advtrain.Config(model=str(model_dirs["bert"]), data_dir=str(data_dir), output_dir=str(out),
                                           epochs=1, batch_size=16, lr=2e-3, holdout_size=100, valid_size=100,
                                           device="cpu", progress=False, save_model=False, threshold="auto"))
    rows = advtrain.ScoredRows(tmp_path)("run")
    assert len(rows["ids"]) == 100 and list(rows["ids"]) == sorted(rows["ids"])
    assert rows["threshold"] == metrics["score"]["threshold"]
    value = advtrain.weighted_metric(rows, np.ones((1, 100), dtype=int))[0]
    assert value == pytest.approx(metrics["score"]["value"], abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["score"]["on"] == "holdout"
