"""A run's files: all or nothing, never blocked by a failure, one writer at a time, resumable."""
import errno
import json
import subprocess
import sys

import pandas as pd
import pytest

import advtrain
from conftest import base_config, fail_in_training


def tiny_run(data_dir, model_dirs, out, **kw):
    return base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0, **kw)


def test_a_failed_run_blocks_nothing_and_its_log_holds_the_error(data_dir, model_dirs, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "run"
    fail_in_training(monkeypatch, advtrain.UserError("something the user can fix"))
    with pytest.raises(advtrain.UserError):
        advtrain.run(tiny_run(data_dir, model_dirs, out))
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    assert "run stopped: something the user can fix" in (out / advtrain.STAGE / "train.log").read_text()
    monkeypatch.undo()
    advtrain.run(tiny_run(data_dir, model_dirs, out))  # no --overwrite needed
    assert (out / "metrics.json").is_file() and not (out / advtrain.STAGE).exists()


def test_overwrite_replaces_only_after_success(data_dir, model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    advtrain.run(tiny_run(data_dir, model_dirs, out, save_model=True))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert (out / "model").is_dir()
    model_before = (out / "model" / "model.safetensors").read_bytes()
    fail_in_training(monkeypatch, KeyboardInterrupt(), after=3)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(tiny_run(data_dir, model_dirs, out, overwrite=True, seed=7))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / "model" / "model.safetensors").read_bytes() == model_before
    monkeypatch.undo()
    advtrain.run(tiny_run(data_dir, model_dirs, out, overwrite=True, seed=7, save_model=False))
    assert not (out / "model").exists()  # the new run saved no model: the old one does not stay beside it
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7
    assert (out / "train.log").read_text().count("advtrain 0.") == 1


def hold_lock(path):
    """Another Python process that holds the OS lock on path until killed."""
    code = ("import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_one_writer_per_output_folder_and_a_dead_writer_blocks_nothing(data_dir, model_dirs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out / advtrain.LOCK)
    try:
        with pytest.raises(advtrain.UserError, match="being written by another advtrain run"):
            advtrain.run(tiny_run(data_dir, model_dirs, out))
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own, the OS releases the lock
        holder.wait()
    assert (out / advtrain.LOCK).exists()  # the file stays, and locks nothing
    advtrain.run(tiny_run(data_dir, model_dirs, out))
    assert (out / "metrics.json").is_file()
    (out / advtrain.LOCK).write_text("4242")  # the PID file of an earlier advtrain: no lock either
    advtrain.run(tiny_run(data_dir, model_dirs, out, overwrite=True))
    assert not (out / advtrain.LOCK).exists()  # a run that ends takes its lock file with it


@pytest.mark.slow
@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_resume_gives_the_result_of_an_uninterrupted_run(split, data_dir, model_dirs, tmp_path, monkeypatch):
    settings = dict(epochs=2, method="fgm", adv_start="0.5", dropout=0.1, split=split, n_folds=2, eval_every=0.5)
    whole = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "whole", **settings))
    out = tmp_path / "cut"
    per_epoch = whole["evaluations"][1]["step"]  # micro-batches per epoch (no accumulation)
    # stop in the second fold's first epoch (kfold), or in the second epoch (holdout)
    fail_in_training(monkeypatch, KeyboardInterrupt(), after=(2 if split == "kfold" else 1) * per_epoch + 3)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(base_config(data_dir, model_dirs["bert"], out, **settings))
    monkeypatch.undo()
    resumed = advtrain.run(base_config(data_dir, model_dirs["bert"], out, resume=True, **settings))
    drop = ("eval_seconds",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed["evaluations"]] == \
        [{k: v for k, v in e.items() if k not in drop} for e in whole["evaluations"]]
    assert resumed["score"] == whole["score"]
    pd.testing.assert_frame_equal(pd.read_csv(out / "test_probs.csv"),
                                  pd.read_csv(tmp_path / "whole" / "test_probs.csv"))
    said = "fold 1/2: finished before the interruption" if split == "kfold" else "resumed after epoch 1 of 2"
    assert said in (out / "train.log").read_text()


def test_resume_refuses_other_settings_or_nothing_to_resume(data_dir, model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "cut"
    with pytest.raises(advtrain.UserError, match="holds no checkpoint"):
        advtrain.run(tiny_run(data_dir, model_dirs, out, resume=True))
    fail_in_training(monkeypatch, KeyboardInterrupt(), after=60)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=2))
    monkeypatch.undo()
    with pytest.raises(advtrain.UserError, match=r"other settings \(lr\)"):
        advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=2, lr=1e-4, resume=True))


def test_ctrl_c_and_sigterm_end_with_one_line(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    args = ["train", "--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--holdout-size", "100",
            "--valid-size", "100", "--device", "cpu", "--no-progress"]
    fail_in_training(monkeypatch, KeyboardInterrupt())
    assert advtrain.main(args + ["--output-dir", str(tmp_path / "a")]) == 130
    assert "stopped by SIGINT" in capsys.readouterr().err
    fail_in_training(monkeypatch, advtrain.Interrupted(15))
    assert advtrain.main(args + ["--output-dir", str(tmp_path / "b")]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert "run stopped: interrupted" in (tmp_path / "b" / advtrain.STAGE / "train.log").read_text()


def test_output_folder_errors_are_one_line(data_dir, model_dirs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["train", "--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--device", "cpu"]
    assert advtrain.main(args + ["--output-dir", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert advtrain.main(args + ["--output-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "advtrain: error:" in err


def test_an_unwritable_output_folder_is_one_line(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    real_mkdir = advtrain.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == advtrain.STAGE:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(advtrain.Path, "mkdir", mkdir)
    code = advtrain.main(["train", "--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--output-dir",
                          str(tmp_path / "ro"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Permission denied" in err and "writable" in err
