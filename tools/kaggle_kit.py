"""The Kaggle round trip behind the Makefile: data, notebooks, push, status, output, submit.

    python tools/kaggle_kit.py data | notebooks | push | status | output | submit | submissions

Standard library only; it drives the official `kaggle` command-line tool, which `make setup` installs
into .venv: kaggle 2.2.x, whose real CLI the tests drive against a stand-in Kaggle API. Another CLI can
be named with KAGGLE_BIN; the status lines of 1.6 and 1.7 are read too, but kaggle before 1.8 ignores
machine_shape, so "GPU T4 x2" is not guaranteed there.
Settings come from the environment, as make passes them: COMPETITION (the competition's slug,
nlp-getting-started by default), METHODS (a subset of the notebooks), INFERENCE (also push the inference
notebook, after the training ones), GPU_SESSIONS (Kaggle's cap on concurrent GPU sessions, 2), FORCE,
METHOD, FILE, KERNEL and VERSION (a code competition's notebook submission), MSG.
The committed metadata says OWNER where the Kaggle user name goes: `push` writes a copy with your
user name (from KAGGLE_USERNAME, else the kaggle config) into build/kaggle/ and pushes that, so
nobody edits JSON by hand. Each failure is one line naming the fix, exit code 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_COMPETITION = "nlp-getting-started"
COMPETITION = os.environ.get("COMPETITION") or DEFAULT_COMPETITION  # make ... COMPETITION=<slug>
PLACEHOLDER = "OWNER"
UTILITY = "advtrain"
METHODS = {
    "baseline": ("Baseline", "Plain fine-tuning, no attack: the reference every method is measured against."),
    "fgm": ("FGM", "Fast Gradient Method (Miyato et al. 2017): one extra forward/backward on word embeddings "
                   "shifted by eps * g / ||g||."),
    "pgd": ("PGD", "Projected Gradient Descent (Madry et al. 2018): K ascent steps on the embeddings, projected "
                   "into an eps-ball."),
    "freelb": ("FreeLB", "FreeLB (Zhu et al. 2020): K ascent steps whose parameter gradients are averaged "
                         "(\"free\" adversarial training)."),
    "awp": ("AWP", "Adversarial Weight Perturbation (Wu et al. 2020; Feedback Prize 2021 1st place): perturbs "
                   "the weights, not the inputs."),
    "sift": ("SiFT", "Scale-invariant fine-tuning (He et al. 2021, DeBERTa): perturbs normalised embeddings "
                     "with a symmetric-KL consistency loss."),
}
NOTEBOOKS = list(METHODS) + ["compare"]  # what `make push` pushes; the inference notebook only when asked
INFERENCE = "inference"


class KitError(Exception):
    """One line for the user, naming the fix."""


# --------------------------------------------------------------------------------------------- notebooks


def slug(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of other characters become one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _cell(kind: str, text: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": text.strip("\n").splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


IMPORT_CELL = '''
# Find the advtrain utility script (attach it with "Add input" > Notebooks > advtrain).
# Its path under /kaggle/usr/lib differs between Kaggle images, so search for it.
import os, sys
from pathlib import Path

roots = [os.environ.get("ADVTRAIN_LIB", "/kaggle/usr/lib"), "."]
found = next((p for r in roots if Path(r).is_dir() for p in sorted(Path(r).rglob("advtrain.py"))), None)
if found is None:
    raise FileNotFoundError("advtrain.py not found: attach the advtrain utility script to this notebook "
                            "(Add input > Notebooks), or put advtrain.py next to it.")
sys.path.insert(0, str(found.parent))
import advtrain
import pandas as pd
print("advtrain", advtrain.__version__, "from", found)
'''

RUN_CELL = '''
import torch

cfg = advtrain.env_overrides(cfg)  # ADVTRAIN_<FIELD> environment variables win (the offline tests use them)
if USE_ALL_GPUS and torch.cuda.device_count() > 1:
    metrics = advtrain.launch(cfg, torch.cuda.device_count())  # torchrun: one process per GPU (DDP)
else:
    metrics = advtrain.run(cfg)
print("score:", metrics["score"], "| train samples/s:", metrics["train_samples_per_s"])
pd.DataFrame(metrics["evaluations"])
'''

COMPARE_RUN_CELL = '''
cfg = advtrain.env_overrides(cfg)  # ADVTRAIN_<FIELD> environment variables win (the offline tests use them)
methods = os.environ.get("ADVTRAIN_METHODS", METHODS).split(",")
seeds = [int(s) for s in os.environ.get("ADVTRAIN_SEEDS", SEEDS).split(",")]
table = advtrain.compare(cfg, methods, seeds)
print(Path(cfg.output_dir, "results.md").read_text())
table
'''


PRESETS = {  # each notebook's starting point (README, "Config"): a measured gain where one was confirmed
    "fgm": 'preset="overfit",  # FGM 0.2 from epoch 1: -0.020 log loss against a tuned baseline on 8 fresh seeds '
           '(spooky; other competitions not measured yet, RESULTS.md)',
    "sift": 'preset="overfit",  # SiFT lambda 3 from epoch 1: -0.021 log loss on 8 fresh seeds where an untuned '
            'baseline overfits; against a tuned baseline not proven (RESULTS.md)',
}
RECIPE = ('preset="recipe",  # evaluation 4x an epoch, attack from the end of warm-up, embedding-relative sizes '
          '(README)')


def config_cell(method: str, multi_gpu: bool = True) -> str:
    switch = ("USE_ALL_GPUS = True  # Kaggle's two T4s: data-parallel; each GPU takes half of every batch, so "
              "one or two GPUs train the same model\n")
    return f'''
# The only cell to edit. Every field of advtrain.Config is listed in the README's config table.
cfg = advtrain.Config(
    method="{method}",
    model="microsoft/deberta-v3-xsmall",  # hub name, or the folder of an attached snapshot (internet off)
    competition="{DEFAULT_COMPETITION}",  # the competition attached to this notebook (make push COMPETITION=...)
    text_cols="text",  # its text column(s); two are encoded as a pair
    target_cols="target",  # its target column(s)
    metric="f1",  # its metric: f1 accuracy logloss auc rmse mcrmse pearson qwk
    output_dir="/kaggle/working",  # the run folder: submission, metrics, and model/ for the inference notebook
    overwrite=True,
    {PRESETS.get(method, RECIPE)}
    epochs=3,  # the kit's defaults for deberta-v3-xsmall, not measured here: RESULTS.md's comparison
    batch_size=32,  # used 1 epoch at lr 5e-5 with MiniLM on a CPU
    lr=3e-5,
)
''' + (switch if multi_gpu else "")


INFERENCE_CONFIG_CELL = '''
# The only cell to edit. Attach (Add input > Notebooks) the training notebooks whose outputs to average;
# this notebook runs with the internet off, as code competitions require.
RUNS = ["advtrain-baseline", "advtrain-awp"]  # training notebooks (their run folders: metrics.json, model/)
WEIGHTS = None  # one weight per run found, or None for equal weights
BATCH_SIZE = 0  # 0: each run's own eval batch size
'''

INFERENCE_RUN_CELL = '''
runs = advtrain.find_runs(RUNS, os.environ.get("ADVTRAIN_INPUT", "/kaggle/input"))
print("averaging", *runs, sep="\\n  ")
submission = advtrain.predict(runs, output_dir=os.environ.get("ADVTRAIN_OUTPUT_DIR", "/kaggle/working"),
                              weights=WEIGHTS, batch_size=BATCH_SIZE, overwrite=True)
submission.head()
'''


def notebook(name: str) -> dict:
    if name == "compare":
        cells = [
            _cell("markdown", "# advtrain: method comparison across seeds\n\nEvery method x seed on the same "
                              "split per seed; mean +- std, paired differences from the baseline with 95% "
                              "intervals, and plots. Results land in /kaggle/working."),
            _cell("code", IMPORT_CELL),
            _cell("code", config_cell("baseline", multi_gpu=False).replace("# The only cell to edit.",
                                                          "# The only cell to edit (with METHODS and SEEDS).")
                  + 'METHODS = "baseline,fgm,awp,sift"\nSEEDS = "42,43,44"\n'),
            _cell("code", COMPARE_RUN_CELL),
            _cell("code", 'from IPython.display import Image, display\nfor png in sorted(Path(cfg.output_dir)'
                          '.glob("*.png")):\n    display(Image(filename=str(png)))'),
        ]
    elif name == INFERENCE:
        cells = [
            _cell("markdown", "# advtrain: inference for code competitions\n\nInternet off. Averages the saved "
                              "models (every fold of every run) of the attached training notebooks and writes "
                              "`/kaggle/working/submission.csv` in the sample submission's columns."),
            _cell("code", IMPORT_CELL),
            _cell("code", INFERENCE_CONFIG_CELL),
            _cell("code", INFERENCE_RUN_CELL),
        ]
    else:
        title, what = METHODS[name]
        cells = [
            _cell("markdown", f"# advtrain: {title}\n\n{what}\n\nFine-tunes `microsoft/deberta-v3-xsmall` on "
                              "the attached competition (Disaster Tweets as committed), evaluates several times an "
                              "epoch and keeps the best evaluation by the competition's metric, reports the holdout "
                              "score and writes `submission.csv`, `metrics.json`, `train.log` and the model folder "
                              "(for the inference notebook) to /kaggle/working."),
            _cell("code", IMPORT_CELL),
            _cell("code", config_cell(name)),
            _cell("code", RUN_CELL),
        ]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i}"
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def notebook_metadata(name: str) -> dict:
    title = f"advtrain {METHODS[name][0] if name in METHODS else name}"
    inference = name == INFERENCE  # internet off; the utility script and the training notebooks attached
    sources = [f"{PLACEHOLDER}/{UTILITY}"] + ([f"{PLACEHOLDER}/advtrain-{m}" for m in ("baseline", "awp")]
                                             if inference else [])
    return {"id": f"{PLACEHOLDER}/{slug(title)}", "title": title, "code_file": f"{slug(title)}.ipynb",
            "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
            "enable_tpu": False, "enable_internet": not inference, "machine_shape": "NvidiaTeslaT4",
            "keywords": [], "dataset_sources": [], "competition_sources": [DEFAULT_COMPETITION],
            "kernel_sources": sources, "model_sources": []}


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_notebooks(root: Path = ROOT) -> list[Path]:
    """notebooks/<name>/ with the notebook and its kernel-metadata.json, from the templates above."""
    written = []
    for name in NOTEBOOKS + [INFERENCE]:
        meta = notebook_metadata(name)
        folder = root / "notebooks" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / meta["code_file"]).write_text(_dump(notebook(name)))
        (folder / "kernel-metadata.json").write_text(_dump(meta))
        written.append(folder)
    return written


# --------------------------------------------------------------------------------------------- kaggle CLI

GPU_SESSIONS = 2  # Kaggle runs at most this many GPU batch sessions per account at once
WANTED = ("submission.csv", "metrics.json", "train.log", "results.md", "results.csv", "runs.csv", "valid.png",
          "score.png", "grid.png", "ensemble_submission.csv")  # what `make output` keeps of /kaggle/working
FINISHED = ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED", "CANCEL_REQUESTED")


def kaggle_executable() -> str:
    """The kaggle CLI: KAGGLE_BIN, else the one beside this Python (the project's .venv), else PATH."""
    for candidate in (os.environ.get("KAGGLE_BIN"), str(Path(sys.executable).parent / "kaggle"),
                      shutil.which("kaggle")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise KitError("the kaggle CLI is not installed: run `make setup` (it installs kaggle into .venv), or "
                   "pip install 'kaggle>=2.2' six")


def explain(args: tuple[str, ...], output: str) -> str:
    """Kaggle's whole answer as one sentence with the fix, for the failures users meet."""
    lines = [line.strip() for line in output.splitlines() if line.strip()
             and not re.search(r"warning|warnings\.warn|^\s*from |^\s*import ", line, re.IGNORECASE)]
    text = " ".join(lines)
    low = text.lower()
    what = " ".join(args[:2])
    if re.search(r"authentication required|401|unauthorized|could not find kaggle\.json", low):
        return (f"Kaggle did not accept your credentials for `kaggle {what}`: create a token at "
                "https://www.kaggle.com/settings/api and save it as ~/.kaggle/access_token (or ~/.kaggle/kaggle.json "
                "for an old-style key), set KAGGLE_API_TOKEN, or run `kaggle auth login`.")
    failed = re.search(r"failed to score\.?\s*Error:\s*(.*)", text)
    if failed:
        return f"Kaggle could not score the submission: {failed.group(1).strip()[:400]}"
    if "403" in text or "forbidden" in low:
        return (f"Kaggle refused `kaggle {what}` (403): accept the competition's rules at "
                f"https://www.kaggle.com/c/{COMPETITION}/rules, and for GPU kernels verify your phone number.")
    if "404" in text or "not found" in low:
        return (f"Kaggle found nothing for `kaggle {' '.join(args)}` (404): check the name; kernels exist once "
                "`make push` has pushed them.")
    if re.search(r"connection|name or service not known|max retries|timed out|network", low):
        return f"no connection to Kaggle for `kaggle {what}`: check the network (or a proxy), then try again."
    if "modulenotfounderror" in low or "no module named" in low:
        return (f"the kaggle CLI is broken ({text[:200]}): reinstall it with `make setup`, or "
                "pip install 'kaggle>=2.2' six")
    return f"`kaggle {' '.join(args)}` failed: {text[:600] or 'no output'}"


def kaggle(*args: str, capture: bool = False) -> str:
    """Run the kaggle CLI; any failure, including one it reports with exit code 0, is a KitError."""
    done = subprocess.run([kaggle_executable(), *args], capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0 or "Authentication required" in output:
        raise KitError(explain(args, output))
    if not capture:
        print(done.stdout, end="")
    return done.stdout


def config_dir() -> Path:
    """Where the CLI keeps its credentials: KAGGLE_CONFIG_DIR, ~/.kaggle, else ~/.config/kaggle."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path.home() / ".kaggle"
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return home if home.exists() or not xdg.exists() else xdg


def owner() -> str:
    """Your Kaggle user name: KAGGLE_USERNAME, else kaggle.json, else the CLI's own `kaggle config view`
    (which knows every form of credentials it accepts)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    path = config_dir() / "kaggle.json"
    if path.is_file():
        try:
            name = json.loads(path.read_text()).get("username")
        except ValueError:
            raise KitError(f"{path} is not valid JSON: download a new API token from kaggle.com > Settings.") from None
        if name:
            return name
    match = re.search(r"username:\s*(\S+)", kaggle("config", "view", capture=True))
    if not match or match.group(1) == "None":
        raise KitError("cannot tell your Kaggle user name: set KAGGLE_USERNAME (your kaggle.com name).")
    return match.group(1)


def stage(folder: Path, user: str, build: Path) -> Path:
    """Copy a kernel folder into build/, with OWNER replaced by the user name, code_file beside it, and the
    competition (COMPETITION) attached and named in the notebook's Config cell."""
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    target = build / meta["id"].split("/")[1]
    target.mkdir(parents=True, exist_ok=True)
    code = (folder / meta["code_file"]).read_text()
    if meta["kernel_type"] == "notebook":
        code = code.replace(f'competition=\\"{DEFAULT_COMPETITION}\\"', f'competition=\\"{COMPETITION}\\"')
        meta["competition_sources"] = [COMPETITION]
    (target / Path(meta["code_file"]).name).write_text(code)
    meta["code_file"] = Path(meta["code_file"]).name
    meta["id"] = meta["id"].replace(PLACEHOLDER, user, 1)
    meta["kernel_sources"] = [k.replace(PLACEHOLDER, user, 1) for k in meta.get("kernel_sources", [])]
    (target / "kernel-metadata.json").write_text(_dump(meta))
    return target


def kernel_id(folder: Path, user: str) -> str:
    return json.loads((folder / "kernel-metadata.json").read_text())["id"].replace(PLACEHOLDER, user, 1)


def url(kernel: str) -> str:
    return f"https://www.kaggle.com/code/{kernel}"


def parse_status(text: str) -> str:
    """The status field of `kaggle kernels status`: `has status "KernelWorkerStatus.COMPLETE"` (1.7 and
    later) or `has status "complete"` / "cancelAcknowledged" (1.6), as COMPLETE / CANCEL_ACKNOWLEDGED."""
    match = re.search(r'has status "([^"]*)"', text)
    if not match:
        raise KitError(f"unexpected answer from `kaggle kernels status`: {text.strip()[:300]}")
    value = match.group(1).rsplit(".", 1)[-1]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", value).upper()


def status_of(kernel: str) -> str:
    return parse_status(kaggle("kernels", "status", kernel, capture=True))


VERSIONS = ROOT / "build" / "kaggle-versions.json"  # the version of each kernel `make push` last pushed


def push(folder: Path) -> None:
    """kaggle kernels push, which reports a refusal on stdout with exit code 0: stop on it with Kaggle's reason.
    The version Kaggle gave the kernel is kept in build/kaggle-versions.json (for `make submit KERNEL=`)."""
    out = kaggle("kernels", "push", "-p", str(folder), capture=True)
    refused = re.search(r"Kernel push error:\s*(.*)", out)
    if refused or "successfully pushed" not in out.lower() and "kernel version" not in out.lower():
        reason = refused.group(1).strip() if refused else out.strip()[:300]
        fix = ("wait until your running GPU sessions finish (make status), then push again" if "GPU session" in reason
               else "fix kernel-metadata.json or your account (phone verification), then push again")
        raise KitError(f"Kaggle refused to push {folder.name}: {reason} ({fix}).")
    version = re.search(r"[Kk]ernel version (\d+)", out)
    if version:
        kernel = json.loads((folder / "kernel-metadata.json").read_text())["id"]
        versions = json.loads(VERSIONS.read_text()) if VERSIONS.is_file() else {}
        VERSIONS.parent.mkdir(parents=True, exist_ok=True)
        VERSIONS.write_text(_dump({**versions, kernel: int(version.group(1))}))
    print(out.strip().splitlines()[-1])


def wait_until_finished(kernels: list[str], poll: float, timeout: float) -> dict[str, str]:
    """Poll until every kernel is COMPLETE, ERROR or cancelled; returns their final states."""
    start, states = time.monotonic(), {}
    while True:
        for kernel in kernels:
            if states.get(kernel) not in FINISHED:
                states[kernel] = status_of(kernel)
                print(f"{kernel}: {states[kernel]}", flush=True)
        if all(state in FINISHED for state in states.values()):
            return states
        if time.monotonic() - start > timeout:
            raise KitError(f"{', '.join(k for k in kernels if states[k] not in FINISHED)} not finished after "
                           f"{timeout:.0f} s: check `make status`, then `make push` the rest.")
        time.sleep(poll)


def failed_log(kernel: str, lines: int = 15) -> str:
    """The last lines of a kernel's log (kaggle kernels output also fetches <slug>.log)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            kaggle("kernels", "output", kernel, "-p", tmp, capture=True)
        except KitError as e:
            return f"(no log: {e})"
        logs = sorted(Path(tmp).glob("*.log"))
        if not logs:
            return "(no log)"
        text = logs[0].read_text(errors="replace")
        try:  # Kaggle's log is a JSON list of {"data": ...} records
            text = "".join(record.get("data", "") for record in json.loads(text))
        except (ValueError, AttributeError):
            pass
        return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def selected(methods: str, inference: bool = False) -> list[str]:
    """The notebooks to work on: METHODS (a subset; `inference` may be named), else every training notebook,
    and the inference notebook last when asked (INFERENCE=1)."""
    names = [m for m in methods.split(",") if m] if methods else list(NOTEBOOKS)
    unknown = [m for m in names if m not in NOTEBOOKS + [INFERENCE]]
    if unknown:
        raise KitError(f"unknown METHODS={methods}: use names from {', '.join(NOTEBOOKS + [INFERENCE])}, e.g. "
                       "METHODS=fgm,awp")
    if inference and INFERENCE not in names:
        names.append(INFERENCE)
    return [n for n in names if n != INFERENCE] + [n for n in names if n == INFERENCE]  # inference after training


# --------------------------------------------------------------------------------------------- commands


def data_folder() -> Path:
    """Where `make data` puts the competition's files: data/ for Disaster Tweets, data/<slug>/ for any other."""
    return ROOT / "data" if COMPETITION == DEFAULT_COMPETITION else ROOT / "data" / COMPETITION


def cmd_data(data: Path | None = None) -> None:
    data = data or data_folder()
    if any((data / f"train.{x}").is_file() for x in ("csv", "tsv")) and \
            any((data / f"test.{x}").is_file() for x in ("csv", "tsv")):
        print(f"{data} already holds the competition files")
        return
    data.mkdir(parents=True, exist_ok=True)
    kaggle("competitions", "download", COMPETITION, "-p", str(data))
    archive = data / f"{COMPETITION}.zip"
    if not archive.is_file():
        raise KitError(f"{archive} was not downloaded: accept the competition's rules at "
                       f"https://www.kaggle.com/c/{COMPETITION}/rules, then run make data again.")
    for zipped in [archive]:
        try:
            with zipfile.ZipFile(zipped) as z:
                z.extractall(data)
        except zipfile.BadZipFile:
            zipped.unlink()
            raise KitError(f"{zipped} was not a complete zip file (removed): run make data again.") from None
        zipped.unlink()
    for inner in sorted(data.glob("*.zip")):  # some competitions zip each file again (train.tsv.zip)
        with zipfile.ZipFile(inner) as z:
            z.extractall(data)
        inner.unlink()
    print(f"unpacked {', '.join(sorted(p.name for p in data.iterdir() if p.is_file()))} into {data}")


def cmd_push(methods: str, poll: float, timeout: float, sessions: int, inference: bool = False) -> None:
    names = selected(methods, inference)
    user = owner()
    build = ROOT / "build" / "kaggle"
    shutil.rmtree(build, ignore_errors=True)
    push(stage(ROOT, user, build))
    utility = f"{user}/{UTILITY}"
    if wait_until_finished([utility], poll, timeout)[utility] != "COMPLETE":
        raise KitError(f"the run of {utility} did not complete: read its log at {url(utility)} and push again.\n"
                       + failed_log(utility))
    states = {}
    training = [n for n in names if n != INFERENCE]
    waves = [training[i:i + sessions] for i in range(0, len(training), sessions)]
    waves += [[INFERENCE]] if INFERENCE in names else []  # once the runs it averages have finished
    for wave in waves:  # waves: Kaggle runs at most `sessions` GPU sessions at once
        for name in wave:
            push(stage(ROOT / "notebooks" / name, user, build))
        states.update(wait_until_finished([kernel_id(ROOT / "notebooks" / n, user) for n in wave], poll, timeout))
    print(table(states))


def table(states: dict[str, str]) -> str:
    rows = [f"{kernel:<40} {state:<20} {url(kernel)}" for kernel, state in states.items()]
    return "\n".join([f"{'kernel':<40} {'status':<20} url", *rows])


def cmd_status(methods: str) -> bool:
    """Every kernel's state; for a failed one, the end of its log. Returns whether all were readable and none failed."""
    user, ok = owner(), True
    utility = f"{user}/{UTILITY}"
    states = {utility: status_of(utility)}  # credentials and network fail here, once
    for kernel in [kernel_id(ROOT / "notebooks" / n, user) for n in selected(methods)]:
        try:
            states[kernel] = status_of(kernel)
        except KitError as e:
            states[kernel], ok = f"unknown ({e})", False
    print(table({k: v.split(" (")[0] for k, v in states.items()}))
    for kernel, state in states.items():
        if state.startswith("unknown"):
            print(f"{kernel}: {state}")
        elif state == "ERROR":
            ok = False
            print(f"{kernel} failed; the end of its log:\n{failed_log(kernel)}")
    return ok


def cmd_output(methods: str, force: bool) -> bool:
    """The files a user needs from each finished kernel into submissions/kaggle/<name>/ (never mixed with
    local runs); an earlier download is replaced only with FORCE=1."""
    user, ok = owner(), True
    version = re.search(r"(\d+)\.\d+", kaggle("--version", capture=True))
    pattern = ["--file-pattern", "|".join(re.escape(w) for w in WANTED)] if version and int(version.group(1)) >= 2 \
        else []
    for name in selected(methods):
        kernel = kernel_id(ROOT / "notebooks" / name, user)
        target = ROOT / "submissions" / "kaggle" / name
        try:
            state = status_of(kernel)
            if state != "COMPLETE":
                print(f"{kernel}: {state}, nothing to fetch" + (f"; the end of its log:\n{failed_log(kernel)}"
                                                                 if state == "ERROR" else ""))
                ok = ok and state != "ERROR"
                continue
            if target.is_dir() and any(target.iterdir()) and not force:
                print(f"{kernel}: {target.relative_to(ROOT)} holds an earlier download: make output FORCE=1 "
                      "replaces it")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                kaggle("kernels", "output", kernel, "-p", tmp, *pattern, capture=True)
                found = {p.name: p for p in sorted(Path(tmp).rglob("*")) if p.is_file() and p.name in WANTED}
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for file_name, path in found.items():
                    shutil.copy2(path, target / file_name)
            print(f"{kernel}: {', '.join(found) or 'no files'} -> {target.relative_to(ROOT)}")
        except KitError as e:
            ok = False
            print(f"{kernel}: {e}")
    return ok


def submission_file(method: str, file: str) -> Path:
    """FILE if given; else the method's local run, else its Kaggle download (METHOD=ensemble: compare's ensemble)."""
    if file:
        path = Path(file)
        if path.is_dir():
            inside = " (it holds submission.csv: FILE=" + str(path / "submission.csv") + ")" \
                if (path / "submission.csv").is_file() else ""
            raise KitError(f"FILE={file} is a folder, not a file: name the submission file itself{inside}.")
        if not path.is_file():
            raise KitError(f"FILE={file} not found.")
        return path
    if method not in list(METHODS) + ["ensemble"]:
        raise KitError(f"unknown METHOD={method or '(empty)'}: use one of {', '.join(METHODS)} or ensemble, "
                       "e.g. make submit METHOD=awp, or make submit FILE=path/to/submission.csv")
    name, folder = ("ensemble_submission.csv", "compare") if method == "ensemble" else ("submission.csv", method)
    for path in (ROOT / "submissions" / folder / name, ROOT / "submissions" / "kaggle" / folder / name):
        if path.is_file():
            return path
    make = ("`make compare ARGS=\"--ensemble fgm,awp\"`" if method == "ensemble"
            else f"`make train METHOD={method}`")
    raise KitError(f"no {name} for METHOD={method} in submissions/{folder}/ or submissions/kaggle/{folder}/: run "
                   f"{make}, or fetch the kernel outputs with `make output`.")


def cmd_submit_kernel(kernel: str, version: str, message: str) -> None:
    """Submit a notebook's output to a code competition: kaggle competitions submit -k OWNER/KERNEL -v N
    -f submission.csv, waiting for the score where the CLI can (--wait, kaggle 2.x)."""
    if "/" in kernel:
        raise KitError(f"KERNEL={kernel}: give the notebook's slug alone (e.g. KERNEL=advtrain-inference); the owner "
                       "is the user your credentials name.")
    kernel_ref = f"{owner()}/{kernel}"
    if not version:
        version = str(json.loads(VERSIONS.read_text()).get(kernel_ref, "")) if VERSIONS.is_file() else ""
    if not version.isdigit():
        raise KitError(f"no version of {kernel_ref} known: pass VERSION=N (the version in the notebook's Versions "
                       "tab on Kaggle), or push it with `make push` first.")
    can_wait = "--wait" in kaggle("competitions", "submit", "--help", capture=True)
    out = kaggle("competitions", "submit", COMPETITION, "-k", kernel_ref, "-v", version, "-f", "submission.csv",
                 "-m", message or f"advtrain {kernel} v{version}", *(["--wait"] if can_wait else []), capture=True)
    print(out.strip())
    score = re.search(r"Public score:\s*(\S+)", out)
    print(f"{kernel_ref} version {version}: " + (f"public score {score.group(1)}" if score else
                                                  "submitted; `make submissions` shows its score once scored"))


def cmd_submit(method: str, file: str, message: str) -> None:
    path = submission_file(method, file)
    checked = subprocess.run([sys.executable, str(ROOT / "advtrain.py"), "check-submission", str(path),
                              "--competition", COMPETITION] + (["--data-dir", str(data_folder())]
                                                               if data_folder().is_dir() else []),
                             capture_output=True, text=True, cwd=ROOT)
    if checked.returncode != 0:
        raise KitError(f"not submitted, {path} fails the check: "
                       f"{checked.stderr.strip().removeprefix('advtrain: error: ')}")
    kaggle("competitions", "submit", COMPETITION, "-f", str(path), "-m", message or f"advtrain {method or path.name}")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    def env(name, default=""):  # make exports an unset variable as empty
        return os.environ.get(name) or default

    poll, timeout = float(env("KAGGLE_POLL_SECONDS", "20")), float(env("KAGGLE_WAIT_SECONDS", "3600"))
    methods = env("METHODS", "") if env("METHODS_FROM", "") == "command line" else ""
    try:
        ok = True
        if command == "notebooks":
            for folder in write_notebooks():
                print(f"wrote {folder.relative_to(ROOT)}")
        elif command == "data":
            cmd_data()
        elif command == "push":
            sessions = env("GPU_SESSIONS", str(GPU_SESSIONS))
            if not sessions.isdigit() or int(sessions) < 1:
                raise KitError(f"GPU_SESSIONS={sessions}: a whole number of concurrent GPU sessions, 2 on Kaggle.")
            cmd_push(methods, poll, timeout, int(sessions), env("INFERENCE", "") not in ("", "0"))
        elif command == "status":
            ok = cmd_status(methods)
        elif command == "output":
            ok = cmd_output(methods, env("FORCE", "") not in ("", "0"))
        elif command == "submit-check":  # before make builds .venv: a bad METHOD or FILE costs nothing
            if not env("KERNEL", ""):
                submission_file(env("METHOD", ""), env("FILE", ""))
        elif command == "submit" and env("KERNEL", ""):
            cmd_submit_kernel(env("KERNEL", ""), env("VERSION", ""), env("SUBMIT_MESSAGE", env("MSG", "")))
        elif command == "submit":
            cmd_submit(env("METHOD", ""), env("FILE", ""), env("SUBMIT_MESSAGE", env("MSG", "")))
        elif command == "submissions":
            kaggle("competitions", "submissions", COMPETITION)
        else:
            print(__doc__)
            return 0 if command in ("", "-h", "--help") else 2
    except KitError as e:
        print(f"kaggle_kit: error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
