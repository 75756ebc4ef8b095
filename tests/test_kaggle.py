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

from conftest import ROOT

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
    assert meta["enable_gpu"] is True and meta["enable_internet"] is True and meta["enable_tpu"] is False
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["competition_sources"] == ["nlp-getting-started"] and meta["kernel_sources"] == [utility]
    nb = nbformat.read(folder / meta["code_file"], as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec == {"name": "python3", "display_name": "Python 3", "language": "python"}
    assert nb.cells[0].cell_type == "markdown"


@pytest.mark.slow
@pytest.mark.parametrize("folder", NOTEBOOK_DIRS, ids=lambda p: p.name)
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


# --------------------------------------------------------------------------------------------- Make + stand-in CLI

STUB = textwrap.dedent('''\
    #!{python}
    """Stand-in for the kaggle CLI: records its arguments, plays back statuses, fakes downloads."""
    import json, os, shutil, sys, zipfile
    from pathlib import Path
    args = sys.argv[1:]
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    if args[:2] == ["kernels", "status"]:
        states = Path(os.environ["STUB_STATES"])
        queue = states.read_text().split(",")
        state = queue.pop(0) if len(queue) > 1 else queue[0]
        states.write_text(",".join(queue))
        print(f'{{args[2]}} has status "KernelWorkerStatus.{{state}}"')
    elif args[:2] == ["kernels", "push"]:
        meta = json.loads(Path(args[3], "kernel-metadata.json").read_text())
        print(f"Kernel version 1 successfully pushed: {{meta['id']}}")
    elif args[:2] == ["competitions", "download"]:
        with zipfile.ZipFile(Path(args[args.index("-p") + 1], "nlp-getting-started.zip"), "w") as z:
            for name in ("train.csv", "test.csv", "sample_submission.csv"):
                z.write(Path(os.environ["STUB_DATA"], name), name)
    elif args[:2] == ["kernels", "output"]:
        shutil.copy(os.environ["STUB_SUBMISSION"], Path(args[args.index("-p") + 1], "submission.csv"))
    elif args[:2] == ["config", "view"]:
        print("- username: carol")
''')


@pytest.fixture
def kit(tmp_path, data_dir):
    """A copy of the repo's Kaggle pieces, a stand-in kaggle on PATH, and a way to run make there."""
    repo = tmp_path / "repo"
    for name in ("Makefile", "advtrain.py", "kernel-metadata.json", "requirements.txt", "requirements-dev.txt",
                 "constraints-ci.txt"):
        repo.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "tools", repo / "tools")
    shutil.copytree(ROOT / "notebooks", repo / "notebooks")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(STUB.format(python=sys.executable))
    (bin_dir / "kaggle").chmod(0o755)
    sub = tmp_path / "good.csv"
    import pandas as pd
    pd.DataFrame({"id": pd.read_csv(data_dir / "sample_submission.csv")["id"], "target": 1}).to_csv(sub, index=False)
    home = tmp_path / "home"
    home.mkdir()
    log, states = tmp_path / "calls.jsonl", tmp_path / "states"
    states.write_text("COMPLETE")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home), "STUB_LOG": str(log),
           "STUB_STATES": str(states), "STUB_DATA": str(data_dir), "STUB_SUBMISSION": str(sub),
           "KAGGLE_POLL_SECONDS": "0", "KAGGLE_USERNAME": "alice", "KAGGLE_KEY": "secret"}

    def make(*targets, drop=(), **extra):
        run_env = {k: v for k, v in {**env, **extra}.items() if k not in drop}
        done = subprocess.run(["make", "--no-print-directory", "-C", str(repo), f"PYTHON={sys.executable}",
                               f"VENV={sys.prefix}", *targets], capture_output=True, text=True, env=run_env,
                              timeout=300)
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return done, calls

    return repo, make, states, home


def test_make_data_downloads_unzips_and_is_idempotent(kit):
    repo, make, _, _ = kit
    done, calls = make("data")
    assert done.returncode == 0, done.stderr
    assert calls == [["competitions", "download", "nlp-getting-started", "-p", str(repo / "data")]]
    assert {p.name for p in (repo / "data").iterdir()} == {"train.csv", "test.csv", "sample_submission.csv"}
    done, calls = make("data")
    assert done.returncode == 0 and calls == [] and "already holds" in done.stdout


def test_make_push_sends_the_utility_first_waits_then_the_notebooks(kit):
    repo, make, states, _ = kit
    states.write_text("QUEUED,RUNNING,COMPLETE")
    done, calls = make("push")
    assert done.returncode == 0, done.stderr
    assert calls[0][:3] == ["kernels", "push", "-p"] and calls[0][3].endswith("build/kaggle/advtrain")
    assert [c for c in calls[1:4]] == [["kernels", "status", "alice/advtrain"]] * 3
    pushed = [json.loads(Path(c[3], "kernel-metadata.json").read_text()) for c in calls[4:]]
    assert [c[:2] for c in calls[4:]] == [["kernels", "push"]] * 7
    assert {m["id"] for m in pushed} == {f"alice/advtrain-{n}" for n in kaggle_kit.NOTEBOOKS}
    assert all(m["kernel_sources"] == ["alice/advtrain"] for m in pushed)
    assert all((Path(c[3]) / m["code_file"]).is_file() for c, m in zip(calls[4:], pushed))
    assert "OWNER" in (repo / "notebooks" / "fgm" / "kernel-metadata.json").read_text()  # the source stays generic


def test_make_push_stops_when_the_utility_run_fails(kit):
    _, make, states, _ = kit
    states.write_text("RUNNING,ERROR")
    done, calls = make("push")
    assert done.returncode != 0
    assert "the run of alice/advtrain ended with ERROR" in done.stderr
    assert not any(c[:2] == ["kernels", "push"] for c in calls[1:])


def test_owner_comes_from_kaggle_json_or_the_cli_config(kit):
    _, make, _, home = kit
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "bob", "key": "k"}')
    done, calls = make("status", drop=("KAGGLE_USERNAME", "KAGGLE_KEY"))
    assert done.returncode == 0, done.stderr
    assert calls[0] == ["kernels", "status", "bob/advtrain"] and len(calls) == 8
    (home / ".kaggle" / "kaggle.json").unlink()
    (home / ".kaggle" / "access_token").write_text("token")
    done, calls = make("status", drop=("KAGGLE_USERNAME", "KAGGLE_KEY"))
    assert calls[0] == ["config", "view"] and calls[1] == ["kernels", "status", "carol/advtrain"]


def test_missing_credentials_give_one_line(kit):
    _, make, _, _ = kit
    done, calls = make("push", drop=("KAGGLE_USERNAME", "KAGGLE_KEY"))
    assert done.returncode != 0 and calls == []
    errors = [line for line in done.stderr.splitlines() if line.startswith("kaggle_kit: error:")]
    assert len(errors) == 1 and "no Kaggle credentials" in errors[0] and "kaggle.json" in errors[0]


def test_make_output_fetches_each_finished_kernel(kit):
    repo, make, _, _ = kit
    done, calls = make("output")
    assert done.returncode == 0, done.stderr
    fetched = [c for c in calls if c[:2] == ["kernels", "output"]]
    assert [c[2] for c in fetched] == [f"alice/advtrain-{n}" for n in kaggle_kit.NOTEBOOKS]
    assert all(c[3:] == ["-p", str(repo / "submissions" / c[2].split("-", 1)[1])] for c in fetched)
    assert (repo / "submissions" / "awp" / "submission.csv").is_file()


def test_make_submit_checks_the_file_first(kit, data_dir):
    repo, make, _, _ = kit
    done, calls = make("submit", "METHOD=bogus")
    assert done.returncode != 0 and "unknown METHOD=bogus" in done.stderr and calls == []
    done, calls = make("submit", "METHOD=awp")
    assert done.returncode != 0 and "submissions/awp/submission.csv not found" in done.stderr
    shutil.copytree(data_dir, repo / "data")
    (repo / "submissions" / "awp").mkdir(parents=True)
    bad = repo / "submissions" / "awp" / "submission.csv"
    bad.write_text("id,target\n1,0\n")
    done, calls = make("submit", "METHOD=awp")
    assert done.returncode != 0 and "fails the check" in done.stderr and calls == []
    shutil.copy(os.environ.get("STUB_SUBMISSION", "") or kit[0].parent / "good.csv", bad)
    done, calls = make("submit", "METHOD=awp", "MSG=first try")
    assert done.returncode == 0, done.stderr
    assert calls == [["competitions", "submit", "nlp-getting-started", "-f", str(bad), "-m", "first try"]]


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
