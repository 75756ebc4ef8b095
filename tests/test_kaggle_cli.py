"""The Kaggle round trip driven through the real kaggle package (its CLI, unmodified) against a stand-in
Kaggle API served on loopback (tests/kaggle_standin.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import kaggle_repo

pytestmark = pytest.mark.slow
CLI = Path(sys.executable).parent / "kaggle"


@pytest.fixture
def standin():
    if not CLI.is_file():
        pytest.skip("the kaggle CLI is not installed here (make setup installs it)")
    from kaggle_standin import KaggleStandIn

    made = []

    def start(**kw):
        try:
            made.append(KaggleStandIn(**kw))
        except OSError as e:
            pytest.skip(f"cannot serve on 127.0.0.1:80 ({e})")
        return made[-1]

    yield start
    for s in made:
        s.close()


@pytest.fixture
def repo(tmp_path):
    return kaggle_repo(tmp_path)


def make(repo, *targets, token="good-token", **extra):
    home = repo.parent / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
           "KAGGLE_POLL_SECONDS": "0", **({"KAGGLE_API_TOKEN": token} if token else {}), **extra}
    return subprocess.run(["make", "--no-print-directory", "-C", str(repo), f"PYTHON={sys.executable}",
                           f"VENV={sys.prefix}", *targets], capture_output=True, text=True, env=env, timeout=600)


def test_push_respects_the_gpu_session_cap_and_every_notebook_is_accepted(standin, repo):
    api = standin(gpu_cap=2)
    done = make(repo, "push")
    assert done.returncode == 0, done.stdout + done.stderr
    assert api.pushed[0] == "alice/advtrain" and len(api.pushed) == 8  # the user name came from the token
    assert api.max_running <= 2
    assert "alice/advtrain-compare" in done.stdout and "COMPLETE" in done.stdout


def test_a_refusal_stops_the_push_with_kaggles_reason(standin, repo):
    api = standin(gpu_cap=1)
    done = make(repo, "push")  # waves of 2 against a cap of 1: Kaggle refuses the second notebook
    assert done.returncode == 2
    assert "Maximum batch GPU session count of 1 reached" in done.stderr
    assert len(api.pushed) == 2


def test_bad_credentials_are_one_line(standin, repo):
    standin()
    done = make(repo, "status", token="expired")
    errors = [line for line in done.stderr.splitlines() if line.startswith("kaggle_kit: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "did not accept your credentials" in errors[0]


def test_status_and_output_report_every_kernel_and_a_failed_ones_log(standin, repo):
    api = standin(polls_until_complete=1, failing=("alice/advtrain-fgm",))
    for slug in ["alice/advtrain"] + [f"alice/advtrain-{n}" for n in ("baseline", "fgm", "pgd", "freelb", "awp",
                                                                          "sift", "compare")]:
        api.remaining[slug] = 1
    done = make(repo, "output")
    assert done.returncode == 2  # one kernel failed
    assert "CUDA out of memory" in done.stdout
    kept = repo / "submissions" / "kaggle" / "awp"
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.json", "submission.csv", "train.log"]
    assert not (repo / "submissions" / "kaggle" / "fgm").exists()


def test_status_with_a_kaggle_json_under_the_xdg_config_folder(standin, repo):
    api = standin(polls_until_complete=1)
    config = repo.parent / "home" / ".config" / "kaggle"
    config.mkdir(parents=True)
    (config / "kaggle.json").write_text('{"username": "alice", "key": "legacy-key"}')
    for slug in ["alice/advtrain"] + [f"alice/advtrain-{n}" for n in ("baseline", "fgm", "pgd", "freelb", "awp",
                                                                          "sift", "compare")]:
        api.remaining[slug] = 1
    done = make(repo, "status", token=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("COMPLETE") == 8


def test_a_kernel_submission_names_competition_kernel_version_and_file_and_waits_for_the_score(standin, repo):
    api = standin()
    done = make(repo, "submit", KERNEL="advtrain-inference", VERSION="3", MSG="awp + baseline")
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [body for method, body in api.requests if method == "CreateCodeSubmission"]
    assert sent == [{"fileName": "submission.csv", "competitionName": "nlp-getting-started", "kernelOwner": "alice",
                     "kernelSlug": "advtrain-inference", "kernelVersion": 3,
                     "submissionDescription": "awp + baseline"}]
    assert "alice/advtrain-inference version 3: public score 0.81234" in done.stdout


def test_a_kernel_submission_takes_the_version_make_push_recorded(standin, repo):
    api = standin(polls_until_complete=1)
    assert make(repo, "push", "METHODS=inference").returncode == 0
    done = make(repo, "submit", KERNEL="advtrain-inference", COMPETITION="commonlitreadabilityprize")
    assert done.returncode == 0, done.stdout + done.stderr
    sent = [body for method, body in api.requests if method == "CreateCodeSubmission"][0]
    assert (sent["kernelVersion"], sent["competitionName"]) == (1, "commonlitreadabilityprize")


@pytest.mark.parametrize("scoring,message", [
    ("refused", "Submission not allowed: this notebook has internet access enabled"),
    ("failed", "Kaggle could not score the submission: Notebook Threw Exception: submission.csv not found"),
])
def test_a_refused_or_failed_kernel_submission_is_one_line(scoring, message, standin, repo):
    standin(scoring=scoring)
    done = make(repo, "submit", KERNEL="advtrain-inference", VERSION="2")
    errors = [line for line in done.stderr.splitlines() if line.startswith("kaggle_kit: error:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stdout + done.stderr


def test_a_kernel_submission_without_a_known_version_says_how_to_give_one(standin, repo):
    standin()
    done = make(repo, "submit", KERNEL="advtrain-inference")
    assert done.returncode == 2 and "pass VERSION=N" in done.stderr
