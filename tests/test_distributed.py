"""Data-parallel training through torchrun (CPU, gloo, 2 processes)."""
import subprocess
import sys

import pandas as pd
import pytest
import torch

import advtrain
from conftest import ROOT, base_config

sys.path.insert(0, str(ROOT / "tests"))
import ddp_worker  # noqa: E402

METHODS = ["baseline", "fgm", "pgd", "freelb", "awp", "sift"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_trains_every_method_and_writes_once(method, data_dir, model_dirs, tmp_path):
    out = tmp_path / method
    cfg = base_config(data_dir, model_dirs["deberta-v2"], out, method=method, epochs=1, grad_accum=2, batch_size=8,
                      save_model=True, eval_every=1.0)
    metrics = advtrain.launch(cfg, 2)
    assert metrics["world_size"] == 2 and metrics["evaluations"][0]["adv_steps"] > (0 if method != "baseline" else -1)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model", "oof.csv", "submission.csv",
                                                     "test_probs.csv", "train.log"]
    sample = pd.read_csv(data_dir / "sample_submission.csv")
    advtrain.check_submission(pd.read_csv(out / "submission.csv"), sample["id"])  # every test id exactly once
    oof = pd.read_csv(out / "oof.csv")
    assert oof["id"].is_unique and len(oof) == 200
    log = (out / "train.log").read_text()
    assert log.count("epoch 1.00 |") == 1 and "batch 8 x 2 accumulation, 2 process(es)" in log


@pytest.mark.slow
@pytest.mark.parametrize("method", ["baseline", "fgm", "awp"])
def test_ddp_weights_match_one_process_with_the_same_global_batch(method, model_dirs, tmp_path):
    saved = tmp_path / "ddp.pt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "ddp_worker.py"), str(model_dirs["deberta-v2"]), method, str(saved)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    model, batch, labels = ddp_worker.model_and_batches(str(model_dirs["deberta-v2"]))
    ddp_worker.train(model, ddp_worker.ATTACKS[method](model), batch, labels)
    ddp_state = torch.load(saved)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_split_each_global_batch_so_one_and_two_gpus_see_the_same_batches():
    lengths = list(range(1, 104))
    single = list(advtrain.LengthGroupedBatches(lengths, 10, True, seed=3))
    shards = [list(advtrain.LengthGroupedBatches(lengths, 10, True, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 11
    for whole, a, b in zip(single, *shards):
        assert sorted(a + b) == sorted(whole) and not set(a) & set(b) and abs(len(a) - len(b)) <= 1
    tiny = [list(advtrain.LengthGroupedBatches([3], 10, False, rank=r, world_size=2)) for r in (0, 1)]
    assert tiny == [[[0]], [[0]]]  # a batch smaller than the world still gives every rank a row


def test_config_round_trips_through_the_command_line():
    cfg = advtrain.Config(method="awp", epochs=2, progress=False, lr=1e-4, sift_module="x.y")
    args = advtrain.build_parser().parse_args(["train", *advtrain.config_to_argv(cfg)])
    assert advtrain.config_from_args(args) == cfg
