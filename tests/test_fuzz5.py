"""The fifth fuzz's causes (issue 39): blends that trust nothing they were not told (targets, files, ranges,
duplicates), blend's and TF-IDF's outputs written as one unit, reference runs that overwrite nothing, search
arguments that cannot mislead, and an attack that would never start refused."""
import json
import sys

import pandas as pd
import pytest

import advtrain
from conftest import ROOT, base_config

sys.path.insert(0, str(ROOT / "tools"))
import reference_scores  # noqa: E402
import studies  # noqa: E402


@pytest.fixture(scope="module")
def pair(data_dir, model_dirs, tmp_path_factory):
    """Two finished runs on one split (seeds 1 and 2, split seed 5)."""
    root = tmp_path_factory.mktemp("pair")
    for seed in (1, 2):
        advtrain.run(base_config(data_dir, model_dirs["bert"], root / f"s{seed}", epochs=1, eval_every=1.0, seed=seed,
                                 split_seed=5))
    return root / "s1", root / "s2"


def copy(run, to):
    advtrain.shutil.copytree(run, to)
    return to


def refused(argv, capsys, says, main=advtrain.main):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def blend_argv(*runs, out):
    return ["blend", "--runs", ",".join(map(str, runs)), "--output-dir", str(out)]


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_write_run_refuses_a_training_run_and_earlier_files_and_replaces_only_its_own(pair, tmp_path, capsys):
    a, _ = pair
    run = copy(a, tmp_path / "run")
    before = files(run)
    refused([str(a), "--write-run", str(run)], capsys, "holds a training run", reference_scores.main)
    refused([str(a), "--write-run", str(run), "--overwrite"], capsys, "holds a training run", reference_scores.main)
    assert files(run) == before  # the run's metrics.json, oof.csv and submission are its own
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    refused([str(a), "--write-run", str(other)], capsys, "pass --overwrite", reference_scores.main)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    tfidf = tmp_path / "tfidf"
    assert reference_scores.main([str(a), "--write-run", str(tfidf)]) == 0
    assert sorted(p.name for p in tfidf.iterdir()) == ["metrics.json", "oof.csv", "submission.csv", "test_probs.csv"]
    refused([str(a), "--write-run", str(tfidf)], capsys, "pass --overwrite", reference_scores.main)
    assert reference_scores.main([str(a), "--write-run", str(tfidf), "--overwrite"]) == 0  # its own: replaced
    assert sorted(p.name for p in tfidf.iterdir()) == ["metrics.json", "oof.csv", "submission.csv", "test_probs.csv"]


@pytest.mark.parametrize("record", ["{\"config\": ", "[]", None])
def test_reference_scores_says_a_damaged_run_record_in_one_sentence(pair, tmp_path, capsys, record):
    run = copy(pair[0], tmp_path / "run")
    if record is None:
        (run / "metrics.json").unlink()
    else:
        (run / "metrics.json").write_text(record)
    err = refused([str(run)], capsys, "reference_scores: error:", reference_scores.main)
    assert str(run) in err


def test_blend_refuses_a_member_with_other_targets_for_the_same_rows(pair, tmp_path, capsys):
    a, b = pair
    flipped = copy(b, tmp_path / "flipped")
    oof = pd.read_csv(flipped / "oof.csv", dtype=str, keep_default_na=False)
    oof["target"] = oof["target"].map({"0": "1", "1": "0"})
    oof.to_csv(flipped / "oof.csv", index=False)
    err = refused(blend_argv(flipped, a, out=tmp_path / "x"), capsys, "holds other targets than")
    assert f"{a / 'oof.csv'}: row 1 (valid id " in err and "blend runs of one train file" in err
    assert not (tmp_path / "x").exists()


def test_blend_refuses_a_member_that_predicted_another_test_file(pair, tmp_path, capsys):
    a, b = pair
    other = copy(b, tmp_path / "other")
    record = json.loads((other / "metrics.json").read_text())
    record["inputs"]["test"] = "0" * 16  # the same ids, other texts
    (other / "metrics.json").write_text(json.dumps(record))
    refused(blend_argv(a, other, out=tmp_path / "x"), capsys,
            f"{other / 'metrics.json'} records another test file than {a}'s")


@pytest.mark.parametrize("name", ["oof.csv", "test_probs.csv"])
def test_blend_refuses_probabilities_outside_0_1_naming_the_members_file(pair, tmp_path, capsys, name):
    a, b = pair
    bad = copy(b, tmp_path / "bad")
    table = pd.read_csv(bad / name)
    column = "pred_prob" if "pred_prob" in table.columns else "prob"
    table[column] = 1.2
    table.to_csv(bad / name, index=False)
    refused(blend_argv(a, bad, out=tmp_path / "x"), capsys, f"{bad / name}: row 1 holds a probability outside [0, 1]")


def test_class_probabilities_must_sum_to_one():
    task = advtrain.Task("multiclass", ["author"], "logloss", ["a", "b", "c"])
    fine = pd.DataFrame({"a": ["0.2", "0.3"], "b": ["0.3", "0.3"], "c": ["0.5", "0.4"]})
    assert advtrain._predictions(task, fine, ["a", "b", "c"], "x.csv").shape == (2, 3)
    with pytest.raises(advtrain.UserError, match=r"x.csv: row 2 holds class probabilities that do not sum to 1"):
        advtrain._predictions(task, fine.assign(c=["0.5", "0.9"]), ["a", "b", "c"], "x.csv")


def test_a_member_given_twice_is_refused(pair, tmp_path, capsys):
    a, b = pair
    refused(blend_argv(a, b, a, out=tmp_path / "x"), capsys, f"{a} is given twice in --runs: blend each run once")
    refused(blend_argv(a, f"{a}/", out=tmp_path / "x"), capsys, "is given twice")


def test_blend_outputs_are_one_unit_even_when_killed_between_files(pair, tmp_path, monkeypatch):
    a, b = pair
    out = tmp_path / "blend"
    advtrain.blend([a, b], str(out))
    earlier = files(out)
    assert set(earlier) == {"blend.json", "submission.csv", "test_probs.csv"}
    real, moved = advtrain.os.replace, []

    def killed_after(n, where=out):
        def replace(src, dst):
            if advtrain.Path(dst).parent == where:  # a file written there
                if len(moved) == n:
                    raise KeyboardInterrupt
                moved.append(dst)
            return real(src, dst)
        return replace

    fresh = copy(a, tmp_path / "fresh")  # another member (other test predictions): another blend
    probs = pd.read_csv(fresh / "test_probs.csv")
    probs.assign(prob=probs["prob"] * 0.9).to_csv(fresh / "test_probs.csv", index=False)
    monkeypatch.setattr(advtrain.os, "replace", killed_after(1, out / ".advtrain-blend"))  # while staged
    with pytest.raises(KeyboardInterrupt):
        advtrain.blend([fresh, b], str(out), overwrite=True)
    assert files(out) == earlier  # the earlier blend, whole
    moved.clear()
    monkeypatch.setattr(advtrain.os, "replace", killed_after(1))  # killed between two published files
    with pytest.raises(KeyboardInterrupt):
        advtrain.blend([fresh, b], str(out), overwrite=True)
    left = files(out)
    assert len(left) == 1 and "blend.json" not in left  # no record that describes files of another blend
    assert not any(left[name] == earlier[name] for name in left)  # nothing of the earlier blend beside new files
    monkeypatch.undo()
    advtrain.blend([fresh, b], str(out), overwrite=True)
    assert set(files(out)) == set(earlier) and not (out / ".advtrain-blend").exists()


def test_search_seed_lists_and_budget_are_refused_naming_the_flag(data_dir, model_dirs, tmp_path, capsys):
    base = ["compare", "--methods", "baseline,fgm", "--output-dir", str(tmp_path / "x"), "--model",
            str(model_dirs["bert"]), "--data-dir", str(data_dir)]
    refused(base + ["--search", "--confirm-seeds", "3,3"], capsys, "--confirm-seeds names seed 3 twice")
    refused(base + ["--search", "--screen-seeds", "1,1"], capsys, "--screen-seeds names seed 1 twice")
    refused(base + ["--search", "--screen-seeds", ""], capsys, "--screen-seeds names no seed")
    refused(base + ["--seeds", ""], capsys, "--seeds names no seed")
    refused(base + ["--seeds", "4,4"], capsys, "--seeds names seed 4 twice")
    refused(base + ["--budget=-1"], capsys, "--budget is minutes of training (0: no cap), got -1")
    assert not (tmp_path / "x").exists()


def test_promotions_are_kept_once_confirmation_runs_exist(tmp_path):
    cfg = advtrain.Config(output_dir=str(tmp_path))
    grid = [{"fgm_eps": [0.1, 0.2]}]
    items = advtrain.plan_items(cfg, ["baseline", "fgm"], [7, 8], grid, tmp_path, "confirm")
    two = [("fgm", ("fgm_eps", 0.2)), ("fgm", ("fgm_eps", 0.1))]
    advtrain.record_promotions(tmp_path, advtrain.Search([1], [7, 8], promote=2), two, items)
    recorded = json.loads((tmp_path / "search.json").read_text())
    assert recorded["promote"] == 2 and recorded["promoted"] == ["fgm (fgm_eps=0.2)", "fgm (fgm_eps=0.1)"]
    advtrain.record_promotions(tmp_path, advtrain.Search([1], [7, 8], promote=1), two[:1], items)  # none ran yet
    assert json.loads((tmp_path / "search.json").read_text())["promote"] == 1
    advtrain.record_promotions(tmp_path, advtrain.Search([1], [7, 8], promote=2), two, items)
    (tmp_path / "fgm-fgm_eps=0.1-seed7").mkdir()  # a confirmation run has started
    with pytest.raises(advtrain.UserError, match=r"promoted fgm \(fgm_eps=0.2\), fgm \(fgm_eps=0.1\) with --promote "
                       r"2, and its confirmation runs exist: keep --promote 2"):
        advtrain.record_promotions(tmp_path, advtrain.Search([1], [7, 8], promote=1), two[:1], items)
    advtrain.record_promotions(tmp_path, advtrain.Search([1], [7, 8], promote=2), two, items)  # the same: fine


def test_an_attack_that_starts_at_or_after_the_last_epoch_is_refused(data_dir, model_dirs, tmp_path, capsys):
    with pytest.raises(advtrain.UserError, match=r"adv_start 5 is at or after the end of training \(3 epochs\): "
                       "fgm would never attack"):
        advtrain.Config(method="fgm", adv_start="5", epochs=3, output_dir="x")
    with pytest.raises(advtrain.UserError, match="adv_start 2 is at or after"):
        advtrain.Config(method="sift", adv_start="2", epochs=2, output_dir="x")
    advtrain.Config(method="fgm", adv_start="1.5", epochs=2, output_dir="x")  # the last epoch half attacked
    advtrain.Config(method="baseline", adv_start="5", epochs=3, output_dir="x")  # no attack to start
    common = ["--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--epochs", "1", "--adv-start", "1"]
    refused(["train", "--method", "awp", "--output-dir", str(tmp_path / "t"), *common], capsys,
            "awp would never attack")
    refused(["compare", "--methods", "baseline,fgm", "--seeds", "1", "--output-dir", str(tmp_path / "c"), *common],
            capsys, "fgm would never attack")
    assert not (tmp_path / "t").exists() and not list((tmp_path / "c").glob("*/metrics.json"))


def test_the_trainer_refuses_an_attack_that_would_never_start(tmp_path, model_dirs):
    pytest.importorskip("accelerate")
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]))
    args = advtrain.transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, report_to=[],
                                                   use_cpu=True)
    with pytest.raises(ValueError, match="adv_start 2 is at or after the end of training"):
        advtrain.AdversarialTrainer(model=model, args=args, attack=advtrain.FGM(model), adv_start=2)
    advtrain.AdversarialTrainer(model=model, args=args, attack=advtrain.FGM(model), adv_start=1.5)


def test_studies_name_an_unknown_study_or_command_and_take_overwrite_with_run(capsys):
    assert studies.main(["run", "spooky-serach"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("studies: no study 'spooky-serach' (studies: spooky-search,")
    assert studies.main(["tabels"]) == 2
    assert capsys.readouterr().err.startswith("studies: no command 'tabels'")
    assert studies.main(["tables", "--overwrite"]) == 2
    assert "--overwrite and --budget go with run alone" in capsys.readouterr().err
