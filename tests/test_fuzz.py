"""The second fuzz's causes, one test each: explicit settings win over presets, a full disk costs the
checkpoint and never the run, every setting counts for --resume and compare, nothing earlier is replaced
unasked, no hang, no traceback, and messages that say what is true."""
import contextlib
import gzip
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import advtrain
from conftest import ROOT, base_config, fail_in_training


def tiny(data_dir, model_dirs, out, **kw):
    return base_config(data_dir, model_dirs["bert"], out, **{"epochs": 1, "eval_every": 1.0, **kw})


# 1. explicit settings win, whether or not they equal the default

def test_explicit_settings_win_over_a_preset_even_when_they_equal_the_default():
    argv = ["train", "--preset", "article", "--epochs", "1", "--batch-size", "32", "--lr", "3e-5",
            "--max-grad-norm", "1.0", "--eval-every", "0.25"]
    cfg = advtrain.config_from_args(advtrain.build_parser().parse_args(argv))
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.max_grad_norm, cfg.eval_every) == (1, 32, 3e-5, 1.0, 0.25)
    assert cfg.pad_to_max is True and cfg.amp == "off"  # what was not given comes from the preset
    cfg = advtrain.Config(preset="article", epochs=3, batch_size=32)
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (3, 32, 2e-6)
    notebook = advtrain.Config(preset="recipe", epochs=3, batch_size=32, lr=3e-5)
    cfg = advtrain.env_overrides(notebook, {"ADVTRAIN_PRESET": "article", "ADVTRAIN_BATCH_SIZE": "32"})
    assert (cfg.preset, cfg.epochs, cfg.batch_size, cfg.lr, cfg.amp) == ("article", 3, 32, 3e-5, "off")


# 2. a full disk while checkpoint.pt is written

def test_a_checkpoint_that_cannot_be_written_costs_the_checkpoint_not_the_run(data_dir, model_dirs, tmp_path,
                                                                                 monkeypatch):
    real = torch.save

    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and "completed" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 0")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "full"
    advtrain.run(tiny(data_dir, model_dirs, out, epochs=2))
    assert (out / "submission.csv").is_file()
    assert "checkpoint.pt not saved ([enforce fail" in (out / "train.log").read_text()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("no tmpfs mount on this machine")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_real_full_disk_costs_the_checkpoint_not_the_run(data_dir, model_dirs, small_disk):
    out = small_disk / "run"
    advtrain.run(tiny(data_dir, model_dirs, out, epochs=2, save_model=False))
    assert (out / "submission.csv").is_file() and (out / "metrics.json").is_file()
    assert "checkpoint.pt not saved" in (out / "train.log").read_text()
    assert not list(out.glob(".advtrain-run/*"))


# 3. every setting that changes the result counts

def test_resume_refuses_a_changed_max_len(data_dir, model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    fail_in_training(monkeypatch, KeyboardInterrupt(), after=60)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=2, max_len=13))
    monkeypatch.undo()
    with pytest.raises(advtrain.UserError, match=r"other settings \(max_len\)"):
        advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=2, max_len=8, resume=True))


def test_compare_does_not_reuse_a_run_made_with_another_max_len(data_dir, model_dirs, tmp_path, monkeypatch):
    cfg = tiny(data_dir, model_dirs, tmp_path / "cmp", max_len=13)
    advtrain.compare(cfg, ["baseline"], [1])
    monkeypatch.setattr(advtrain, "run", lambda *a: pytest.fail("ran before refusing"))
    with pytest.raises(advtrain.UserError, match=r"other settings \(max_len\)"):
        advtrain.compare(advtrain.dataclasses.replace(cfg, max_len=8), ["baseline"], [1])


# 4. demo never replaces another run's files unasked

@pytest.mark.slow
def test_demo_refuses_a_folder_holding_another_run(data_dir, model_dirs, tmp_path):
    out = tmp_path / "mine"
    advtrain.run(tiny(data_dir, model_dirs, out, save_model=True))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert advtrain.main(["demo", "--output-dir", str(out), "--epochs", "1", "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    demo = tmp_path / "demo"
    assert advtrain.main(["demo", "--output-dir", str(demo), "--epochs", "1", "--no-progress"]) == 0
    assert advtrain.main(["demo", "--output-dir", str(demo), "--epochs", "1", "--no-progress"]) == 0  # its own


# 5. no hang

def test_evaluations_are_at_most_one_a_step():
    assert advtrain.evaluation_steps(0.01, 3, 2) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(advtrain.UserError, match="eval_every"):
        advtrain.Config(eval_every=1e-9)


# 6. quiet wrong results

def test_compare_refuses_method_instead_of_ignoring_it(capsys):
    assert advtrain.main(["compare", "--method", "fgm"]) == 2
    assert "compare runs every method of --methods" in capsys.readouterr().err


def test_max_len_is_applied_to_single_texts_and_pairs(model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    for pairs in (None, ["flood in the river tonight"]):
        ids = advtrain.tokenize(tok, ["fire near the town of la ronge"], 4, pairs)
        assert len(ids[0]) == 4 and ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    with pytest.raises(advtrain.UserError, match="max_len 1 leaves no room for text"):
        advtrain.Config(max_len=1, pad_to_max=True)


# 7. tracebacks

@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps({"x": 1})])
def test_resume_over_a_checkpoint_advtrain_did_not_write_is_one_sentence(content, data_dir, model_dirs, tmp_path):
    out = tmp_path / "foreign"
    (out / advtrain.STAGE).mkdir(parents=True)
    (out / advtrain.STAGE / advtrain.CHECKPOINT).write_bytes(content)
    with pytest.raises(advtrain.UserError, match="is not a readable checkpoint of advtrain"):
        advtrain.run(tiny(data_dir, model_dirs, out, resume=True))


def test_seeds_outside_numpys_range_are_one_sentence(capsys):
    with pytest.raises(advtrain.UserError, match="seed must be below 2"):
        advtrain.env_overrides(advtrain.Config(), {"ADVTRAIN_SEED": str(2**32)})
    assert advtrain.main(["compare", "--seeds", str(2**32)]) == 2
    assert "outside numpy's range" in capsys.readouterr().err
    assert advtrain.main(["train", "--seed", str(2**40)]) == 2


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    for _ in range(3):  # a try whose signal came only after the program had ended (a missed window) is run again
        proc = subprocess.Popen([sys.executable, str(ROOT / "advtrain.py"), "train", "--output-dir", str(tmp_path)],
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path,  # SIGINT as a terminal sends it,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ignored here
        maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
        while maps.exists() and time.monotonic() < deadline:  # the signal once torch's library is being loaded,
            with contextlib.suppress(OSError):  # however long the interpreter took to start on a loaded machine
                if "libtorch" in maps.read_text():
                    break
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if not (proc.returncode == 2 and "No train.csv" in err):
            break
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# 8. messages that say what is true

def test_compare_resume_runs_a_seed_that_never_started(data_dir, model_dirs, tmp_path, monkeypatch):
    seen, real = [], advtrain.run
    monkeypatch.setattr(advtrain, "run",
                        lambda cfg, *a, **k: (seen.append((cfg.seed, cfg.resume)), real(cfg, *a, **k))[1])
    advtrain.compare(tiny(data_dir, model_dirs, tmp_path / "cmp", resume=True), ["baseline"], [1])
    assert seen == [(1, False)]


def test_submit_of_a_missing_ensemble_names_compare(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import kaggle_kit

    monkeypatch.setattr(kaggle_kit, "ROOT", tmp_path)
    with pytest.raises(kaggle_kit.KitError, match="make compare ARGS=.*--ensemble"):
        kaggle_kit.submission_file("ensemble", "")


def test_submission_files_that_are_folders_or_gzip_are_named(tmp_path, capsys):
    data = advtrain.make_demo_data(tmp_path / "d", n_train=20, n_test=5)
    (tmp_path / "dir.csv").mkdir()
    sub = pd.read_csv(data / "sample_submission.csv").to_csv(index=False).encode()
    (tmp_path / "zipped.csv").write_bytes(gzip.compress(sub))
    for name, message in (("dir.csv", "is a folder"), ("zipped.csv", "is gzip-compressed")):
        assert advtrain.main(["check-submission", str(tmp_path / name), "--data-dir", str(data)]) == 2
        assert message in capsys.readouterr().err


def test_a_broken_config_json_is_named_as_such(model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["bert"], broken)
    (broken / "config.json").write_text('{"model_type": "bert", ')
    with pytest.raises(advtrain.UserError, match="its config.json is not readable JSON"):
        advtrain.resolve_model(str(broken))


def test_kfold_on_a_one_class_train_says_so(tmp_path, model_dirs):
    data = advtrain.make_demo_data(tmp_path / "d", n_train=40, n_test=5)
    train = pd.read_csv(data / "train.csv").assign(target=0)
    train.to_csv(data / "train.csv", index=False)
    with pytest.raises(advtrain.UserError, match="holds one class only"):
        advtrain.run(base_config(data, model_dirs["bert"], tmp_path / "o", split="kfold"))
    with pytest.raises(advtrain.UserError, match="holds no row of class '1'"):
        advtrain.run(base_config(data, model_dirs["bert"], tmp_path / "o2", split="kfold", task="binary"))


def test_output_dir_empty_or_with_a_tilde(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    assert advtrain.main(["train", "--output-dir", ""]) == 2
    assert "output_dir is empty" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = tiny(data_dir, model_dirs, "~/x")
    assert cfg.output_dir == str(tmp_path / "home" / "x")
    advtrain.run(cfg)
    assert (tmp_path / "home" / "x" / "submission.csv").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize("kind", ["file", "dangling symlink"])
def test_a_compare_root_that_is_a_file_or_a_broken_link(kind, tmp_path):
    root = tmp_path / "root"
    if kind == "file":
        root.write_text("x")
    else:
        root.symlink_to(tmp_path / "nowhere")
    with pytest.raises(advtrain.UserError, match="is a file .or a broken link."):
        advtrain.compare(advtrain.Config(output_dir=str(root)), ["baseline"], [1])
