"""compare --search (screen, promote, confirm on fresh seeds, budget), grids as a union of products, and
attacked runs that start from their baseline's clean epochs (the fork) with the result of a run from scratch."""
import json

import numpy as np
import pandas as pd
import pytest

import advtrain


def settings(data_dir, model_dir, **kw):
    return dict(model=str(model_dir), data_dir=str(data_dir), epochs=3, batch_size=16, lr=2e-3, holdout_size=100,
                valid_size=100, device="cpu", progress=False, save_model=False, eval_every=0.5, adv_start="1", **kw)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("fgm", {}), ("awp", {"awp_lr": 0.01}), ("sift", {})])
def test_a_forked_run_records_the_evaluations_of_a_run_from_scratch(data_dir, model_dirs, tmp_path, method, extra):
    base = settings(data_dir, model_dirs["bert"])
    grid = {k: [v] for k, v in extra.items()}
    advtrain.compare(advtrain.Config(output_dir=str(tmp_path / "cmp"), **base), ["baseline", method], [1], grid=grid)
    name = advtrain.run_dir_name(method, 1, extra)
    forked = json.loads((tmp_path / "cmp" / name / "metrics.json").read_text())
    scratch = advtrain.run(advtrain.Config(output_dir=str(tmp_path / "scratch"), method=method, seed=1, **base,
                                           **extra))
    assert forked["fork"][0]["epoch"] == 1 and scratch["fork"] == [None]  # it did start from the baseline's state
    assert len(forked["evaluations"]) == len(scratch["evaluations"]) == 6
    for a, b in zip(forked["evaluations"], scratch["evaluations"]):
        assert (a["step"], a["adv_steps"], a["attack_seen"]) == (b["step"], b["adv_steps"], b["attack_seen"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["valid_f1"] == pytest.approx(b["valid_f1"], abs=1e-6)
        assert a["valid_accuracy"] == pytest.approx(b["valid_accuracy"], abs=1e-6)
    assert forked["adv_started_at"] == scratch["adv_started_at"]
    assert forked["score"]["value"] == pytest.approx(scratch["score"]["value"], abs=1e-6)
    baseline = json.loads((tmp_path / "cmp" / "baseline-seed1" / "metrics.json").read_text())
    assert forked["evaluations"][:2] == baseline["evaluations"][:2]  # the clean epoch is the baseline's own
    assert not (tmp_path / "cmp" / ".prefix").exists()  # the saved states go once every run has finished


def test_the_clean_key_ignores_the_attack_and_sees_the_rest():
    cfg = advtrain.Config(output_dir="x")
    inputs = {"train": "a", "test": "b", "sample_submission": None, "model": "m"}
    key = advtrain.clean_key(cfg, inputs)
    same = [dict(method="fgm", fgm_eps=0.5, adv_start="1"), dict(method="awp", awp_lr=1e-3), dict(output_dir="y")]
    for change in same:
        assert advtrain.clean_key(advtrain.dataclasses.replace(cfg, **change), inputs) == key
    for change in [dict(lr=1e-4), dict(seed=2), dict(epochs=2), dict(eval_every=0.5)]:
        assert advtrain.clean_key(advtrain.dataclasses.replace(cfg, **change), inputs) != key
    assert advtrain.clean_key(cfg, {**inputs, "train": "changed"}) != key
    assert advtrain.fork_epoch(advtrain.Config(method="fgm", adv_start="1.5", output_dir="x")) == 1
    for start in ("warmup", "auto", "0.5"):
        assert advtrain.fork_epoch(advtrain.Config(method="fgm", adv_start=start, output_dir="x")) == 0
    assert advtrain.fork_epoch(advtrain.Config(method="baseline", adv_start="1", output_dir="x")) == 0


def test_a_union_of_grids_runs_each_method_under_its_own_products():
    grids = advtrain.parse_grids([["fgm_eps=0.1,0.2"], ["sift_lambda=1,3"], ["fgm_eps=0.2", "lr=1e-4"]])
    assert advtrain.grid_settings(grids, "fgm") == [{"fgm_eps": 0.1}, {"fgm_eps": 0.2}, {"fgm_eps": 0.2, "lr": 1e-4}]
    assert advtrain.grid_settings(grids, "sift") == [{"sift_lambda": 1.0}, {"sift_lambda": 3.0}]
    assert advtrain.grid_settings(grids, "baseline") == [{}, {"lr": 1e-4}]  # paired with every lr it meets
    assert advtrain.grid_settings(grids, "awp") == [{}, {"lr": 1e-4}]  # no product names awp: all of them
    assert advtrain.grid_settings(grids[0], "fgm") == [{"fgm_eps": 0.1}, {"fgm_eps": 0.2}]  # one product: as before
    cfg = advtrain.Config(output_dir="x")
    items = advtrain.plan_items(cfg, ["fgm", "baseline"], [7], [{"fgm_eps": [0.2]}, {"lr": [3e-5]}],
                                advtrain.Path("root"))
    assert [(i.method, i.setting) for i in items] == [("baseline", {}), ("fgm", {"fgm_eps": 0.2})]  # lr 3e-5 is
    # the default, so fgm under it is the run fgm_eps=0.2 already is; the baseline trains first


def test_promotion_takes_the_largest_gains_above_zero_only():
    screened = pd.DataFrame({"method": ["baseline", "fgm", "fgm", "sift"], "fgm_eps": [np.nan, 0.1, 0.2, np.nan],
                             "sift_lambda": [np.nan, np.nan, np.nan, 1.0], "paired_seeds": [0, 3, 3, 3],
                             "gain": [np.nan, 0.01, 0.03, -0.02]})
    keys = ["fgm_eps", "sift_lambda"]
    assert advtrain.promote(screened, 2, keys) == [("fgm", ("fgm_eps", 0.2)), ("fgm", ("fgm_eps", 0.1))]
    assert advtrain.promote(screened, 1, keys) == [("fgm", ("fgm_eps", 0.2))]
    assert advtrain.promote(screened.assign(gain=[np.nan, -0.01, 0.0, -0.02]), 2, keys) == []


def test_the_confirmation_verdict_uses_the_fresh_seeds_and_the_bonferroni_level():
    rows = []
    for phase, seeds, gains in (("screen", [1, 2, 3], [0.05, 0.04, 0.06]), ("confirm", [4, 5, 6, 7], [0.01, 0.03, 0.02,
                                                                                                    0.025])):
        for seed, g in zip(seeds, gains):
            rows += [dict(method="baseline", seed=seed, score=0.5, fgm_eps=np.nan, phase=phase),
                     dict(method="fgm", seed=seed, score=0.5 + g, fgm_eps=0.2, phase=phase)]
    results = pd.DataFrame(rows).assign(metric="f1", higher_is_better=True, valid_best=0.5, attack_seen=True,
                                        labels_changed=np.nan, seconds=60.0, run=[f"r{i}" for i in range(len(rows))])
    search = advtrain.Search([1, 2, 3], [4, 5, 6, 7], promote=2)
    table = advtrain.search_table(results, "baseline", ["fgm_eps"], search, [("fgm", ("fgm_eps", 0.2))])
    fgm = table.set_index("method").loc["fgm"]
    assert fgm["gain"] == pytest.approx(0.05)  # the screen's mean gain, kept apart from the verdict
    fresh = np.array([0.01, 0.03, 0.02, 0.025])
    half = 3.182446 * fresh.std(ddof=1) / 2  # t(0.975, 3): one promoted setting, so 95%
    assert fgm["confirm_gain"] == pytest.approx(fresh.mean()) and fgm["confirm_seeds"] == 4
    assert fgm["confirm_gain_lo"] == pytest.approx(fresh.mean() - half, rel=1e-4) and fgm["verdict"] == "pays"
    assert fgm["minutes"] == pytest.approx(7.0) and table.set_index("method").loc["baseline", "verdict"] == "reference"
    two = advtrain.search_table(results, "baseline", ["fgm_eps"], search,
                                [("fgm", ("fgm_eps", 0.2)), ("fgm", ("fgm_eps", 0.5))]).set_index("method").loc["fgm"]
    assert two["ci_level"] == pytest.approx(0.975) and two["confirm_gain_lo"] < fgm["confirm_gain_lo"]
    short = advtrain.Search([1, 2, 3], [4, 5, 6, 7, 8])
    assert advtrain.search_table(results, "baseline", ["fgm_eps"], short, [("fgm", ("fgm_eps", 0.2))]).set_index(
        "method").loc["fgm", "verdict"] == "pending (4 of 5 fresh seeds)"


def search_args(data_dir, model_dir, out, *extra):
    return ["compare", "--methods", "baseline,fgm", "--search", "--grid", "fgm_eps=0.05", "--grid", "fgm_eps=0.5",
            "--screen-seeds", "1,2", "--confirm-seeds", "3,4,5", "--promote", "1", "--model", str(model_dir),
            "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "3", "--batch-size", "16",
            "--lr", "1e-3", "--holdout-size", "100", "--valid-size", "100", "--adv-start", "1", "--eval-every", "0.5",
            "--device", "cpu", "--metric", "logloss", "--no-progress", "--no-save-model", *extra]


@pytest.mark.slow
def test_search_screens_promotes_confirms_on_fresh_seeds_and_resumes_without_training(data_dir, model_dirs,
                                                                                     tmp_path, monkeypatch, capsys):
    out, ran = tmp_path / "search", []
    real_run = advtrain.run
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a, **k: (ran.append((cfg.method, cfg.fgm_eps, cfg.seed)),
                                                               real_run(cfg, *a, **k))[1])
    assert advtrain.main(search_args(data_dir, model_dirs["bert"], out)) == 0
    screen = sorted(r for r in ran if r[2] in (1, 2))
    assert screen == sorted([("baseline", 0.2, 1), ("baseline", 0.2, 2)] + [("fgm", e, s) for e in (0.05, 0.5)
                                                                            for s in (1, 2)])
    runs = pd.read_csv(out / "runs.csv")
    screened = advtrain.summarize(runs[runs["phase"] == "screen"], "baseline", ["fgm_eps"]).set_index("fgm_eps")
    gains = screened["gain"].dropna()
    confirm = sorted(r for r in ran if r[2] in (3, 4, 5))
    text = (out / "results.md").read_text()
    table = pd.read_csv(out / "results.csv").set_index("method")
    if (gains > 0).any():
        best = gains.idxmax()
        assert confirm == sorted([("baseline", 0.2, s) for s in (3, 4, 5)] + [("fgm", best, s) for s in (3, 4, 5)])
        assert f"promoted at most 1 with a mean paired gain above zero: fgm (fgm_eps={best})" in text
        row = table[table["fgm_eps"] == best].iloc[0]
        assert row["promoted"] and row["confirm_seeds"] == 3
        assert row["verdict"] in ("pays", "costs", "undecided") and f"| {row['verdict']} |" in text
        assert "## Confirmation on fresh seeds: 3, 4, 5" in text
        assert advtrain.main(search_args(data_dir, model_dirs["bert"], out, "--promote", "2", "--no-train")) == 2
        assert "and its confirmation runs exist: keep --promote 1" in capsys.readouterr().err  # chosen beforehand
    else:  # nothing gained on the screen: nothing is confirmed, and results.md says so
        assert confirm == [] and "none gained" in text
    assert set(table.loc["fgm", "verdict"]) <= {"pays", "costs", "undecided", "not promoted"}
    assert (out / "grid.png").stat().st_size > 10_000 and not (out / ".prefix").exists()
    assert json.loads((out / "fgm-fgm_eps=0.5-seed1" / "metrics.json").read_text())["fork"][0]["epoch"] == 1

    ran.clear()
    capsys.readouterr()
    assert advtrain.main(search_args(data_dir, model_dirs["bert"], out, "--resume")) == 0
    assert ran == [] and (out / "results.md").read_text() == text


@pytest.mark.slow
def test_a_budget_stops_the_search_between_runs_and_resume_continues(data_dir, model_dirs, tmp_path, capsys):
    out = tmp_path / "search"
    assert advtrain.main(search_args(data_dir, model_dirs["bert"], out, "--budget", "0.0001")) == 0
    said = capsys.readouterr().out
    assert "the budget of 0.0001 minutes is spent" in said and "5 run(s) left" in said and "--resume" in said
    assert len(list(out.glob("*/metrics.json"))) == 1  # the baseline of seed 1, and nothing after it
    text = (out / "results.md").read_text()
    assert "**Stopped by --budget**: 5 run(s) left (5 screen)" in text and "not decided yet" in text
    assert (out / ".prefix").is_dir()  # kept for the attacked runs still to come
    assert advtrain.main(search_args(data_dir, model_dirs["bert"], out, "--resume", "--no-train")) == 0
    assert len(list(out.glob("*/metrics.json"))) == 1
    assert advtrain.main(search_args(data_dir, model_dirs["bert"], out, "--resume", "--budget", "0.02")) == 0
    assert len(list(out.glob("*/metrics.json"))) > 1
    for name in ("fgm-fgm_eps=0.05-seed1", "fgm-fgm_eps=0.5-seed1"):
        metrics = out / name / "metrics.json"
        if metrics.is_file():  # started from the state the baseline saved in the first call
            assert json.loads(metrics.read_text())["fork"][0]["epoch"] == 1


def test_search_refusals_name_the_setting(tmp_path):
    cfg = advtrain.Config(output_dir=str(tmp_path / "x"))
    cases = [(["fgm", "awp"], advtrain.Search([1], [2]), "add baseline to --methods"),
             (["baseline"], advtrain.Search([1], [2]), "needs an attack beside the baseline"),
             (["baseline", "fgm"], advtrain.Search([1, 2], [2, 3]), "2 also screen"),
             (["baseline", "fgm"], advtrain.Search([1], []), "--confirm-seeds names no seed"),
             (["baseline", "fgm"], advtrain.Search([1], [2], promote=0), "--promote is how many")]
    for methods, search, says in cases:
        with pytest.raises(advtrain.UserError, match=says):
            advtrain.compare(cfg, methods, [], search=search)
    with pytest.raises(advtrain.UserError, match="--budget is minutes"):
        advtrain.compare(cfg, ["baseline"], [1], budget=-3)
    assert advtrain.main(["compare", "--search", "--seeds", "1,2"]) == 2


def test_the_confirmed_settings_ship_as_the_overfit_preset_and_the_fgm_and_sift_notebooks_default():
    from conftest import ROOT

    cfg = advtrain.Config(preset="overfit", output_dir="x")
    assert (cfg.method, cfg.fgm_eps, cfg.fgm_scope, cfg.eps_relative, cfg.adv_start, cfg.eval_every) == \
        ("fgm", 0.2, "example", True, "1", 0.5)
    assert advtrain.Config(preset="overfit", method="awp", output_dir="x").method == "awp"  # what you give wins
    sift = advtrain.Config(preset="overfit", method="sift", output_dir="x")  # the setting bench/runs/spooky-sift ran
    assert (sift.method, sift.sift_lambda, sift.sift_init, sift.sift_lr, sift.adv_start, sift.eval_every) == \
        ("sift", 3.0, 1e-2, 1e-4, "1", 0.5)
    assert advtrain.fork_epoch(cfg) == advtrain.fork_epoch(sift) == 1  # compare trains epoch 1 once, with the baseline
    for method in ("fgm", "sift"):
        notebook = json.loads((ROOT / "notebooks" / method / f"advtrain-{method}.ipynb").read_text())
        assert 'preset="overfit"' in "".join(notebook["cells"][2]["source"])


# --- arms: each method tuned on its own budget, judged best against best (issue 37) ---------------------------

def test_an_arm_grid_applies_to_its_method_alone():
    grids = advtrain.parse_grids([["baseline:lr=1e-3,2e-3", "epochs=1,2"], ["fgm:", "lr=1e-3", "fgm_eps=0.1,0.2"],
                                  ["sift_lambda=1,3"]])
    assert grids[0]["method"] == ["baseline"] and grids[1]["method"] == ["fgm"]
    assert advtrain.grid_keys(grids) == ["lr", "epochs", "fgm_eps", "sift_lambda"] and advtrain.has_arms(grids)
    assert advtrain.grid_settings(grids, "baseline") == [{"lr": 1e-3, "epochs": e} for e in (1, 2)] + \
        [{"lr": 2e-3, "epochs": e} for e in (1, 2)]  # not the fgm arm's lr, nor the sift grid
    assert advtrain.grid_settings(grids, "fgm") == [{"lr": 1e-3, "fgm_eps": 0.1}, {"lr": 1e-3, "fgm_eps": 0.2}]
    assert advtrain.grid_settings(grids, "sift") == [{"sift_lambda": 1.0}, {"sift_lambda": 3.0}]
    assert advtrain.grid_settings(grids[:2], "awp") == [{}]  # no arm of its own, no shared grid: its defaults
    cfg = advtrain.Config(output_dir="x")
    for grid, says in [(["fgm:"], "names no setting for its arm"), (["magic:lr=1"], "'magic' is not a method"),
                       (["fgm:awp_lr=1"], "awp_lr does not change a fgm run"), (["awp:lr=1"], "which --methods does")]:
        with pytest.raises(advtrain.UserError, match=says):
            advtrain.compare(cfg, ["baseline", "fgm"], [1], grid=advtrain.parse_grids([grid]))
    unequal = advtrain.parse_grids([["baseline:lr=1e-3,2e-3,3e-3"], ["fgm:fgm_eps=0.1,0.2"]])
    with pytest.raises(advtrain.UserError, match=r"baseline 3 setting\(s\), fgm 2 setting\(s\): give each arm as many"):
        advtrain.compare(cfg, ["baseline", "fgm"], [], grid=unequal, search=advtrain.Search([1], [2]))


def test_arms_pair_every_attacked_run_with_the_best_reference_setting():
    runs = pd.DataFrame({"method": ["baseline"] * 4 + ["fgm"] * 4, "seed": [1, 2] * 4,
                         "lr": [1e-3, 1e-3, 2e-3, 2e-3, 1e-3, 1e-3, 2e-3, 2e-3],
                         "score": [0.70, 0.72, 0.80, 0.78, 0.81, 0.80, 0.75, 0.76], "metric": "f1",
                         "higher_is_better": True, "valid_best": 0.0, "attack_seen": True,
                         "run": [f"r{i}" for i in range(8)]})
    best = advtrain.best_reference(runs, "baseline", ["lr"])
    assert best == {"lr": 2e-3}  # mean 0.79 against 0.71
    pairs = advtrain.reference_runs(runs, "baseline", ["lr"], best)
    assert pairs == [None] * 4 + ["r2", "r3", "r2", "r3"]  # whatever the fgm run's lr
    paired = runs.assign(paired=pairs)
    summary = advtrain.summarize(paired, "baseline", ["lr"]).set_index(["method", "lr"])
    assert summary.loc[("fgm", 1e-3), "gain"] == pytest.approx(((0.81 - 0.80) + (0.80 - 0.78)) / 2)
    assert summary.loc[("fgm", 2e-3), "better"] == 0 and summary.loc[("fgm", 1e-3), "better"] == 2
    same_lr = advtrain.summarize(runs, "baseline", ["lr"]).set_index(["method", "lr"])  # no arms: lr with lr
    assert same_lr.loc[("fgm", 1e-3), "gain"] == pytest.approx(((0.81 - 0.70) + (0.80 - 0.72)) / 2)


@pytest.mark.slow
def test_a_search_with_arms_confirms_the_promoted_against_the_baselines_best(data_dir, model_dirs, tmp_path,
                                                                            monkeypatch):
    out, ran = tmp_path / "arms", []
    real_run = advtrain.run
    monkeypatch.setattr(advtrain, "run", lambda cfg, *a, **k: (ran.append((cfg.method, cfg.lr, cfg.fgm_eps, cfg.seed)),
                                                               real_run(cfg, *a, **k))[1])
    args = ["compare", "--methods", "baseline,fgm", "--search", "--grid", "baseline:lr=1e-4,1e-3",
            "--grid", "fgm:fgm_eps=0.05,0.5", "--screen-seeds", "1,2", "--confirm-seeds", "3,4", "--promote", "2",
            "--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
            "--batch-size", "16", "--lr", "1e-3", "--holdout-size", "100", "--valid-size", "100", "--adv-start", "1",
            "--eval-every", "0.5", "--device", "cpu", "--metric", "logloss", "--no-progress", "--no-save-model"]
    assert advtrain.main(args) == 0
    runs = pd.read_csv(out / "runs.csv")
    screen = runs[runs["phase"] == "screen"]
    assert len(screen) == 8  # 2 settings x 2 seeds for each arm
    base = screen[screen["method"] == "baseline"].groupby("lr")["score"].mean()
    best_lr = base.idxmin()  # log loss: lower is better
    recorded = json.loads((out / "search.json").read_text())
    assert recorded["reference"] == f"baseline (lr={best_lr})"
    confirm = sorted(r for r in ran if r[3] in (3, 4))
    promoted = recorded["promoted"]
    assert sorted({(m, lr) for m, lr, _, _ in confirm if m == "baseline"}) == ([("baseline", best_lr)]
                                                                               if promoted or confirm else [])
    table = pd.read_csv(out / "results.csv")
    fgm = table[table["method"] == "fgm"]
    best_scores = screen[(screen["method"] == "baseline") & (screen["lr"] == best_lr)].set_index("seed")["score"]
    for _, row in fgm.iterrows():  # each screened gain is over the best baseline of the same seed
        mine = screen[(screen["method"] == "fgm") & (screen["fgm_eps"] == row["fgm_eps"])].set_index("seed")["score"]
        assert row["gain"] == pytest.approx(-(mine - best_scores).mean())
    text = (out / "results.md").read_text()
    assert "## Arms: each method tuned on its own, judged best against best" in text
    assert "| baseline | 2 | 4 |" in text and f"baseline (lr={best_lr}) (best mean logloss" in text
