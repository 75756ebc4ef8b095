"""Reference scores beside a finished advtrain run, on exactly its holdout: a constant predictor and TF-IDF + a
linear model (scikit-learn), in the competition's metric. Prints a markdown table and the command.

    python tools/reference_scores.py submissions/compare/baseline-seed42 [more run folders]
    python tools/reference_scores.py RUN --write-run submissions/tfidf    # a member for `advtrain.py blend`
    python tools/reference_scores.py RUN --write-run submissions/tfidf --overwrite   # replace an earlier one

The split, the columns, the task and the metric come from each run's metrics.json. TF-IDF (word 1-2-grams and
character 2-5-grams) feeds logistic regression (classification, one model per label for multilabel) or ridge
regression; its regularisation is picked on the run's validation rows and it is scored on the holdout.
--write-run writes the TF-IDF model's predictions as a run folder in the kit's layout (metrics.json that names
it, oof.csv with the run's validation and holdout rows, test_probs.csv, submission.csv), so that `blend` takes
it beside the kit's runs; with several runs, one folder per run under the given one. It never writes into a
folder that holds a training run, nor over an earlier TF-IDF folder without --overwrite; the files appear
together once all are written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import hstack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from advtrain import (Config, Task, UserError, atomic_write, fresh_stage, holdout_split, input_texts,  # noqa: E402
                      load_competition, metric_value, prepare_output_dir, publish, read_run_record,
                      refuse_run_folder, split_seed, write_json, write_test_outputs)

MADE_BY = "tools/reference_scores.py"


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
    """The constant's and TF-IDF's scores on the run's holdout, and TF-IDF's predictions (validation, holdout,
    test) for --write-run."""
    metrics = read_run_record(run)
    settings = metrics["config"]
    if settings["split"] != "holdout":
        raise UserError(f"{run} was trained with split={settings['split']}; reference_scores rebuilds holdout splits "
                        "only.")
    cfg = Config(**{k: v for k, v in settings.items() if k != "output_dir"})
    data = load_competition(cfg)
    task = Task(**metrics["task"])
    y = task.encode(data["train"])
    groups = data["train"][cfg.group_col].to_numpy() if cfg.group_col else None
    train, valid, holdout = holdout_split(len(y), split_seed(cfg), cfg.holdout_size, cfg.valid_size, groups)
    first, second = input_texts(data["train"], cfg, " [SEP] ")
    texts = np.array([a if second is None else f"{a} [SEP] {b}" for a, b in
                      zip(first, second if second is not None else first)], dtype=object)
    test_first, test_second = input_texts(data["test"], cfg, " [SEP] ")
    test_texts = np.array([a if test_second is None else f"{a} [SEP] {b}" for a, b in
                           zip(test_first, test_second if test_second is not None else test_first)], dtype=object)
    x_train, (x_valid, x_holdout, x_test) = features(texts[train], [texts[valid], texts[holdout], test_texts])
    best = None
    for strength in (0.3, 1.0, 3.0, 10.0):
        predicted = fit_predict(task, strength, x_train, y[train], [x_valid, x_holdout, x_test])
        value = metric_value(task.metric, task, y[valid], predicted[0])
        if best is None or (value > best[0] if task.higher_is_better else value < best[0]):
            best = (value, strength, predicted)
    return {"run": run.name, "metric": task.metric, "rows": len(holdout),
            "kit": metrics["score"]["value"], "on": metrics["score"]["on"],
            "constant": metric_value(task.metric, task, y[holdout], constant(task, y[train], len(holdout))),
            "tfidf": metric_value(task.metric, task, y[holdout], best[2][1]), "tfidf_strength": best[1],
            "record": metrics, "task": task, "data": data, "rows_of": {"valid": valid, "holdout": holdout},
            "pred": dict(zip(("valid", "holdout", "test"), best[2]))}


def check_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a --write-run folder that holds a training run (even with --overwrite), or earlier files without
    --overwrite: only an earlier TF-IDF folder of this tool may be replaced."""
    try:
        ours = json.loads((folder / "metrics.json").read_text()).get("made_by", "").startswith(MADE_BY)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        refuse_run_folder(folder, "TF-IDF's predictions")
    prepare_output_dir(str(folder), overwrite)


def write_run(result: dict, folder: Path) -> None:
    """TF-IDF's predictions as a run folder that `advtrain.py blend` takes: the kit run's split, task and
    submission layout, its own holdout score, oof.csv and test_probs.csv (and submission.csv) as a run writes
    them; staged, then published together, metrics.json last."""
    task, data, record = result["task"], result["data"], result["record"]
    train = data["train"]
    ids = train[data["id_col"]].to_numpy() if data["id_col"] in train.columns else np.arange(len(train))
    frames = []
    for part, rows in result["rows_of"].items():
        frame = pd.DataFrame({"id": ids[rows]})
        for col in task.target_cols:
            frame[col] = train[col].to_numpy()[rows]
        preds = task.table(result["pred"][part])
        frame[[n if n not in frame.columns else f"pred_{n}" for n in preds.columns]] = preds.to_numpy()
        frames.append(frame.assign(split=part, fold=0))
    stage = fresh_stage(folder, "reference")
    oof = pd.concat(frames, ignore_index=True)
    atomic_write(stage / "oof.csv", lambda tmp: oof.to_csv(tmp, index=False))
    write_test_outputs(stage, task, data, result["pred"]["test"].astype(np.float32), 0.5)
    holdout = result["rows_of"]["holdout"]
    y = task.encode(train)[holdout]
    write_json(stage / "metrics.json", {
        "made_by": f"{MADE_BY}: TF-IDF (word 1-2-grams, character 2-5-grams) + "
                   f"{'ridge' if task.kind == 'regression' else 'logistic'} regression, "
                   f"strength {result['tfidf_strength']:g} picked on validation, fitted on the run's training rows",
        "reference_run": str(result["record"]["config"]["output_dir"]),
        "config": dict(record["config"], model="tfidf", method="baseline", output_dir=str(folder)),
        "task": record["task"], "submission": record["submission"], "inputs": record.get("inputs"),
        "score": {"on": "holdout", "rows": len(holdout), "metric": task.metric, "value": result["tfidf"],
                  "higher_is_better": task.higher_is_better, "threshold": 0.5,
                  "metrics": task.evaluate(y, result["pred"]["holdout"])}})
    publish(stage, folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (split=holdout)")
    parser.add_argument("--write-run", default="", help="write TF-IDF's predictions as a run folder here (one per "
                        "run under it for several runs), for `advtrain.py blend`")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier --write-run folder of this "
                        "tool (a training run's folder is never written into)")
    args = parser.parse_args(argv)
    folders = [Path(args.write_run).expanduser() / (Path(run).name if len(args.runs) > 1 else "")
               for run in args.runs] if args.write_run else []
    try:
        for folder in folders:  # every folder checked before anything is computed
            check_folder(folder, args.overwrite)
        print("| run | metric | holdout rows | advtrain | constant | TF-IDF + linear |\n|---|---|---|---|---|---|")
        for i, run in enumerate(args.runs):
            r = reference(Path(run))
            print(f"| {r['run']} | {r['metric']} | {r['rows']} | {r['kit']:.4f} | {r['constant']:.4f} | "
                  f"{r['tfidf']:.4f} (C={r['tfidf_strength']:g}) |")
            if folders:
                write_run(r, folders[i])
    except UserError as e:
        print(f"reference_scores: error: {e}", file=sys.stderr)
        return 2
    print(f"\ncommand: python tools/reference_scores.py {' '.join(args.runs)}"
          + (f" --write-run {args.write_run}" if args.write_run else "") + (" --overwrite" if args.overwrite else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
