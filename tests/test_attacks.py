"""Every attack behind the one interface: restoration, hooks, geometry, accumulation, AMP skips, gating, learning."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import advtrain
from conftest import base_config

METHODS = ["fgm", "pgd", "freelb", "awp", "sift"]


def make(method, model, **kw):
    cls = {"fgm": advtrain.FGM, "pgd": advtrain.PGD, "freelb": advtrain.FreeLB, "awp": advtrain.AWP,
           "sift": advtrain.SiFT}[method]
    return cls(model, **kw)


def step(attack, model, batch, labels, scaler=None, accum=1, outputs=None, losses=None, inject=None):
    """One attack.backward; records every forward output and loss; inject=(call, factor) corrupts one forward."""
    calls = []

    def forward():
        out = model(**batch)
        calls.append(out)
        if inject and len(calls) == inject[0]:
            out = out * inject[1]
        if outputs is not None:
            outputs.append(out.detach().clone())
        return out

    def loss_fn(out):
        loss = F.cross_entropy(out, labels)
        if losses is not None:
            losses.append(loss.item())
        return loss

    return attack.backward(forward, loss_fn, scaler=scaler, accumulation_steps=accum)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def no_hooks_left(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__
    for p in model.parameters():
        assert not p._backward_hooks and p.requires_grad


def embedding_layernorm(model):
    return [m for n, m in model.named_modules() if n.endswith("embeddings.LayerNorm")][0]


def record_layernorm_inputs(model):
    seen = []
    handle = embedding_layernorm(model).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize("method", METHODS)
def test_weights_restored_bitwise_and_no_hooks_left(method, tiny, arch):
    model, _, batch, labels = tiny
    attack = make(method, model)
    before = snapshot(model)
    for _ in range(200 if arch == "deberta-v2" else 1):
        step(attack, model, batch, labels)
        model.zero_grad(set_to_none=True)
    assert_bitwise_equal(model, before)
    no_hooks_left(model)
    assert int(attack.skipped) == 0


@pytest.mark.parametrize("method", METHODS)
def test_exception_mid_attack_restores_everything(method, tiny):
    model, _, batch, labels = tiny
    attack, before = make(method, model), snapshot(model)
    calls = []

    def forward():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return model(**batch)

    with pytest.raises(RuntimeError, match="boom"):
        attack.backward(forward, lambda out: F.cross_entropy(out, labels))
    assert_bitwise_equal(model, before)
    no_hooks_left(model)


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb", "awp"])
def test_adversarial_loss_exceeds_clean_loss(method, tiny):
    model, _, batch, labels = tiny
    settings = {"fgm": dict(eps=1.0), "pgd": dict(eps=1.0, alpha=0.5), "freelb": dict(lr=0.5, init_mag=0.0),
                "awp": dict(adv_lr=1.0, adv_eps=0.05)}[method]
    losses = []
    step(make(method, model, **settings), model, batch, labels, losses=losses)
    assert losses[-1] > losses[0] + 1e-4, losses


@pytest.mark.parametrize("scope", ["example", "vocab"])
def test_fgm_perturbation_has_norm_eps(scope, tiny):
    model, _, batch, labels = tiny
    seen, handle = record_layernorm_inputs(model)
    step(advtrain.FGM(model, eps=0.7, scope=scope), model, batch, labels)
    handle.remove()
    r = (seen[1] - seen[0]).float()
    if scope == "example":
        norms = r.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.7), rtol=1e-4, atol=1e-5)
    else:  # one shift per token id: the rows of the perturbed embedding matrix have norm eps together
        ids = batch["input_ids"].reshape(-1)
        rows = {}
        for i, vec in zip(ids.tolist(), r.reshape(-1, r.shape[-1])):
            if i in rows:
                torch.testing.assert_close(vec, rows[i], rtol=1e-4, atol=1e-6)
            rows[i] = vec
        total = torch.stack(list(rows.values())).norm()
        assert total.item() == pytest.approx(0.7, rel=1e-4)


def test_pgd_stays_in_its_ball(tiny):
    model, _, batch, labels = tiny
    seen, handle = record_layernorm_inputs(model)
    step(advtrain.PGD(model, eps=0.5, alpha=0.4, steps=4), model, batch, labels)
    handle.remove()
    assert len(seen) == 5
    norms = [(s - seen[0]).float().flatten(1).norm(dim=1) for s in seen[1:]]
    assert all((n <= 0.5 + 1e-4).all() for n in norms)
    assert torch.allclose(norms[-1], torch.full_like(norms[-1], 0.5), rtol=1e-3)  # 3 x 0.4 > 0.5: on the sphere


def test_awp_weights_stay_within_eps_of_their_magnitude(tiny):
    model, _, batch, labels = tiny
    target = model.head
    w0, seen = target.weight.detach().clone(), []
    handle = target.register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    step(advtrain.AWP(model, adv_lr=10.0, adv_eps=0.03), model, batch, labels)
    handle.remove()
    moved = seen[1] - w0
    assert (moved.abs() <= 0.03 * w0.abs() * (1 + 1e-5) + 1e-12).all()
    assert moved.abs().max() > 0.5 * 0.03 * w0.abs().max()
    assert torch.equal(target.weight, w0)


def test_awp_only_touches_the_chosen_parameters(tiny):
    model, _, batch, labels = tiny
    attack = advtrain.AWP(model, param_filter="head.weight")
    assert attack.params == [model.head.weight]


def test_sift_consistency_is_nonnegative_and_zero_without_perturbation(tiny):
    model, _, batch, labels = tiny
    a, b = torch.randn(6, 2), torch.randn(6, 2)
    assert advtrain.SiFT.symmetric_kl(a, b) > 0 and advtrain.SiFT.symmetric_kl(a, a) == 0

    seen = []

    class Recording(advtrain.SiFT):
        @staticmethod
        def symmetric_kl(x, y):
            value = advtrain.SiFT.symmetric_kl(x, y)
            seen.append(value.item())
            return value

    step(Recording(model, init=0.0, lr=0.0), model, batch, labels)
    assert seen == [0.0, 0.0]
    step(Recording(model, init=1e-1), model, batch, labels)
    assert seen[2] > 0 and seen[3] > 0


def test_sift_refuses_a_single_logit_head_and_unknown_models(model_dirs):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=1)
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="at least 2 logits"):
        advtrain.SiFT(model).backward(lambda: model(**batch), lambda out: out.sum())
    no_hooks_left(model)
    with pytest.raises(ValueError, match="pass module="):
        advtrain.SiFT(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("method", METHODS)
def test_accumulation_uses_the_current_micro_batch_only(method, tiny):
    model, _, batch, labels = tiny
    other = {k: v.flip(0) for k, v in batch.items()}
    fresh = copy.deepcopy(model)
    with_history, alone = [], []
    torch.manual_seed(1)
    step(make(method, model), model, other, labels.flip(0), accum=2)  # an earlier micro-batch's gradients
    torch.manual_seed(2)
    step(make(method, model), model, batch, labels, accum=2, outputs=with_history)
    torch.manual_seed(2)
    step(make(method, fresh), fresh, batch, labels, accum=2, outputs=alone)
    assert len(with_history) == len(alone) > 1
    for a, b in zip(with_history, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_gradient_under_grad_scaler_skips_the_attack(method, tiny):
    model, _, batch, labels = tiny
    attack, before = make(method, model), snapshot(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    # The pass whose gradient sets the direction: the clean one, except for FreeLB and SiFT.
    call = 2 if method in ("freelb", "sift") else 1
    step(attack, model, batch, labels, scaler=scaler, inject=(call, math.inf))
    assert int(attack.skipped) == 1
    assert_bitwise_equal(model, before)
    no_hooks_left(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    advtrain.optimizer_step(model, optimizer, advtrain.build_scheduler(optimizer, "constant", 0, 1), scaler, 1.0)
    if method == "sift":  # its ascent pass feeds no parameter gradient: the optimizer step goes ahead
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert not torch.equal(model.head.weight, before["head.weight"])
    else:  # the corrupted pass fed the parameters' gradients: GradScaler skips the optimizer step
        assert_bitwise_equal(model, before)
    step(attack, model, batch, labels, scaler=scaler)
    assert int(attack.skipped) == 1


@pytest.mark.parametrize("method", METHODS)
def test_attack_leaves_the_optimizer_state_alone(method, tiny):
    model, _, batch, labels = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step(advtrain.Baseline(), model, batch, labels)
    optimizer.step()
    optimizer.zero_grad()
    state = copy.deepcopy(optimizer.state_dict())
    step(make(method, model), model, batch, labels)
    after = optimizer.state_dict()
    for k, v in state["state"].items():
        for name, t in v.items():
            assert torch.equal(t, after["state"][k][name])


def test_gate_by_epoch_and_by_threshold():
    cfg = advtrain.Config(method="awp", adv_start=1.5)
    assert not advtrain.adversarial_gate(cfg, 1.49, None) and advtrain.adversarial_gate(cfg, 1.5, None)
    cfg = advtrain.Config(method="fgm", adv_start=0.0, adv_threshold=0.8)
    assert not advtrain.adversarial_gate(cfg, 2.0, None) and not advtrain.adversarial_gate(cfg, 2.0, 0.79)
    assert advtrain.adversarial_gate(cfg, 2.0, 0.8)
    assert not advtrain.adversarial_gate(advtrain.Config(method="baseline", adv_start=0.0), 5.0, 1.0)


def test_gating_switches_on_at_the_right_step(data_dir, model_dirs, tmp_path, monkeypatch):
    steps = []
    real_step = advtrain.optimizer_step
    monkeypatch.setattr(advtrain, "optimizer_step", lambda *a: (steps.append(1), real_step(*a)))
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "gate", method="fgm", epochs=2,
                                       adv_start=0.5, batch_size=16, grad_accum=2))
    per_epoch = math.ceil(math.ceil(metrics["data"]["train"] / 16) / 2)
    assert len(steps) == 2 * per_epoch  # one optimizer step per accumulated step, attacks included
    first = math.ceil(0.5 * per_epoch)
    assert metrics["adv_started_at"] == {"epoch": round(first / per_epoch, 4), "step": first}
    assert [e["adv_steps"] for e in metrics["epochs"]] == [per_epoch - first, per_epoch]
    assert "adversarial training (fgm) on from epoch" in (tmp_path / "gate" / "train.log").read_text()

    gated = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "thr", method="fgm", epochs=2,
                                     adv_threshold=0.5))
    assert gated["adv_started_at"]["epoch"] == 1.0 and gated["epochs"][0]["adv_steps"] == 0
    never = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "never", method="fgm", epochs=1,
                                     adv_threshold=1.1))
    assert never["adv_started_at"] is None


# The tiny model's embeddings are ~0.1 per token: input-space radii scaled to match.
TINY_SETTINGS = {"fgm": ["--fgm-eps", "0.1"], "pgd": ["--pgd-eps", "0.1", "--pgd-alpha", "0.03"],
                 "freelb": ["--freelb-lr", "0.01", "--freelb-init", "0.01"], "awp": [], "sift": []}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_through_the_cli(method, data_dir, model_dirs, tmp_path):
    out = tmp_path / method
    code = advtrain.main(["train", "--method", method, "--model", str(model_dirs["deberta-v2"]), "--data-dir",
                          str(data_dir), "--output-dir", str(out), "--epochs", "2", "--batch-size", "16", "--lr",
                          "2e-3", "--holdout-size", "100", "--valid-size", "100", "--adv-start", "0", "--device",
                          "cpu", "--no-progress", "--no-save-model"] + TINY_SETTINGS[method])
    assert code == 0
    metrics = advtrain.json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and metrics["epochs"][0]["adv_steps"] > 0
    assert metrics["holdout"]["accuracy"] > 0.8
    assert metrics["attack_skips"] == 0


@pytest.mark.parametrize("arch", ["roberta", "electra"])
def test_other_encoders_work_with_every_attack(arch, data_dir, tmp_path):
    texts = advtrain.pd.read_csv(data_dir / "train.csv")["text"]
    folder = advtrain.make_tiny_model(tmp_path / arch, arch, texts)
    model = advtrain.Classifier.from_pretrained(str(folder))
    tok = advtrain.load_tokenizer(str(folder))
    ids = advtrain.tokenize(tok, ["Forest fire near La Ronge", "pizza tonight"], 32)
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, y) for x, y in zip(ids, [1, 0])])
    before = snapshot(model)
    for method in METHODS:
        losses = []
        step(make(method, model), model, batch, labels, losses=losses)
        assert all(math.isfinite(v) for v in losses)
        model.zero_grad(set_to_none=True)
    assert_bitwise_equal(model, before)
    no_hooks_left(model)
