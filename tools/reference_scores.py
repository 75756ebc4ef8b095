"""Reference scores beside a finished advtrain run, on exactly its holdout: a constant predictor and TF-IDF + a
linear model (scikit-learn), in the competition's metric. Prints a markdown table and the command.

    python tools/reference_scores.py submissions/compare/baseline-seed42 [more run folders]

The split, the columns, the task and the metric come from each run's metrics.json. TF-IDF (word 1-2-grams and
character 2-5-grams) feeds logistic regression (classification, one model per label for multilabel) or ridge
regression; its regularisation is picked on the run's validation rows and it is scored on the holdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.sparse import hstack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from advtrain import Config, Task, holdout_split, input_texts, load_competition, metric_value, split_seed  # noqa: E402


def features(train_texts, other_texts):
    from sklearn.feature_extraction.text import TfidfVectorizer

    words = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=3, sublinear_tf=True,
                            max_features=200_000)
    fitted = hstack([words.fit_transform(train_texts), chars.fit_transform(train_texts)]).tocsr()
    return fitted, [hstack([words.transform(t), chars.transform(t)]).tocsr() for t in other_texts]


def fit_predict(task: Task, strength: float, x_train, y_train, x_other):
    from sklearn.linear_model import LogisticRegression, Ridge

    if task.classes:
        model = LogisticRegression(C=strength, max_iter=2000).fit(x_train, y_train)
        return [model.predict_proba(x) for x in x_other]
    if task.kind == "multilabel":
        columns = [LogisticRegression(C=strength, max_iter=2000).fit(x_train, y_train[:, j])
                   for j in range(y_train.shape[1])]
        return [np.stack([m.predict_proba(x)[:, 1] for m in columns], 1) for x in x_other]
    model = Ridge(alpha=1 / strength).fit(x_train, y_train)
    return [model.predict(x).reshape(x.shape[0], -1) for x in x_other]


def constant(task: Task, y_train, n: int) -> np.ndarray:
    """The best constant: class priors (probabilities) or the mean target."""
    if task.classes:
        return np.tile(np.bincount(y_train, minlength=len(task.classes)) / len(y_train), (n, 1))
    return np.tile(y_train.mean(0), (n, 1))


def reference(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    settings = metrics["config"]
    cfg = Config(**{k: v for k, v in settings.items() if k != "output_dir"})
    data = load_competition(cfg)
    task = Task(**metrics["task"])
    y = task.encode(data["train"])
    groups = data["train"][cfg.group_col].to_numpy() if cfg.group_col else None
    train, valid, holdout = holdout_split(len(y), split_seed(cfg), cfg.holdout_size, cfg.valid_size, groups)
    first, second = input_texts(data["train"], cfg, " [SEP] ")
    texts = np.array([a if second is None else f"{a} [SEP] {b}" for a, b in
                      zip(first, second if second is not None else first)], dtype=object)
    x_train, (x_valid, x_holdout) = features(texts[train], [texts[valid], texts[holdout]])
    best = None
    for strength in (0.3, 1.0, 3.0, 10.0):
        p_valid, p_holdout = fit_predict(task, strength, x_train, y[train], [x_valid, x_holdout])
        value = metric_value(task.metric, task, y[valid], p_valid)
        if best is None or (value > best[0] if task.higher_is_better else value < best[0]):
            best = (value, strength, p_holdout)
    return {"run": run.name, "metric": task.metric, "rows": len(holdout),
            "kit": metrics["score"]["value"], "on": metrics["score"]["on"],
            "constant": metric_value(task.metric, task, y[holdout], constant(task, y[train], len(holdout))),
            "tfidf": metric_value(task.metric, task, y[holdout], best[2]), "tfidf_strength": best[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (split=holdout)")
    args = parser.parse_args(argv)
    print("| run | metric | holdout rows | advtrain | constant | TF-IDF + linear |\n|---|---|---|---|---|---|")
    for run in args.runs:
        r = reference(Path(run))
        print(f"| {r['run']} | {r['metric']} | {r['rows']} | {r['kit']:.4f} | {r['constant']:.4f} | "
              f"{r['tfidf']:.4f} (C={r['tfidf_strength']:g}) |")
    print(f"\ncommand: python tools/reference_scores.py {' '.join(args.runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
