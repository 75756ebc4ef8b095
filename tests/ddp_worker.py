"""Run by torchrun in test_distributed.py: a few DDP steps on fixed batches, rank 0 saves the weights.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py MODEL_DIR METHOD OUT.pt
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import advtrain  # noqa: E402

ATTACKS = {"baseline": lambda m: advtrain.Baseline(m), "fgm": lambda m: advtrain.FGM(m, eps=0.1),
           "awp": lambda m: advtrain.AWP(m, adv_lr=1.0, adv_eps=0.01)}
TEXTS = ["Forest fire near La Ronge", "I love pizza on Friday lol", "Flood hits Tokyo, 40 evacuated",
         "This album is fire", "Earthquake in Nepal", "Tacos tonight", "Tornado warning Ohio", "New phone"]


def model_and_batches(model_dir):
    torch.manual_seed(0)
    model = advtrain.Classifier.from_pretrained(model_dir, dropout=0.0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tok = advtrain.load_tokenizer(model_dir)
    ids = advtrain.tokenize(tok, TEXTS, 32)
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, i % 2) for i, x in enumerate(ids)])
    return model, batch, labels


def train(model, attack, batch, labels, steps=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = advtrain.build_scheduler(optimizer, "constant", 0, 1)
    for _ in range(steps):
        advtrain.micro_step(attack, model, batch, labels, torch.device("cpu"), None, None)
        advtrain.optimizer_step(getattr(model, "module", model), optimizer, scheduler, None, 1.0)


if __name__ == "__main__":
    model_dir, method, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batch, labels = model_and_batches(model_dir)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = len(labels) // world
    mine = slice(rank * half, (rank + 1) * half)
    train(ddp, ATTACKS[method](ddp), {k: v[mine] for k, v in batch.items()}, labels[mine])
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()
