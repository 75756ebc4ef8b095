"""Blends scored like models: one split for many runs (--split-seed), weights fitted on validation that recover
a known mixture, every member, the equal average and the blend scored on untouched rows, TF-IDF as a member,
and members that cannot be blended refused in one sentence."""
import json
import sys

import numpy as np
import pandas as pd
import pytest

import advtrain
from conftest import ROOT, base_config

sys.path.insert(0, str(ROOT / "tools"))
import reference_scores  # noqa: E402


def tiny(data_dir, model_dir, out, **kw):
    return base_config(data_dir, model_dir, out, epochs=1, eval_every=1.0, **kw)


def split_ids(run):
    oof = pd.read_csv(run / "oof.csv", dtype=str)
    return {part: set(oof.loc[oof["split"] == part, "id"]) for part in ("valid", "holdout")}


@pytest.fixture(scope="module")
def members(data_dir, model_dirs, tmp_path_factory):
    """Three runs on one split (split seed 5: seeds 1 and 2, and an FGM run of seed 1), one of another split, one
    scored by another metric, and TF-IDF on the first run's split."""
    root = tmp_path_factory.mktemp("members")
    made = {}
    for name, kw in {"a": dict(seed=1, split_seed=5), "b": dict(seed=2, split_seed=5),
                     "fgm": dict(seed=1, split_seed=5, method="fgm", adv_start="0"), "other": dict(seed=2),
                     "auc": dict(seed=1, split_seed=5, metric="auc")}.items():
        made[name] = root / name
        advtrain.run(tiny(data_dir, model_dirs["bert"], made[name], **kw))
    made["tfidf"] = root / "tfidf"
    assert reference_scores.main([str(made["a"]), "--write-run", str(made["tfidf"])]) == 0
    return made


def test_one_split_seed_puts_runs_of_any_seed_on_the_same_rows(members):
    assert split_ids(members["a"]) == split_ids(members["b"]) == split_ids(members["fgm"])
    assert split_ids(members["a"])["holdout"] != split_ids(members["other"])["holdout"]  # the seed's own split
    records = [json.loads((members[n] / "metrics.json").read_text())["config"] for n in ("a", "b")]
    assert [r["split_seed"] for r in records] == [5, 5] and [r["seed"] for r in records] == [1, 2]


def test_fitted_weights_recover_a_known_mixture():
    rng = np.random.default_rng(0)
    regression = advtrain.Task("regression", ["y"], "rmse")
    a, b, c = (rng.normal(size=(4000, 1)) for _ in range(3))
    y = 0.7 * a + 0.3 * b + 0.01 * rng.normal(size=(4000, 1))
    assert advtrain.fit_weights(regression, y, [a, b, c]) == pytest.approx([0.7, 0.3, 0.0], abs=0.01)
    pearson = advtrain.Task("regression", ["y"], "pearson")
    assert advtrain.fit_loss(pearson) == "rmse" and advtrain.fit_loss(regression) == "rmse"
    classes = advtrain.Task("multiclass", ["author"], "accuracy", ["x", "y", "z"])
    p, q = (rng.dirichlet(np.ones(3) * 0.5, size=30_000) for _ in range(2))
    truth = 0.6 * p + 0.4 * q
    labels = (rng.random((30_000, 1)) > truth.cumsum(1)).sum(1)
    assert advtrain.fit_loss(classes) == "logloss"  # accuracy is a threshold metric: its smooth surrogate
    assert advtrain.fit_weights(classes, labels, [p, q]) == pytest.approx([0.6, 0.4], abs=0.03)


def test_blend_fits_on_validation_scores_on_the_holdout_and_writes_a_checked_submission(members, data_dir,
                                                                                         tmp_path, capsys):
    out = tmp_path / "blend"
    runs = [members["a"], members["fgm"], members["tfidf"]]
    assert advtrain.main(["blend", "--runs", ",".join(map(str, runs)), "--output-dir", str(out)]) == 0
    info = json.loads((out / "blend.json").read_text())
    assert set(info["weights"]) == {"a", "fgm", "tfidf"} and sum(info["weights"].values()) == pytest.approx(1.0)
    assert all(w >= 0 for w in info["weights"].values())
    assert set(info["scores"]) == {"a", "fgm", "tfidf", "equal", "blend"} and info["metric"] == "f1"
    assert info["fitted_on"] == {"rows": "validation", "n": 100, "loss": "logloss (a smooth surrogate of f1)"}
    assert info["scored_on"] == {"rows": "holdout", "n": 100}
    for name in ("a", "fgm", "tfidf"):  # each member scored on the holdout as its own run scored itself
        recorded = json.loads((members[name] / "metrics.json").read_text())["score"]["value"]
        assert info["scores"][name] == pytest.approx(recorded, abs=1e-6)
    assert "blend: weights a" in capsys.readouterr().out
    assert advtrain.main(["check-submission", str(out / "submission.csv"), "--data-dir", str(data_dir)]) == 0
    probs = pd.read_csv(out / "test_probs.csv")
    members_probs = [pd.read_csv(r / "test_probs.csv").set_index("id").loc[probs["id"], "prob"].to_numpy()
                     for r in runs]
    mixed = sum(info["weights"][r.name] * p for r, p in zip(runs, members_probs))
    assert probs["prob"].to_numpy() == pytest.approx(mixed, abs=1e-6)


def test_members_that_cannot_be_blended_are_refused_in_one_sentence(members, tmp_path, capsys):
    cases = [([members["a"], members["other"]], "have other valid rows"),
             ([members["a"], members["auc"]], "was trained for another metric (auc)"),
             ([members["a"]], "blend needs two run folders or more")]
    for runs, says in cases:
        assert advtrain.main(["blend", "--runs", ",".join(map(str, runs)), "--output-dir", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    cut = tmp_path / "cut"
    advtrain.shutil.copytree(members["b"], cut)
    probs = pd.read_csv(cut / "test_probs.csv")
    probs.iloc[1:].to_csv(cut / "test_probs.csv", index=False)
    assert advtrain.main(["blend", "--runs", f"{members['a']},{cut}", "--output-dir", str(tmp_path / "x")]) == 2
    assert "predicted other test ids" in capsys.readouterr().err
    (cut / "oof.csv").unlink()
    assert advtrain.main(["blend", "--runs", f"{members['a']},{cut}", "--output-dir", str(tmp_path / "x")]) == 2
    assert "oof.csv is missing" in capsys.readouterr().err


def test_k_fold_members_are_blended_with_cross_fitted_weights(data_dir, model_dirs, tmp_path):
    runs = []
    for seed in (1, 2):
        runs.append(tmp_path / f"kfold{seed}")
        advtrain.run(tiny(data_dir, model_dirs["bert"], runs[-1], seed=seed, split_seed=3, split="kfold", n_folds=2,
                          metric="logloss"))
    info = advtrain.blend(runs, str(tmp_path / "blend"))
    assert info["scored_on"]["rows"].startswith("out-of-fold (weights cross-fitted") and info["scored_on"]["n"] == 1000
    assert info["fitted_on"] == {"rows": "out-of-fold", "n": 1000, "loss": "logloss"}
    for run in runs:  # each member's out-of-fold score is its own run's
        recorded = json.loads((run / "metrics.json").read_text())["score"]["value"]
        assert info["scores"][run.name] == pytest.approx(recorded)
