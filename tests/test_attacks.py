"""Every attack behind the one interface: restoration, hooks, geometry, accumulation, AMP skips, gating,
SiFT against DeBERTa's formulas, the copy-paste promise, compile, learning."""
import contextlib
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import advtrain
from conftest import ATTACKS, TEXTS, base_config, without_dropout

METHODS = list(ATTACKS)


def make(method, model, **kw):
    return ATTACKS[method](model, **kw)


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


def record_layernorm_inputs(model, after_hooks=False):
    """The input of the embeddings' LayerNorm at every forward: as the embeddings produce it, or
    (after_hooks) as the LayerNorm receives it, after SiFT's pre-hook."""
    seen, ln = [], embedding_layernorm(model)
    if after_hooks:
        return seen, ln.register_forward_hook(lambda m, a, out: seen.append(a[0].detach().clone()))
    return seen, ln.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))


@pytest.mark.parametrize("method", METHODS)
def test_weights_restored_bitwise_and_no_hooks_left(method, tiny):
    model, _, batch, labels = tiny
    attack = make(method, model)
    before = snapshot(model)
    for _ in range(2):
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


def test_awp_failing_half_way_through_its_perturbation_restores_every_weight(tiny, monkeypatch):
    model, _, batch, labels = tiny
    attack, before = advtrain.AWP(model), snapshot(model)
    real_add, moved = torch.Tensor.add_, []

    def add_(self, *args, **kwargs):
        if isinstance(self, torch.nn.Parameter):
            moved.append(1)
            if len(moved) == 5:
                raise RuntimeError("out of memory")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "add_", add_)
    with pytest.raises(RuntimeError, match="out of memory"):
        step(attack, model, batch, labels)
    monkeypatch.undo()
    assert len(moved) == 5
    assert_bitwise_equal(model, before)
    no_hooks_left(model)


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb", "awp"])
def test_adversarial_loss_exceeds_clean_loss(method, tiny):
    model, _, batch, labels = tiny
    settings = {"fgm": dict(eps=5.0), "pgd": dict(eps=5.0, alpha=2.5), "freelb": dict(lr=2.5, init_mag=0.0),
                "awp": dict(adv_lr=1.0, adv_eps=0.05)}[method]
    losses = []
    step(make(method, model, **settings), model, batch, labels, losses=losses)
    assert losses[-1] > losses[0] + 1e-4, losses


@pytest.mark.parametrize("scope", ["example", "vocab"])
def test_fgm_perturbation_has_norm_eps_in_embedding_units(scope, tiny):
    model, _, batch, labels = tiny
    attack = advtrain.FGM(model, eps=0.7, scope=scope)
    unit = model.get_input_embeddings().weight.norm(dim=-1).mean().item()
    assert attack.scale == pytest.approx(unit) and advtrain.FGM(model, relative=False).scale == 1.0
    seen, handle = record_layernorm_inputs(model)
    step(attack, model, batch, labels)
    handle.remove()
    r = (seen[1] - seen[0]).float()
    if scope == "example":
        norms = r.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.7 * unit), rtol=1e-4, atol=1e-6)
    else:  # one shift per token id: the rows of the perturbed embedding matrix have norm eps together
        ids = batch["input_ids"].reshape(-1)
        rows = {}
        for i, vec in zip(ids.tolist(), r.reshape(-1, r.shape[-1])):
            if i in rows:
                torch.testing.assert_close(vec, rows[i], rtol=1e-4, atol=1e-6)
            rows[i] = vec
        total = torch.stack(list(rows.values())).norm()
        assert total.item() == pytest.approx(0.7 * unit, rel=1e-4)


class AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any operation creates while it is active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fgm_vocab_scope_touches_only_the_batchs_rows(tiny):
    model, _, batch, labels = tiny
    vocab, hidden = model.get_input_embeddings().weight.shape
    attack = advtrain.FGM(model, scope="vocab")
    attack._ids = batch["input_ids"]
    grad = torch.randn(*batch["input_ids"].shape, hidden)
    with AllocationRecorder() as rec:
        r = attack.perturbation(grad)
    assert rec.largest < vocab * hidden and rec.largest <= grad.numel()
    assert torch.isfinite(r).all() and r.abs().sum() > 0


def test_pgd_stays_in_its_ball(tiny):
    model, _, batch, labels = tiny
    seen, handle = record_layernorm_inputs(model)
    attack = advtrain.PGD(model, eps=5.0, alpha=4.0, steps=4)
    step(attack, model, batch, labels)
    handle.remove()
    assert len(seen) == 5
    radius = 5.0 * attack.scale
    norms = [(s - seen[0]).float().flatten(1).norm(dim=1) for s in seen[1:]]
    assert all((n <= radius * (1 + 1e-4)).all() for n in norms)
    assert torch.allclose(norms[-1], torch.full_like(norms[-1], radius), rtol=1e-3)  # 3 x 0.8 eps: on the sphere


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
    grads = {}
    step(attack, model, batch, labels)
    for n, p in model.named_parameters():
        grads[n] = p.grad is not None
    assert all(grads.values())  # every parameter still learns; only head.weight was moved


class KaggleAWP:
    """The AWP class of the Feedback Prize 2021 1st place and its FB3 copies, from its code: save, attack
    step (adv_lr * g / (||g|| + 1e-6) * ||w||, clamped into w0 +- adv_eps*|w0|), optimizer.zero_grad(),
    the adversarial backward, restore."""

    def __init__(self, model, optimizer, adv_lr, adv_eps, adv_param="weight"):
        self.model, self.optimizer, self.adv_lr, self.adv_eps, self.adv_param = model, optimizer, adv_lr, adv_eps, \
            adv_param
        self.backup, self.backup_eps = {}, {}

    def attack_backward(self, batch, labels):
        self._save()
        self._attack_step()
        adv_loss = F.cross_entropy(self.model(**batch), labels)
        self.optimizer.zero_grad()
        adv_loss.backward()
        self._restore()

    def _attack_step(self):
        e = 1e-6
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                norm1, norm2 = torch.norm(param.grad), torch.norm(param.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    param.data.add_(self.adv_lr * param.grad / (norm1 + e) * norm2)
                    param.data = torch.min(torch.max(param.data, self.backup_eps[name][0]), self.backup_eps[name][1])

    def _save(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad and param.grad is not None and self.adv_param in name:
                if name not in self.backup:
                    self.backup[name] = param.data.clone()
                    grad_eps = self.adv_eps * param.abs().detach()
                    self.backup_eps[name] = (self.backup[name] - grad_eps, self.backup[name] + grad_eps)

    def _restore(self):
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup, self.backup_eps = {}, {}


def test_awp_adversarial_objective_equals_the_kaggle_awp_over_several_steps(tiny):
    model, _, batch, labels = tiny
    ours = copy.deepcopy(model)
    theirs_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    kaggle = KaggleAWP(model, theirs_opt, adv_lr=0.5, adv_eps=0.01)
    attack = advtrain.AWP(ours, adv_lr=0.5, adv_eps=0.01, objective="adversarial")
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    batches = [(batch, labels), ({k: v.flip(0) for k, v in batch.items()}, labels.flip(0))] * 3
    for b, y in batches:
        F.cross_entropy(model(**b), y).backward()  # the script's clean backward, then AWP
        kaggle.attack_backward(b, y)
        theirs_opt.step()
        theirs_opt.zero_grad()
        step(attack, ours, b, y)
        ours_opt.step()
        ours_opt.zero_grad()
        F.cross_entropy(plain(**b), y).backward()
        plain_opt.step()
        plain_opt.zero_grad()
    moved = max((a - c).abs().max().item() for a, c in zip(model.parameters(), plain.parameters()))
    apart = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ours.parameters()))
    assert moved > 1e-4  # the attack changes training: the comparison can fail
    assert apart < 1e-6 < moved / 100


def test_awp_sum_objective_keeps_the_clean_gradient_and_adversarial_does_not(tiny):
    model, _, batch, labels = tiny
    clean = copy.deepcopy(model)
    F.cross_entropy(clean(**batch), labels).backward()
    grads = {}
    for objective in ("adversarial", "sum"):
        m = copy.deepcopy(model)
        step(advtrain.AWP(m, objective=objective), m, batch, labels)
        grads[objective] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for (n, p), c in zip(model.named_parameters(), clean.parameters()):
        torch.testing.assert_close(grads["sum"][n], grads["adversarial"][n] + c.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["adversarial", "sum"])
def test_awp_keeps_the_earlier_micro_batchs_gradient_under_accumulation(objective, tiny):
    model, _, batch, labels = tiny
    first = ({k: v.flip(0) for k, v in batch.items()}, labels.flip(0))
    earlier, alone = copy.deepcopy(model), copy.deepcopy(model)
    step(advtrain.Baseline(earlier), earlier, *first, accum=2)
    step(advtrain.AWP(alone, objective=objective), alone, batch, labels, accum=2)
    step(advtrain.Baseline(model), model, *first, accum=2)
    step(advtrain.AWP(model, objective=objective), model, batch, labels, accum=2)
    for (n, p), e, a in zip(model.named_parameters(), earlier.parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, e.grad + a.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_awp_adversarial_objective_never_lets_a_non_finite_clean_gradient_into_grad(tiny):
    model, _, batch, labels = tiny
    attack = advtrain.AWP(model, objective="adversarial")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    step(attack, model, batch, labels, scaler=scaler, inject=(1, math.inf))
    assert int(attack.skipped) == 1  # unperturbed: the step trains on the (finite) second pass alone
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_awp_refuses_an_unknown_objective(tiny):
    with pytest.raises(ValueError, match="'adversarial' or 'sum'"):
        advtrain.AWP(tiny[0], objective="min-max")


# --- SiFT as DeBERTa's sift.py defines it ------------------------------------------------------

def deberta_symmetric_kl(logits, target):
    """DeBERTa/sift/sift.py's symmetric_kl, from its formulas: two cross entropies, probabilities detached."""
    logprob_stu, logprob_tea = F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1)
    prob_tea, prob_stu = logprob_tea.exp().detach(), logprob_stu.exp().detach()
    return (prob_tea * -logprob_stu).sum(-1) + (prob_stu * -logprob_tea).sum(-1)


def deberta_sift_step(model, batch, labels, alpha, init, lr, seed):
    """A training step as DeBERTa runs it (hook_sift_layer + AdversarialLearner.loss, parameters frozen
    during the ascent): the parameters' gradients of task loss + alpha * adversarial loss."""
    state = {"adversarial": False}

    def layer(module, args):
        x = args[0]
        if not state["adversarial"]:
            state["input"] = F.layer_norm(x, x.shape[-1:], eps=1e-7)
            return (state["input"],) + args[1:]
        return ((state["input"].detach() + state["delta"]).to(x),) + args[1:]

    handle = embedding_layernorm(model).register_forward_pre_hook(layer)
    model.zero_grad(set_to_none=True)
    logits = model(**batch)
    loss = F.cross_entropy(logits, labels)
    for p in model.parameters():
        p.requires_grad_(False)
    state["adversarial"] = True
    torch.manual_seed(seed)
    delta = torch.clamp(torch.randn_like(state["input"]).float() * init, -2 * init, 2 * init)
    state["delta"] = delta.requires_grad_(True)
    deberta_symmetric_kl(model(**batch), logits.detach()).sum().backward()
    grad = state["delta"].grad
    state["delta"] = (delta + lr * grad / (1e-6 + grad.abs().max(-1, keepdim=True)[0])).detach()
    for p in model.parameters():
        p.requires_grad_(True)
    adv_loss = deberta_symmetric_kl(model(**batch), logits).mean()
    (loss + alpha * adv_loss).backward()
    handle.remove()
    state["adversarial"] = False
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sift_gradients_equal_debertas(tiny):
    model, _, batch, labels = tiny
    # DeBERTa's defaults, and a larger step so that the ascent matters at the tiny model's scale.
    for init, lr in ((1e-2, 1e-4), (1e-1, 1e-1)):
        expected = deberta_sift_step(model, batch, labels, alpha=3.0, init=init, lr=lr, seed=7)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        step(advtrain.SiFT(model, alpha=3.0, init=init, lr=lr), model, batch, labels)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-7, msg=n)
        model.zero_grad(set_to_none=True)


def test_sift_reports_the_symmetric_kl_itself():
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    p, q = F.softmax(b, -1), F.softmax(a, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(advtrain.SiFT.symmetric_kl(a, b), by_hand)
    assert advtrain.SiFT.symmetric_kl(a, a).abs().max() == 0
    # the same gradient as DeBERTa's cross-entropy form, whose value also holds both entropies
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    advtrain.SiFT.symmetric_kl(x, y).sum().backward()
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    deberta_symmetric_kl(x2, y2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad) and torch.testing.assert_close(y.grad, y2.grad)


def test_sift_last_kl_is_zero_without_perturbation(tiny):
    model, _, batch, labels = tiny
    attack = advtrain.SiFT(model, init=0.0, lr=0.0)
    step(attack, model, batch, labels)
    assert attack.last_kl.item() == 0.0
    attack = advtrain.SiFT(model, init=1e-1)
    step(attack, model, batch, labels)
    assert 0 < attack.last_kl.item() < 1


def sift_delta(model, batch, labels, **kw):
    """The perturbation SiFT's last pass adds to the normalised embeddings."""
    seen, handle = record_layernorm_inputs(model, after_hooks=True)
    torch.manual_seed(3)
    step(advtrain.SiFT(model, init=1e-2, lr=1e-2), model, batch, labels, **kw)
    handle.remove()
    model.zero_grad(set_to_none=True)
    return (seen[2] - seen[0]).float()


def test_sift_step_ignores_accumulation_and_loss_scale(tiny):
    model, _, batch, labels = tiny
    plain = sift_delta(model, batch, labels)
    torch.testing.assert_close(sift_delta(model, batch, labels, accum=4), plain, rtol=1e-5, atol=1e-9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    torch.testing.assert_close(sift_delta(model, batch, labels, scaler=scaler), plain, rtol=1e-4, atol=1e-9)


def test_sift_refuses_a_single_logit_head_and_unknown_models(model_dirs):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=1)
    batch = {"input_ids": torch.tensor([[2, 5, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="at least 2 logits"):
        advtrain.SiFT(model).backward(lambda: model(**batch), lambda out: out.sum())
    no_hooks_left(model)
    with pytest.raises(ValueError, match="pass module="):
        advtrain.SiFT(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- accumulation, fp16 skips, errors -------------------------------------------------------------

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


@pytest.mark.parametrize("method,call", [("fgm", 1), ("pgd", 1), ("freelb", 1), ("freelb", 2), ("awp", 1),
                                         ("sift", 1), ("sift", 2)])
def test_non_finite_gradient_under_grad_scaler_skips_the_attack(method, call, tiny):
    """call: the forward whose output is corrupted: 1 the clean pass, 2 the first adversarial one."""
    model, _, batch, labels = tiny
    attack, before = make(method, model), snapshot(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    seen, handle = record_layernorm_inputs(model, after_hooks=True)
    step(attack, model, batch, labels, scaler=scaler, inject=(call, math.inf))
    handle.remove()
    assert int(attack.skipped) == 1
    if method in ("freelb", "sift"):  # skipped means no perturbation at all, not the initial noise
        assert torch.equal(seen[-1], seen[0])
    assert_bitwise_equal(model, before)
    no_hooks_left(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    advtrain.optimizer_step(model, optimizer, advtrain.build_scheduler(optimizer, "constant", 0, 1), scaler, 1.0)
    if (method, call) == ("sift", 2):  # its ascent pass feeds no parameter gradient: the optimizer step goes ahead
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert not torch.equal(model.head.weight, before["head.weight"])
    else:  # a non-finite gradient reached the parameters: GradScaler skips the optimizer step
        assert_bitwise_equal(model, before)
    step(attack, model, batch, labels, scaler=scaler)
    assert int(attack.skipped) == 1


class NoEmbeddingCall(torch.nn.Module):
    """A model whose forward never calls its input-embedding module (as when fed inputs_embeds)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)
        self.config = type("Config", (), {"pad_token_id": 0})()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        return self.lin(torch.ones(len(input_ids), 4))


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_embedding_attacks_explain_what_is_wrong_with_the_model(method):
    model, ids = NoEmbeddingCall(), torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(RuntimeError, match="never used model.get_input_embeddings"):
        make(method, model).backward(lambda: model(ids), lambda out: F.cross_entropy(out, torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="neither Linear nor any of its submodules defines it .0 do.; add "
                                         "get_input_embeddings"):
        make(method, torch.nn.Linear(2, 2))


# --- the copy-paste promise ----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_each_attack_class_runs_pasted_alone_with_only_torch(method, tiny):
    model, _, batch, labels = tiny
    source = inspect.getsource(ATTACKS[method])
    assert "torch._" not in source and "advtrain" not in source
    scope = {"torch": torch, "F": F, "contextlib": contextlib, "__name__": "notebook"}
    exec(compile(source, f"<{method} pasted>", "exec"), scope)
    pasted, before = scope[ATTACKS[method].__name__](model), snapshot(model)
    loss = step(pasted, model, batch, labels)
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    assert_bitwise_equal(model, before)


def test_helpers_repeated_in_the_attack_classes_are_the_same_text():
    classes = [advtrain.Baseline, *ATTACKS.values()]
    for helper in ("_no_sync", "_scaled", "_norm", "_embedding_owner", "_refuse_reentrant_checkpointing",
                   "_count_skip", "_check_sizes"):
        texts = {inspect.getsource(vars(c)[helper] if not isinstance(vars(c)[helper], staticmethod)
                                   else vars(c)[helper].__func__) for c in classes if helper in vars(c)}
        assert len(texts) == 1, helper
    assert sum("_scaled" in vars(c) for c in classes) == len(classes)
    assert all("_check_sizes" in vars(c) for c in ATTACKS.values())


# --- when the attack runs ------------------------------------------------------------------------

def gate(**kw):
    return advtrain.AttackGate(advtrain.Config(**{"method": "fgm", **kw}), steps_per_epoch=10, warmup_steps=3)


def test_gate_by_epoch_warmup_and_threshold():
    g = gate(adv_start="1.5")
    assert not g.on(14) and g.on(15)
    g = gate()  # the default: from the end of the warm-up
    assert not g.on(2) and g.on(3)
    g = gate(adv_start="0", adv_threshold=0.8)
    assert not g.on(20)
    g.observe(0.79, 5)
    assert not g.on(20)
    g.observe(0.8, 6)
    assert g.on(20)
    assert not advtrain.AttackGate(advtrain.Config(method="baseline", adv_start="0"), 10, 0).on(50)


def test_gate_auto_switches_on_at_the_first_evaluation_without_improvement():
    g = gate(adv_start="auto")
    curve = [(5, 0.60), (10, 0.70), (15, 0.74), (20, 0.73), (25, 0.80)]
    on = []
    for i, (after, f1) in enumerate(curve):
        on.append([g.on(s) for s in range(curve[i - 1][0] if i else 0, after)])
        g.observe(f1, after)
    assert not any(sum(on[:4], [])) and all(on[4])  # plateau after step 20: on from step 20
    assert g.start == 20 and g.on(20) and not gate(adv_start="auto").on(1000)


@pytest.mark.parametrize("bad", ["soon", "-1", "nan", "inf"])
def test_adv_start_must_be_a_setting_it_knows(bad):
    with pytest.raises(advtrain.UserError, match="adv_start"):
        advtrain.Config(adv_start=bad)


def test_gating_switches_on_at_the_right_step(data_dir, model_dirs, tmp_path, monkeypatch):
    steps = []
    real_step = advtrain.optimizer_step
    monkeypatch.setattr(advtrain, "optimizer_step", lambda *a: (steps.append(1), real_step(*a)))
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "gate", method="fgm", epochs=2,
                                       adv_start="0.5", batch_size=16, grad_accum=2, eval_every=1.0))
    per_epoch = math.ceil(math.ceil(metrics["data"]["train"] / 16) / 2)
    assert len(steps) == 2 * per_epoch  # one optimizer step per accumulated step, attacks included
    first = math.ceil(0.5 * per_epoch)
    assert metrics["adv_started_at"] == [{"epoch": round(first / per_epoch, 4), "step": first}]
    assert [e["adv_steps"] for e in metrics["evaluations"]] == [per_epoch - first, 2 * per_epoch - first]
    assert "adversarial training (fgm) on from epoch" in (tmp_path / "gate" / "train.log").read_text()


# --- compile ---------------------------------------------------------------------------------------

class Stack(torch.nn.Module):
    """Two identical blocks the compiler would take, and a forward that fails on a chosen call."""

    def __init__(self, fail_on, error):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        self.calls, self.fail_on, self.error = 0, fail_on, error

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.error
        return x * 2


@pytest.mark.parametrize("fail_on", [1, 3])
def test_compile_fallback_only_catches_compiler_errors_of_the_first_call(fail_on):
    model = Stack(fail_on, RuntimeError("CUDA out of memory"))
    call = advtrain.compile_blocks(model, True)
    assert advtrain.repeated_blocks(model) is model.layers
    with pytest.raises(RuntimeError, match="out of memory"):
        for _ in range(3):
            call(x=torch.ones(1))


@pytest.mark.slow
def test_compiled_layers_see_attacks_that_start_after_the_first_step(model_dirs):
    """What --compile does (each transformer layer compiled in place): plain steps first, then every
    attack switched on; gradients as in eager mode."""
    try:
        torch.compile(lambda x: x + 1)(torch.ones(1))
    except Exception as e:  # noqa: BLE001 - no working compiler toolchain here
        pytest.skip(f"torch.compile unavailable: {e}")
    torch.manual_seed(0)
    eager = without_dropout(advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), dropout=0.0))
    compiled = copy.deepcopy(eager)
    forward = advtrain.compile_blocks(compiled, True)
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, y) for x, y in
                                                          zip(advtrain.tokenize(tok, TEXTS, 64), [1, 0, 1, 0])])
    for method in ["baseline"] + METHODS:
        grads = []
        for model, run_model in ((eager, eager), (compiled, forward)):
            attack = advtrain.Baseline() if method == "baseline" else make(method, model)
            torch.manual_seed(5)
            loss = attack.backward(lambda: run_model(**batch), lambda out: F.cross_entropy(out, labels))
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
            assert torch.isfinite(loss) and int(attack.skipped) == 0
        for g_eager, g_compiled in zip(*grads):
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-5, msg=method)
    no_hooks_left(compiled)


# --- learning, and other encoders ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_through_the_cli(method, data_dir, model_dirs, tmp_path):
    out = tmp_path / method
    code = advtrain.main(["train", "--method", method, "--model", str(model_dirs["deberta-v2"]), "--data-dir",
                          str(data_dir), "--output-dir", str(out), "--epochs", "2", "--batch-size", "16", "--lr",
                          "2e-3", "--holdout-size", "100", "--valid-size", "100", "--adv-start", "0", "--device",
                          "cpu", "--no-progress", "--no-save-model"])
    assert code == 0
    metrics = advtrain.json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["method"] == method and metrics["evaluations"][0]["adv_steps"] > 0
    assert metrics["score"]["argmax"]["accuracy"] > 0.8 and metrics["attack_seen"]
    assert metrics["attack_skips"] == 0


@pytest.mark.parametrize("arch", ["roberta", "electra"])
def test_other_encoders_work_with_every_attack(arch, data_dir, tmp_path):
    texts = advtrain.pd.read_csv(data_dir / "train.csv")["text"]
    folder = advtrain.make_tiny_model(tmp_path / arch, arch, texts)
    model = without_dropout(advtrain.Classifier.from_pretrained(str(folder)))
    tok = advtrain.load_tokenizer(str(folder))
    ids = advtrain.tokenize(tok, TEXTS[:2], 32)
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, y) for x, y in zip(ids, [1, 0])])
    before = snapshot(model)
    for method in METHODS:
        losses = []
        step(make(method, model), model, batch, labels, losses=losses)
        assert all(math.isfinite(v) for v in losses)
        model.zero_grad(set_to_none=True)
    assert_bitwise_equal(model, before)
    no_hooks_left(model)
