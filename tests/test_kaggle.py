"""The Kaggle kit: metadata, notebooks (executed offline), and the Make round trip against a stand-in `kaggle`."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, kaggle_repo

sys.path.insert(0, str(ROOT / "tools"))
import kaggle_kit  # noqa: E402

NOTEBOOK_DIRS = sorted(p for p in (ROOT / "notebooks").iterdir() if p.is_dir())


def test_notebooks_match_their_template(tmp_path):
    kaggle_kit.write_notebooks(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "notebooks").rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "notebooks").rglob("*") if p.is_file())
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} is stale: run make notebooks"


def test_utility_script_metadata():
    meta = json.loads((ROOT / "kernel-metadata.json").read_text())
    assert meta["kernel_type"] == "script" and meta["keywords"] == ["util-script"]
    assert meta["language"] == "python" and (ROOT / meta["code_file"]).name == "advtrain.py"
    assert meta["id"] == f"{kaggle_kit.PLACEHOLDER}/{kaggle_kit.slug(meta['title'])}" and len(meta["title"]) >= 5
    for flag in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        assert isinstance(meta[flag], bool)


@pytest.mark.parametrize("folder", NOTEBOOK_DIRS, ids=lambda p: p.name)
def test_notebook_metadata_and_format(folder):
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    utility = json.loads((ROOT / "kernel-metadata.json").read_text())["id"]
    required = {"id", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu", "enable_tpu",
                "enable_internet", "machine_shape", "competition_sources", "kernel_sources"}
    assert required <= set(meta)
    assert meta["id"].split("/")[1] == kaggle_kit.slug(meta["title"]) and len(meta["title"]) >= 5
    assert (folder / meta["code_file"]).is_file() and meta["kernel_type"] == "notebook"
    inference = folder.name == "inference"  # a code competition's notebook: internet off, training runs attached
    assert meta["enable_gpu"] is True and meta["enable_internet"] is not inference and meta["enable_tpu"] is False
    assert meta["machine_shape"] == "NvidiaTeslaT4" and meta["competition_sources"] == ["nlp-getting-started"]
    assert meta["kernel_sources"] == [utility] + (["OWNER/advtrain-baseline", "OWNER/advtrain-awp"] if inference
                                                  else [])
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert nb.cells[0].cell_type == "markdown"


@pytest.mark.slow
@pytest.mark.parametrize("folder", [p for p in NOTEBOOK_DIRS if p.name != "inference"], ids=lambda p: p.name)
def test_notebook_runs_end_to_end_offline(folder, data_dir, model_dirs, tmp_path, monkeypatch):
    lib = tmp_path / "usr" / "lib" / "notebooks" / "someone" / "advtrain"  # a recent image's layout
    lib.mkdir(parents=True)
    shutil.copy(ROOT / "advtrain.py", lib / "advtrain.py")
    out = tmp_path / "working"
    env = {"LIB": str(tmp_path / "usr" / "lib"), "MODEL": str(model_dirs["deberta-v2"]), "DATA_DIR": str(data_dir),
           "OUTPUT_DIR": str(out), "EPOCHS": "1", "DEVICE": "cpu", "PROGRESS": "0", "HOLDOUT_SIZE": "100",
           "VALID_SIZE": "100", "LR": "2e-3", "BATCH_SIZE": "16", "ADV_START": "0", "SAVE_MODEL": "0",
           "EVAL_EVERY": "1", "METHODS": "baseline,fgm", "SEEDS": "1,2"}
    for key, value in env.items():
        monkeypatch.setenv(f"ADVTRAIN_{key}", value)
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(lib / "advtrain.py") in printed
    subs = [out / "submission.csv"] if folder.name != "compare" else sorted(out.rglob("submission.csv"))
    assert subs and all(p.is_file() for p in subs)
    check = subprocess.run([sys.executable, str(ROOT / "advtrain.py"), "check-submission", "--data-dir",
                            str(data_dir), str(subs[0])], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_inference_notebook_averages_attached_runs_offline(data_dir, model_dirs, tmp_path, monkeypatch):
    """Internet off: the utility script and two training notebooks' outputs attached under /kaggle/input, the
    competition's files where the kit finds them; the notebook writes a submission check-submission accepts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import base_config

    lib = tmp_path / "usr" / "lib" / "advtrain"
    lib.mkdir(parents=True)
    shutil.copy(ROOT / "advtrain.py", lib / "advtrain.py")
    import advtrain

    for method in ("baseline", "awp"):
        advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "input" / f"advtrain-{method}", epochs=1,
                                 eval_every=1.0, save_model=True, method=method))
    shutil.copytree(data_dir, tmp_path / "data")  # where the kit looks when no Kaggle mount is there
    for key, value in {"ADVTRAIN_LIB": str(tmp_path / "usr" / "lib"), "ADVTRAIN_INPUT": str(tmp_path / "input"),
                       "ADVTRAIN_OUTPUT_DIR": str(tmp_path / "working"), "HF_HUB_OFFLINE": "1",
                       "HF_HOME": str(tmp_path / "no-cache")}.items():
        monkeypatch.setenv(key, value)
    folder = ROOT / "notebooks" / "inference"
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "texts/s" in printed and "advtrain-awp" in printed
    submission = tmp_path / "working" / "submission.csv"
    check = subprocess.run([sys.executable, str(ROOT / "advtrain.py"), "check-submission", "--data-dir",
                            str(data_dir), str(submission)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# --------------------------------------------------------------------------------------------- Make + stand-in CLI

STUB = textwrap.dedent("""\
    #!{python}
    # Stand-in for the kaggle CLI: records its arguments, answers as kaggle 2.x does (recorded formats).
    import json, os, shutil, sys, zipfile
    from pathlib import Path
    args = sys.argv[1:]
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if os.environ.get("STUB_NO_AUTH"):  # what kaggle 2.2.5 prints, with exit code 0, when it has no credentials
        print("Authentication required to call the Kaggle API.\\n\\nRecommended: log in with OAuth ...\\n"
              "    kaggle auth login")
        sys.exit(0)
    if args == ["--version"]:
        print("Kaggle CLI 2.2.5")
    elif args[:2] == ["kernels", "status"]:
        if args[2] == os.environ.get("STUB_FAILING"):
            state = "ERROR"
        else:
            states = Path(os.environ["STUB_STATES"])
            queue = states.read_text().split(",")
            state = queue.pop(0) if len(queue) > 1 else queue[0]
            states.write_text(",".join(queue))
        print(f'{{args[2]}} has status "KernelWorkerStatus.{{state}}"')
    elif args[:2] == ["kernels", "push"]:
        meta = json.loads(Path(args[3], "kernel-metadata.json").read_text())
        pushes = Path(os.environ["STUB_LOG"] + ".pushes")
        count = int(pushes.read_text()) + 1 if pushes.exists() else 1
        pushes.write_text(str(count))
        if str(count) == os.environ.get("STUB_REFUSE_PUSH"):
            print("Kernel push error: Maximum batch GPU session count of 2 reached.")
        else:
            print(f"Kernel version 1 successfully pushed.  Please check progress at "
                  f"https://www.kaggle.com/code/{{meta['id']}}")
    elif args[:2] == ["competitions", "download"] and os.environ.get("STUB_CORRUPT_ZIP"):
        Path(args[args.index("-p") + 1], "nlp-getting-started.zip").write_bytes(b"PK\\x03\\x04 cut short")
    elif args[:2] == ["competitions", "download"]:
        with zipfile.ZipFile(Path(args[args.index("-p") + 1], "nlp-getting-started.zip"), "w") as z:
            for name in ("train.csv", "test.csv", "sample_submission.csv"):
                z.write(Path(os.environ["STUB_DATA"], name), name)
    elif args[:2] == ["kernels", "output"]:
        folder = Path(args[args.index("-p") + 1])
        shutil.copy(os.environ["STUB_SUBMISSION"], folder / "submission.csv")
        (folder / "model.pt").write_bytes(b"weights")
        (folder / "metrics.json").write_text("{{}}")
        slug = args[2].split("/")[1]
        (folder / f"{{slug}}.log").write_text(json.dumps([{{"data": f"line {{i}}\\n"}} for i in range(30)]
                                                        + [{{"data": "RuntimeError: CUDA out of memory\\n"}}]))
    elif args[:2] == ["config", "view"]:
        print("- username: carol")
    elif args[:2] == ["competitions", "submit"]:
        print("Successfully submitted to Natural Language Processing with Disaster Tweets")
""")


@pytest.fixture
def kit(tmp_path, data_dir):
    """A copy of the repo's Kaggle pieces, a stand-in kaggle beside the Python make runs, and a way to run make."""
    repo = kaggle_repo(tmp_path)
    stub = tmp_path / "kaggle"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    sub = tmp_path / "good.csv"
    import pandas as pd
    pd.DataFrame({"id": pd.read_csv(data_dir / "sample_submission.csv")["id"], "target": 1}).to_csv(sub, index=False)
    home = tmp_path / "home"
    home.mkdir()
    log, states = tmp_path / "calls.jsonl", tmp_path / "states"
    states.write_text("COMPLETE")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "STUB_LOG": str(log), "KAGGLE_BIN": str(stub),
           "STUB_STATES": str(states), "STUB_DATA": str(data_dir), "STUB_SUBMISSION": str(sub),
           "KAGGLE_POLL_SECONDS": "0", "KAGGLE_USERNAME": "alice"}

    def make(*targets, drop=(), **extra):
        run_env = {k: v for k, v in {**env, **extra}.items() if k not in drop}
        done = subprocess.run(["make", "--no-print-directory", "-C", str(repo), f"PYTHON={sys.executable}",
                               f"VENV={sys.prefix}", *targets], capture_output=True, text=True, env=run_env,
                              timeout=300)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        Path(str(log) + ".pushes").unlink(missing_ok=True)
        return done, calls

    return repo, make, states, home


def errors(done):
    return [line for line in done.stderr.splitlines() if line.startswith("kaggle_kit: error:")]


def test_make_data_downloads_unzips_and_is_idempotent(kit):
    repo, make, _, _ = kit
    done, calls = make("data")
    assert done.returncode == 0, done.stderr
    assert calls == [["competitions", "download", "nlp-getting-started", "-p", str(repo / "data")]]
    assert {p.name for p in (repo / "data").iterdir()} == {"train.csv", "test.csv", "sample_submission.csv"}
    done, calls = make("data")
    assert done.returncode == 0 and calls == [] and "already holds" in done.stdout


def test_a_corrupt_download_is_one_line_and_removed(kit):
    repo, make, _, _ = kit
    done, _ = make("data", STUB_CORRUPT_ZIP="1")
    assert done.returncode == 2 and len(errors(done)) == 1 and "not a complete zip file" in errors(done)[0]
    assert not (repo / "data" / "nlp-getting-started.zip").exists()
    done, _ = make("data")
    assert done.returncode == 0 and (repo / "data" / "train.csv").is_file()


def test_make_push_waits_for_the_utility_then_pushes_in_waves_of_two(kit):
    repo, make, states, _ = kit
    states.write_text("QUEUED,RUNNING,COMPLETE")
    done, calls = make("push")
    assert done.returncode == 0, done.stderr
    assert calls[0][:3] == ["kernels", "push", "-p"] and calls[0][3].endswith("build/kaggle/advtrain")
    assert calls[1:4] == [["kernels", "status", "alice/advtrain"]] * 3
    kinds = ["push" if c[1] == "push" else "status" for c in calls[4:]]
    assert kinds == (["push"] * 2 + ["status"] * 2) * 3 + ["push", "status"]  # 7 notebooks, never 3 running
    pushed = [json.loads(Path(c[3], "kernel-metadata.json").read_text()) for c in calls[4:] if c[1] == "push"]
    assert {m["id"] for m in pushed} == {f"alice/advtrain-{n}" for n in kaggle_kit.NOTEBOOKS}
    assert all(m["kernel_sources"] == ["alice/advtrain"] for m in pushed)
    assert "OWNER" in (repo / "notebooks" / "fgm" / "kernel-metadata.json").read_text()  # the source stays generic
    assert "https://www.kaggle.com/code/alice/advtrain-awp" in done.stdout  # the closing table


def test_make_push_of_a_subset(kit):
    _, make, _, _ = kit
    done, calls = make("push", "METHODS=fgm,awp")
    assert done.returncode == 0, done.stderr
    assert [Path(c[3]).name for c in calls if c[1] == "push"] == ["advtrain", "advtrain-fgm", "advtrain-awp"]
    done, calls = make("push", "METHODS=fgm,magic")
    assert done.returncode == 2 and "unknown METHODS=fgm,magic" in done.stderr and calls == []


def test_a_refused_push_stops_with_kaggles_reason(kit):
    _, make, _, _ = kit
    done, calls = make("push", STUB_REFUSE_PUSH="3")  # the utility, one notebook, then the refusal
    assert done.returncode == 2
    assert "Maximum batch GPU session count of 2 reached" in errors(done)[0] and "make status" in errors(done)[0]
    assert sum(c[1] == "push" for c in calls) == 3


def test_make_push_stops_when_the_utility_run_fails(kit):
    _, make, states, _ = kit
    states.write_text("RUNNING,ERROR")
    done, calls = make("push")
    assert done.returncode != 0
    assert "the run of alice/advtrain did not complete" in done.stderr and "CUDA out of memory" in done.stderr
    assert not any(c[:2] == ["kernels", "push"] for c in calls[1:])


RECORDED_STATUS = {  # lines as kaggle 1.6.17, 1.7.4.5 and 2.2.5 print them
    'complete-user/advtrain has status "running"': "RUNNING",
    'error-queued/advtrain-fgm has status "complete"': "COMPLETE",
    'cancel/advtrain has status "cancelAcknowledged"': "CANCEL_ACKNOWLEDGED",
    'Warning: Looks like you\'re using an outdated API Version\nbob/advtrain has status '
    '"KernelWorkerStatus.QUEUED"': "QUEUED",
    'bob/advtrain has status "KernelWorkerStatus.ERROR"\nFailure message: "Notebook Exceeded Allowed Compute"': "ERROR",
}


@pytest.mark.parametrize("line", list(RECORDED_STATUS))
def test_status_is_read_from_the_status_field_only(line):
    assert kaggle_kit.parse_status(line) == RECORDED_STATUS[line]


@pytest.mark.parametrize("output,expected", [
    ("401 Client Error: Unauthorized for url", "did not accept your credentials"),
    ("403 Client Error: Forbidden for url: https://www.kaggle.com/api/v1/competitions/<competition>", "rules"),
    ("404 Client Error: Not Found\nNo kernel found, try 'kaggle search <query>'", "(404)"),
    ("urllib3 NotOpenSSLWarning: only supports OpenSSL 1.1.1+\nConnectionError: Max retries exceeded",
     "no connection to Kaggle"),
    ("Traceback (most recent call last):\nModuleNotFoundError: No module named 'six'", "pip install"),
])
def test_kaggles_whole_answer_becomes_one_sentence_with_the_fix(output, expected):
    assert expected in kaggle_kit.explain(("kernels", "status", "a/b"), output)


def test_owner_and_credentials_come_from_wherever_the_cli_takes_them(kit):
    _, make, _, home = kit
    (home / ".config" / "kaggle").mkdir(parents=True)  # the CLI's place when ~/.kaggle does not exist
    (home / ".config" / "kaggle" / "kaggle.json").write_text('{"username": "bob", "key": "k"}')
    done, calls = make("status", drop=("KAGGLE_USERNAME",))
    assert done.returncode == 0, done.stderr
    assert calls[0] == ["kernels", "status", "bob/advtrain"] and len(calls) == 8
    (home / ".config" / "kaggle" / "kaggle.json").unlink()  # OAuth or access_token: the CLI knows the name
    done, calls = make("status", drop=("KAGGLE_USERNAME",))
    assert calls[0] == ["config", "view"] and calls[1] == ["kernels", "status", "carol/advtrain"]


def test_missing_credentials_give_one_line_even_when_the_cli_exits_0(kit):
    _, make, _, _ = kit
    done, _ = make("status", STUB_NO_AUTH="1")
    assert done.returncode != 0 and len(errors(done)) == 1
    assert "did not accept your credentials" in errors(done)[0] and "kaggle auth login" in errors(done)[0]


def test_status_reports_every_kernel_and_the_log_of_a_failed_one(kit):
    _, make, _, _ = kit
    done, calls = make("status", STUB_FAILING="alice/advtrain-fgm")
    assert done.returncode == 2
    assert sum(c[:2] == ["kernels", "status"] for c in calls) == 8
    assert "alice/advtrain-fgm failed" in done.stdout and "CUDA out of memory" in done.stdout
    assert "alice/advtrain-sift" in done.stdout


def test_make_output_keeps_what_a_user_needs_apart_from_local_runs(kit):
    repo, make, _, _ = kit
    done, calls = make("output")
    assert done.returncode == 0, done.stderr
    fetched = [c for c in calls if c[:2] == ["kernels", "output"]]
    assert [c[2] for c in fetched] == [f"alice/advtrain-{n}" for n in kaggle_kit.NOTEBOOKS]
    assert all("--file-pattern" in c for c in fetched)
    awp = repo / "submissions" / "kaggle" / "awp"
    assert sorted(p.name for p in awp.iterdir()) == ["metrics.json", "submission.csv"]  # no model.pt, no log
    assert not (repo / "submissions" / "awp").exists()
    (awp / "submission.csv").write_text("mine")
    done, calls = make("output")
    assert "holds an earlier download" in done.stdout and (awp / "submission.csv").read_text() == "mine"
    done, calls = make("output", FORCE="1")
    assert (awp / "submission.csv").read_text() != "mine"


@pytest.mark.slow
def test_make_submit_checks_the_file_first(kit, data_dir):
    repo, make, _, _ = kit
    done, calls = make("submit", "METHOD=bogus")
    assert done.returncode != 0 and "unknown METHOD=bogus" in done.stderr and calls == []
    assert "setup" not in done.stdout  # refused before make builds anything
    done, calls = make("submit", "METHOD=awp")
    assert done.returncode != 0 and "no submission.csv for METHOD=awp" in done.stderr
    shutil.copytree(data_dir, repo / "data")
    (repo / "submissions" / "awp").mkdir(parents=True)
    bad = repo / "submissions" / "awp" / "submission.csv"
    bad.write_text("id,target\n1,0\n")
    done, calls = make("submit", "METHOD=awp")
    assert done.returncode != 0 and "fails the check" in done.stderr and calls == []
    import pandas as pd
    good = pd.read_csv(kit[0].parent / "good.csv").iloc[::-1]  # any order: Kaggle matches by id
    good.to_csv(bad, index=False)
    message = 'it\'s "awp" at $HOME `date`'
    done, calls = make("submit", "METHOD=awp", f"MSG={message}")
    assert done.returncode == 0, done.stderr
    assert calls == [["competitions", "submit", "nlp-getting-started", "-f", str(bad), "-m", message]]
    ensemble = repo / "submissions" / "kaggle" / "compare" / "ensemble_submission.csv"
    ensemble.parent.mkdir(parents=True)
    good.to_csv(ensemble, index=False)
    done, calls = make("submit", "METHOD=ensemble")
    assert done.returncode == 0 and calls[0][4] == str(ensemble)
    done, calls = make("submit", f"FILE={ensemble}", "MSG=x")
    assert done.returncode == 0 and calls[0][4:] == [str(ensemble), "-m", "x"]


def test_attached_snapshot_is_found_under_kaggle_input(tmp_path, monkeypatch, model_dirs):
    import advtrain

    snapshot = tmp_path / "input" / "deberta-v3-xsmall-hf"
    shutil.copytree(model_dirs["bert"], snapshot / "deberta-v3-xsmall")
    monkeypatch.setattr(advtrain, "KAGGLE_INPUT", tmp_path / "input")
    assert advtrain.resolve_model("microsoft/deberta-v3-xsmall") == str(snapshot / "deberta-v3-xsmall")
    assert advtrain.resolve_model("roberta-base") == "roberta-base"
    assert advtrain.resolve_model(str(model_dirs["bert"])) == str(model_dirs["bert"])


def test_env_overrides_parse_types_and_reject_nonsense():
    import advtrain

    cfg = advtrain.env_overrides(advtrain.Config(), {"ADVTRAIN_EPOCHS": "1", "ADVTRAIN_PROGRESS": "no",
                                                     "ADVTRAIN_LR": "1e-4", "ADVTRAIN_METHOD": "awp"})
    assert (cfg.epochs, cfg.progress, cfg.lr, cfg.method) == (1, False, 1e-4, "awp")
    with pytest.raises(advtrain.UserError, match="ADVTRAIN_EPOCHS='three' is not a valid int"):
        advtrain.env_overrides(advtrain.Config(), {"ADVTRAIN_EPOCHS": "three"})
