"""Any Kaggle text competition: task inference, metrics against hand computations, splits with groups, and
every schema of the competitions the kit is checked on (synthetic fixtures with their exact columns and quirks)
trained end to end into a submission in the sample submission's layout."""
import json
import math

import numpy as np
import pandas as pd
import pytest

import advtrain
from conftest import base_config

WORDS = ["fire", "flood", "pizza", "music", "storm", "garden", "river", "engine", "poem", "market", "night", "ghost"]


def sentences(rng, n, signal=None, lo=3, hi=9):
    """n texts of random words; signal[i] (an int) adds a word that tells row i's label."""
    out = []
    for i in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(lo, hi)))
        if signal is not None:
            words.insert(0, WORDS[int(signal[i]) % len(WORDS)])
        out.append(" ".join(words))
    return out


def task_of(train_csv: str, **kw):
    df = pd.read_csv(__import__("io").StringIO(train_csv), dtype=str, keep_default_na=False)
    cols = kw.pop("target_cols", ["target"])
    return advtrain.Task.infer(df, cols, **kw)


# --- task inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("csv,cols,kind,metric", [
    ("target\n0\n1\n1\n", ["target"], "binary", "f1"),
    ("target\nEAP\nHPL\nMWS\n", ["target"], "multiclass", "accuracy"),
    ("target\n0\n1\n2\n", ["target"], "multiclass", "accuracy"),
    ("target\n1\n2\n", ["target"], "multiclass", "accuracy"),
    ("a,b\n0,1\n1,0\n0,0\n", ["a", "b"], "multilabel", "auc"),
    ("target\n-0.3\n1.2\n0\n", ["target"], "regression", "rmse"),
    ("score\n0.0\n0.25\n1.0\n", ["score"], "regression", "rmse"),
    ("content,wording\n0.1,2\n-1,0.5\n", ["content", "wording"], "regression", "mcrmse"),
])
def test_auto_decides_the_task_and_its_default_metric(csv, cols, kind, metric):
    task = task_of(csv, target_cols=cols)
    assert (task.kind, task.metric) == (kind, metric)


def test_classes_keep_the_text_of_train_in_numeric_order():
    assert task_of("target\n10\n2\n1\n2\n").classes == ["1", "2", "10"]
    assert task_of("target\nMWS\nEAP\nHPL\n").classes == ["EAP", "HPL", "MWS"]


@pytest.mark.parametrize("csv,kw,message", [
    ("target\n0\n2\n", dict(kind="binary"), "target must be 0 or 1 for task binary"),
    ("target\na\nb\n", dict(kind="regression"), "target must be numbers for task regression"),
    ("target\n0\n1\n", dict(metric="rmse"), "metric rmse does not score a binary task"),
    ("a,b\nx,y\nz,w\n", dict(target_cols=["a", "b"]), "several targets must be 0/1"),
    ("target\nEAP\nEAP\n", {}, "holds one class only"),
    ("target,x\n1,a\n,b\n", {}, "1 row(s) have no target (line 3)"),
    ("target\n" + "0.5\n" * 12 + "inf\n", {}, "target holds numbers but 1 value(s) that are not (line 14, 'inf')"),
    ("target\n" + "".join(f"id{i}\n" for i in range(120)), {}, "120 distinct values in 120 rows"),
])
def test_targets_that_do_not_fit_the_task_are_one_sentence(csv, kw, message):
    with pytest.raises(advtrain.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        task_of(csv, **kw)


def test_a_metric_that_does_not_fit_an_explicit_task_fails_when_the_config_is_built():
    with pytest.raises(advtrain.UserError, match="metric qwk does not score a multilabel task"):
        advtrain.Config(task="multilabel", metric="qwk")
    with pytest.raises(advtrain.UserError, match="score is both a text and a target column"):
        advtrain.Config(text_cols="anchor,score", target_cols="score")
    with pytest.raises(advtrain.UserError, match="text_cols names no column"):
        advtrain.Config(text_cols=" , ")


# --- metrics against hand computations -------------------------------------------------------------------


def test_classification_metrics_match_hand_computations():
    task = advtrain.Task("multiclass", ["author"], "logloss", ["EAP", "HPL", "MWS"])
    y = np.array([0, 1, 2, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    assert advtrain.metric_value("logloss", task, y, p) == pytest.approx(
        -np.mean(np.log([0.7, 0.8, 0.4, 0.4])))
    assert advtrain.metric_value("accuracy", task, y, p) == pytest.approx(3 / 4)  # argmax 0,1,2,0
    # macro F1: class 0 (tp1 fp1 fn0) 2/3, class 1 (tp1 fp0 fn1) 2/3, class 2 (tp1) 1
    assert advtrain.metric_value("f1", task, y, p) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # one-vs-rest AUC, averaged: class 0 scores 0.7 against 0.1,0.3,0.5 -> 1; class 1: positives .8,.4 vs
    # negatives .2,.3 -> 1; class 2: .4 vs .1,.1,.1 -> 1
    assert advtrain.metric_value("auc", task, y, p) == pytest.approx(1.0)
    # quadratic weighted kappa of labels [0,1,2,0] against [0,1,2,1]: observed weighted disagreement
    # 1/4 * (1/4 weight) ... by the definition 1 - sum(w*O)/sum(w*E)
    labels, n = np.array([0, 1, 2, 0]), 3
    w = np.array([[(i - j) ** 2 / (n - 1) ** 2 for j in range(n)] for i in range(n)])
    observed = np.zeros((n, n))
    for a, b in zip(y, labels):
        observed[a, b] += 1
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    assert advtrain.metric_value("qwk", task, y, p) == pytest.approx(1 - (w * observed).sum() / (w * expected).sum())


def test_logloss_rescales_rows_and_clips_as_kaggle_does():
    task = advtrain.Task("multiclass", ["t"], "logloss", ["a", "b"])
    p = np.array([[2.0, 2.0], [0.0, 1.0]])  # unnormalised row; a hard zero on the true class of row 2? no: y=1
    assert advtrain.metric_value("logloss", task, np.array([0, 1]), p) == pytest.approx(
        -np.mean([np.log(0.5), np.log(1 - 1e-15)]), abs=1e-9)


def test_binary_f1_auc_and_threshold_match_hand_computations():
    task = advtrain.DISASTER_TWEETS
    y = np.array([1, 0, 1, 0, 1])
    p1 = np.array([0.9, 0.6, 0.4, 0.2, 0.7])
    pred = np.stack([1 - p1, p1], 1)
    # at 0.5: predicted 1,1,0,0,1 -> tp 2, fp 1, fn 1 -> F1 = 4/6
    assert advtrain.metric_value("f1", task, y, pred) == pytest.approx(4 / 6)
    # at 0.3: predicted 1,1,1,0,1 -> tp 3 fp 1 -> F1 = 6/7
    assert advtrain.metric_value("f1", task, y, pred, threshold=0.3) == pytest.approx(6 / 7)
    # AUC: pairs (pos, neg) ranked right: .9>.6,.9>.2,.4<.6 wrong,.4>.2,.7>.6,.7>.2 -> 5/6
    assert advtrain.metric_value("auc", task, y, pred) == pytest.approx(5 / 6)


def test_multilabel_auc_is_the_mean_of_the_columns_with_both_classes():
    task = advtrain.Task("multilabel", ["a", "b", "c"], "auc")
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.2], [0.6, 0.1, 0.3]])
    # a: positives .9,.6 vs .1 -> 1; b: positives .3,.1 vs .2 -> 1/2; c: one class only -> left out
    assert advtrain.metric_value("auc", task, y, p) == pytest.approx((1 + 0.5) / 2)


def test_regression_metrics_match_hand_computations():
    one = advtrain.Task("regression", ["t"], "rmse", bounds=[0, 4])
    y, p = np.array([[1.0], [2.0], [4.0]]), np.array([[1.5], [2.0], [3.0]])
    assert advtrain.metric_value("rmse", one, y, p) == pytest.approx(math.sqrt((0.25 + 0 + 1) / 3))
    yc, pc = y[:, 0] - y.mean(), p[:, 0] - p.mean()
    assert advtrain.metric_value("pearson", one, y, p) == pytest.approx(
        (yc * pc).sum() / math.sqrt((yc ** 2).sum() * (pc ** 2).sum()))
    two = advtrain.Task("regression", ["content", "wording"], "mcrmse", bounds=[-2, 2])
    y2 = np.array([[0.0, 1.0], [1.0, 1.0]])
    p2 = np.array([[0.0, 0.0], [2.0, 1.0]])
    # content: sqrt((0 + 1) / 2); wording: sqrt((1 + 0) / 2)
    assert advtrain.metric_value("mcrmse", two, y2, p2) == pytest.approx(math.sqrt(0.5))
    qwk = advtrain.Task("regression", ["score"], "qwk", bounds=[0, 3])
    # predictions rounded into the training range: 1.4 -> 1, 3.7 -> 3, -1 -> 0
    assert qwk.labels(np.array([[1.4], [3.7], [-1.0]])).ravel().tolist() == [1, 3, 0]


def test_lower_is_better_for_losses_and_nan_never_wins():
    assert advtrain.better("rmse", 0.5, 0.6) and not advtrain.better("rmse", 0.7, 0.6)
    assert advtrain.better("f1", 0.7, 0.6) and not advtrain.better("f1", float("nan"), 0.1)
    sel = advtrain.Selection("rmse")
    import torch
    model = torch.nn.Linear(1, 1)
    for step, value in enumerate([0.9, 0.5, 0.7]):
        sel.record({"epoch": step, "step": step, "attack_seen": False}, {"rmse": value}, np.zeros(1), model)
    assert sel.best["rmse"] == 0.5


# --- splits --------------------------------------------------------------------------------------------


def test_holdout_and_kfold_never_put_a_group_on_two_sides():
    groups = np.repeat(np.arange(40), np.random.default_rng(0).integers(1, 8, size=40))
    train, valid, holdout = advtrain.holdout_split(len(groups), 3, 0.2, 0.2, groups)
    sides = [set(groups[s]) for s in (train, valid, holdout)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert sorted(np.concatenate([train, valid, holdout]).tolist()) == list(range(len(groups)))
    key = groups % 3
    for tr, va in advtrain.kfold_splits(key, 4, 0, groups):
        assert not set(groups[tr]) & set(groups[va])


def test_sizes_are_counts_or_fractions():
    train, valid, holdout = advtrain.holdout_split(1000, 0, 0.1, 250)
    assert (len(holdout), len(valid), len(train)) == (100, 250, 650)


def test_regression_and_multilabel_folds_are_stratified():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(500, 1)).astype(np.float32)
    task = advtrain.Task("regression", ["t"], "rmse", bounds=[-3, 3])
    for _, va in advtrain.kfold_splits(advtrain.strata(task, y), 5, 0):
        assert abs(np.median(y[va]) - np.median(y)) < 0.2
    labels = np.zeros((500, 2), dtype=np.float32)
    labels[rng.choice(500, 10, replace=False), 1] = 1  # a rare label: 10 rows
    labels[:, 0] = rng.random(500) < 0.5
    ml = advtrain.Task("multilabel", ["common", "rare"], "auc")
    assert all(labels[va, 1].sum() == 2 for _, va in advtrain.kfold_splits(advtrain.strata(ml, labels), 5, 0))


# --- every schema, end to end ---------------------------------------------------------------------------


def _write(folder, name, df, sep=","):
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / name, index=False, sep=sep)


def patents(folder, rng, n=240, m=60):
    anchors = [f"anchor{i}" for i in range(30)]
    score = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=n + m)
    frame = pd.DataFrame({"id": [f"{i:016x}" for i in rng.choice(10**6, n + m, replace=False)],
                          "anchor": rng.choice(anchors, n + m), "target": sentences(rng, n + m, (score * 4)),
                          "context": rng.choice(["A47", "B60", "G06", "H04"], n + m), "score": score})
    _write(folder, "train.csv", frame.iloc[:n])
    _write(folder, "test.csv", frame.iloc[n:].drop(columns="score"))
    _write(folder, "sample_submission.csv", pd.DataFrame({"id": frame["id"].iloc[n:], "score": 0}))
    return dict(text_cols="anchor,target,context", target_cols="score", metric="pearson", group_col="anchor")


def watson(folder, rng, n=240, m=60):
    label = rng.integers(0, 3, n + m)
    frame = pd.DataFrame({"id": [f"w{i}" for i in range(n + m)], "premise": sentences(rng, n + m, label),
                          "hypothesis": sentences(rng, n + m), "lang_abv": rng.choice(["en", "fr", "th"], n + m),
                          "language": rng.choice(["English", "French", "Thai"], n + m), "label": label})
    _write(folder, "train.csv", frame.iloc[:n])
    _write(folder, "test.csv", frame.iloc[n:].drop(columns="label"))
    _write(folder, "sample_submission.csv", pd.DataFrame({"id": frame["id"].iloc[n:], "prediction": 0}))
    return dict(text_cols="premise,hypothesis", target_cols="label")


def movies(folder, rng, n=240, m=60):
    sentiment = rng.integers(0, 5, n + m)
    phrases = sentences(rng, n + m, sentiment)
    phrases[n + 3] = "None"  # a test phrase that is literally None
    phrases[5], phrases[n + 7] = " ", " "  # a phrase that is a single space in each file
    frame = pd.DataFrame({"PhraseId": np.arange(1, n + m + 1), "SentenceId": np.arange(n + m) // 6,
                          "Phrase": phrases, "Sentiment": sentiment})
    _write(folder, "train.tsv", frame.iloc[:n], sep="\t")
    _write(folder, "test.tsv", frame.iloc[n:].drop(columns="Sentiment"), sep="\t")
    _write(folder, "sampleSubmission.csv", pd.DataFrame({"PhraseId": frame["PhraseId"].iloc[n:], "Sentiment": 2}))
    return dict(text_cols="Phrase", target_cols="Sentiment", group_col="SentenceId")


JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def jigsaw(folder, rng, n=300, m=60):
    frame = pd.DataFrame({"id": [f"{i:016x}" for i in range(n + m)]})
    base = rng.integers(0, 4, n + m)
    frame["comment_text"] = sentences(rng, n + m, base)
    for j, col in enumerate(JIGSAW):
        frame[col] = (rng.random(n + m) < (0.3 if j < 3 else 0.02)).astype(int)
    frame.loc[:n - 1, "threat"] = 0
    frame.loc[[3, 50, 100, 150, 200], "threat"] = 1  # under 2% positive
    _write(folder, "train.csv", frame.iloc[:n])
    _write(folder, "test.csv", frame.iloc[n:][["id", "comment_text"]])
    _write(folder, "sample_submission.csv", frame.iloc[n:][["id"]].assign(**{c: 0.5 for c in JIGSAW}))
    return dict(text_cols="comment_text", target_cols=",".join(JIGSAW))


def auc_binary(folder, rng, n=240, m=60):
    target = rng.integers(0, 2, n + m)
    frame = pd.DataFrame({"id": np.arange(n + m), "text": sentences(rng, n + m, target), "target": target})
    _write(folder, "train.csv", frame.iloc[:n])
    _write(folder, "test.csv", frame.iloc[n:].drop(columns="target"))
    _write(folder, "sample_submission.csv", pd.DataFrame({"id": frame["id"].iloc[n:], "target": 0.5}))
    return dict(metric="auc")


SCHEMAS = {"us-patent-phrase-matching": patents, "contradictory-my-dear-watson": watson,
           "sentiment-analysis-on-movie-reviews": movies, "jigsaw-toxic-comment": jigsaw, "binary-auc": auc_binary}
EXPECTED = {"us-patent-phrase-matching": ("regression", "pearson", "number"),
            "contradictory-my-dear-watson": ("multiclass", "accuracy", "label"),
            "sentiment-analysis-on-movie-reviews": ("multiclass", "accuracy", "label"),
            "jigsaw-toxic-comment": ("multilabel", "auc", "probability"),
            "binary-auc": ("binary", "auc", "probability")}


@pytest.fixture(scope="module")
def schema_model(tmp_path_factory):
    texts = [" ".join(WORDS), "A47 B60 G06 H04 anchor0 None"] + [f"anchor{i}" for i in range(30)]
    return advtrain.make_tiny_model(tmp_path_factory.mktemp("schema-model"), "bert", texts)


def check_run(out, data_dir, kind, metric, values, sample_name="sample_submission.csv"):
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["task"]["kind"], metrics["score"]["metric"]) == (kind, metric)
    assert math.isfinite(metrics["score"]["value"])
    sub = pd.read_csv(out / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(data_dir / sample_name, dtype=str, keep_default_na=False)
    assert list(sub.columns) == list(sample.columns)
    assert sub.iloc[:, 0].tolist() == sample.iloc[:, 0].tolist()  # every test id, in the sample's order
    cells = sub.iloc[:, 1:].to_numpy().ravel()
    if values == "label":
        assert all(c.isdigit() for c in cells)
    else:
        numbers = cells.astype(float)
        assert np.isfinite(numbers).all() and len(set(cells)) > 1
        if values == "probability":
            assert ((numbers >= 0) & (numbers <= 1)).all()
    return metrics, sub


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_every_schema_trains_into_its_sample_submission(schema, schema_model, tmp_path):
    rng = np.random.default_rng(0)
    flags = SCHEMAS[schema](tmp_path / "data", rng)
    out = tmp_path / "out"
    argv = ["train", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--model", str(schema_model),
            "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--holdout-size", "0.2", "--valid-size", "0.2",
            "--device", "cpu", "--no-progress", "--no-save-model", "--eval-every", "1"]
    for k, v in flags.items():
        argv += ["--" + k.replace("_", "-"), v]
    assert advtrain.main(argv) == 0
    kind, metric, values = EXPECTED[schema]
    sample = "sampleSubmission.csv" if schema.startswith("sentiment") else "sample_submission.csv"
    metrics, sub = check_run(out, tmp_path / "data", kind, metric, values, sample)
    if schema.startswith("sentiment"):
        test = pd.read_csv(tmp_path / "data" / "test.tsv", sep="\t", dtype=str, keep_default_na=False,
                           quoting=3)
        assert "None" in test["Phrase"].tolist() and " " in test["Phrase"].tolist()
    check = [x for k, v in flags.items() if k != "group_col" for x in ("--" + k.replace("_", "-"), v)]
    assert advtrain.main(["check-submission", str(out / "submission.csv"), "--data-dir", str(tmp_path / "data"),
                          *check]) == 0


def test_summaries_joined_in_pandas_train_through_the_python_api(schema_model, tmp_path):
    """CommonLit student summaries: two files joined in pandas, two regression targets, MCRMSE, grouped by
    prompt, submission student_id,content,wording."""
    rng = np.random.default_rng(1)
    prompts = pd.DataFrame({"prompt_id": ["39c16e", "3b9047", "814d6b", "ebad26"],
                            "prompt_question": sentences(rng, 4), "prompt_title": sentences(rng, 4, lo=1, hi=3),
                            "prompt_text": sentences(rng, 4, lo=20, hi=30)})
    n, m = 200, 40
    content = rng.normal(size=n + m)
    summaries = pd.DataFrame({"student_id": [f"{i:012x}" for i in range(n + m)],
                              "prompt_id": rng.choice(prompts["prompt_id"], n + m),
                              "text": sentences(rng, n + m, (content > 0).astype(int)), "content": content,
                              "wording": content * 0.5 + rng.normal(size=n + m) * 0.3})
    joined = summaries.merge(prompts, on="prompt_id")
    train, test = joined.iloc[:n], joined.iloc[n:].drop(columns=["content", "wording"])
    sample = pd.DataFrame({"student_id": test["student_id"], "content": 0.0, "wording": 0.0})
    cfg = base_config("", schema_model, tmp_path / "out", epochs=1, holdout_size=0.2, valid_size=0.2,
                      text_cols=["text", "prompt_question"], target_cols="content,wording", id_col="student_id",
                      group_col="prompt_id", eval_every=1.0)
    metrics = advtrain.run(cfg, train=train, test=test, sample_submission=sample)
    assert metrics["task"]["kind"] == "regression" and metrics["score"]["metric"] == "mcrmse"
    sub = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert list(sub.columns) == ["student_id", "content", "wording"]
    assert sub["student_id"].tolist() == sample["student_id"].tolist()
    oof = pd.read_csv(tmp_path / "out" / "oof.csv", dtype={"id": str})
    holdout = oof[oof["split"] == "holdout"]
    y, p = holdout[["content", "wording"]].to_numpy(), holdout[["pred_content", "pred_wording"]].to_numpy()
    assert metrics["score"]["value"] == pytest.approx(np.mean(np.sqrt(((y - p) ** 2).mean(0))), rel=1e-5)
    prompts_per_side = [set(joined.iloc[:n].set_index("student_id").loc[oof[oof["split"] == s]["id"], "prompt_id"])
                        for s in ("valid", "holdout")]
    assert not prompts_per_side[0] & prompts_per_side[1]


def test_spooky_probabilities_one_column_per_class_in_the_samples_order(schema_model, tmp_path):
    rng = np.random.default_rng(2)
    author = rng.choice(["EAP", "HPL", "MWS"], 300)
    frame = pd.DataFrame({"id": [f"id{i:05d}" for i in range(300)],
                          "text": sentences(rng, 300, pd.factorize(author)[0]), "author": author})
    data = tmp_path / "data"
    _write(data, "train.csv", frame.iloc[:240])
    _write(data, "test.csv", frame.iloc[240:][["id", "text"]])
    _write(data, "sample_submission.csv", frame.iloc[240:][["id"]].assign(EAP=0.4, MWS=0.3, HPL=0.3))  # own order
    cfg = base_config(data, schema_model, tmp_path / "out", epochs=1, target_cols="author", metric="logloss",
                      holdout_size=0.2, valid_size=0.2, eval_every=1.0)
    advtrain.run(cfg)
    metrics, sub = check_run(tmp_path / "out", data, "multiclass", "logloss", "probability")
    assert list(sub.columns) == ["id", "EAP", "MWS", "HPL"]
    assert np.allclose(sub[["EAP", "MWS", "HPL"]].astype(float).sum(axis=1), 1, atol=1e-5)
    probs = pd.read_csv(tmp_path / "out" / "test_probs.csv")
    assert list(probs.columns) == ["id", "EAP", "HPL", "MWS"]


def test_a_sample_submission_the_task_cannot_fill_is_refused_before_training(schema_model, tmp_path):
    data = tmp_path / "data"
    watson(data, np.random.default_rng(0))
    ids = pd.read_csv(data / "test.csv", dtype=str)["id"]
    pd.DataFrame({"id": ids, "a": 0, "b": 0}).to_csv(data / "sample_submission.csv", index=False)
    with pytest.raises(advtrain.UserError, match="has the columns a, b, but this multiclass task"):
        advtrain.run(base_config(data, schema_model, tmp_path / "out", text_cols="premise,hypothesis",
                                 target_cols="label"))


def test_check_submission_judges_values_as_the_task_writes_them(tmp_path):
    data = tmp_path / "data"
    watson(data, np.random.default_rng(0))
    test = pd.read_csv(data / "test.csv", dtype=str)
    good = pd.DataFrame({"id": test["id"], "prediction": "2"})
    good.to_csv(tmp_path / "good.csv", index=False)
    good.assign(prediction="3").to_csv(tmp_path / "bad.csv", index=False)
    flags = ["--data-dir", str(data), "--text-cols", "premise,hypothesis", "--target-cols", "label"]
    assert advtrain.main(["check-submission", str(tmp_path / "good.csv"), *flags]) == 0
    assert advtrain.main(["check-submission", str(tmp_path / "bad.csv"), *flags]) == 2


def test_the_kits_loop_gives_sift_the_divergence_of_the_task(model_dirs):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=2)
    for kind, divergence in (("regression", "mse"), ("multilabel", "binary-symmetric-kl"),
                             ("multiclass", "symmetric-kl")):
        classes = ["x", "y"] if kind == "multiclass" else []
        task = advtrain.Task(kind, ["a", "b"], advtrain.TASK_METRICS[kind][0], classes)
        assert advtrain.make_attack(advtrain.Config(method="sift"), model, task).divergence == divergence


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "regression"])
def test_every_attack_runs_on_every_task(kind, model_dirs):
    import torch

    from conftest import ATTACKS, TEXTS

    task = {"binary": advtrain.DISASTER_TWEETS,
            "multiclass": advtrain.Task("multiclass", ["a"], "accuracy", ["x", "y", "z"]),
            "multilabel": advtrain.Task("multilabel", ["a", "b"], "auc"),
            "regression": advtrain.Task("regression", ["a", "b"], "mcrmse", bounds=[-1, 1])}[kind]
    labels = {"binary": torch.tensor([1, 0, 1, 0]), "multiclass": torch.tensor([0, 2, 1, 2]),
              "multilabel": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
              "regression": torch.randn(4, 2)}[kind]
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch, _ = advtrain.Collator(tok.pad_token_id)([(x, 0) for x in advtrain.tokenize(tok, TEXTS, 64)])
    for method in ATTACKS:
        torch.manual_seed(0)
        model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=task.num_outputs)
        attack = advtrain.make_attack(advtrain.Config(method=method, adv_start="0"), model, task)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = advtrain.micro_step(attack, model, batch, labels, torch.device("cpu"), None, None, 1, task.loss)
        assert torch.isfinite(loss), (kind, method)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), (kind, method)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_ensemble_of_regression_runs_averages_their_values(tmp_path):
    task = advtrain.Task("regression", ["content", "wording"], "mcrmse", bounds=[-2, 2])
    for name, shift in (("a", 0.0), ("b", 1.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({
            "task": advtrain.dataclasses.asdict(task), "config": {},
            "score": {"threshold": 0.5, "value": 0.3, "metric": "mcrmse"},
            "submission": {"id": "student_id", "columns": {"content": "content", "wording": "wording"}}}))
        pd.DataFrame({"id": ["s1", "s2"], "content": [0.1 + shift, 0.2 + shift],
                      "wording": [-0.1 + shift, 0.3 + shift]}).to_csv(run / "test_probs.csv", index=False)
    info = advtrain.ensemble_submission(tmp_path, ["a", "b"], tmp_path / "ens.csv")
    sub = pd.read_csv(tmp_path / "ens.csv")
    assert list(sub.columns) == ["student_id", "content", "wording"]
    assert sub["content"].tolist() == pytest.approx([0.6, 0.7]) and sub["wording"].tolist() == pytest.approx([0.4, 0.8])
    assert info["labels"] is False and info["mean_pairwise_difference"] == pytest.approx(1.0)


def test_reference_scores_rebuild_the_runs_holdout(data_dir, model_dirs, tmp_path):
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import reference_scores

    out = tmp_path / "run"
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0))
    r = reference_scores.reference(out)
    assert r["metric"] == "f1" and r["rows"] == 100 and r["constant"] == 0.0  # the majority class is 0
    assert 0.8 < r["tfidf"] <= 1.0  # the synthetic tweets are easy for words
    assert r["kit"] == json.loads((out / "metrics.json").read_text())["score"]["value"]
