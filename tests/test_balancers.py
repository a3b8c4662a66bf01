"""Gradient-combination methods against by-hand computations, torchjd, and the tiny model."""
import copy
import dataclasses
import io
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import PARAMS, micro_overrides
from pipeline.balancers import (
    REGISTRY,
    GradNormBalancer,
    JacobianBalancer,
    PCGradBalancer,
    SumBalancer,
    conflict_share,
    gramian,
    make_balancer,
    pcgrad,
)
from pipeline.config import load_config
from pipeline.data import collate, load_split, tokenizer_info
from pipeline.errors import ConfigError
from pipeline.model import build_model
from pipeline.train import train

TASKS = ["sst", "para", "sts"]
TORCHJD = [n for n, f in REGISTRY.items() if not isinstance(f, type)]


# ---------------------------------------------------------------- helpers


def project_by_hand(g: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """Yu et al. (2020), Alg. 1: g <- g - (g.h / |h|^2) h for each h it conflicts with, in the given order."""
    g = g.clone()
    for h in others:
        dot = float(g @ h)
        if dot < 0:
            g = g - dot / float(h @ h) * h
    return g


def pcgrad_by_hand(G: torch.Tensor, orders) -> torch.Tensor:
    return sum(project_by_hand(G[i], [G[j] for j in orders[i]]) for i in range(len(G)))


def all_orders(T: int):
    per_task = [list(itertools.permutations([j for j in range(T) if j != i])) for i in range(T)]
    return [[list(o) for o in combo] for combo in itertools.product(*per_task)]


def conflicting(T: int, D: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, D, generator=gen, dtype=torch.float64)
    G[1] = -0.7 * G[0] + 0.5 * G[1]  # make sure at least one pair conflicts
    return G


def save_load(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as the checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def flat_grads(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def ref_grads(loss, params) -> torch.Tensor:
    """An independent autograd computation, flattened (zeros where a parameter is unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


# ---------------------------------------------------------------- tiny model fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: threads only contend on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_backbone, micro_data, prepared):
    """Config, a float64 model without dropout (deterministic losses), and a few batches per task."""
    tmp = tmp_path_factory.mktemp("balancers")
    cfg = load_config(PARAMS, profile="cpu", overrides=micro_overrides(tmp, tiny_backbone, micro_data, prepared)
                      + ["model.dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, TASKS).double().eval()
    pad_id = tokenizer_info(prepared)["pad_id"]
    batches = {t: [collate(load_split(prepared, t, "train"), np.arange(4 * k, 4 * k + 4), pad_id) for k in range(3)]
               for t in TASKS}
    return cfg, model, batches


def losses_of(model, batches, k: int = 0) -> dict:
    return {t: model.loss(t, batches[t][k]) for t in TASKS}


# ---------------------------------------------------------------- PCGrad


@pytest.mark.parametrize("orders", all_orders(3))
def test_pcgrad_equals_by_hand_projection(orders):
    G = conflicting(3, 7, seed=1)
    G[2] = -0.4 * G[1] + 0.3 * G[2]
    result, gram = pcgrad(G, orders)
    assert conflict_share(gram) > 0
    torch.testing.assert_close(result, pcgrad_by_hand(G, orders), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(result, G.sum(0))  # the case really projects


def test_pcgrad_order_matters_in_general():
    G = conflicting(3, 7, seed=1)
    G[2] = -0.4 * G[1] + 0.3 * G[2]
    results = torch.stack([pcgrad(G, o)[0] for o in all_orders(3)])
    assert (results - results[0]).abs().max() > 1e-6


def test_pcgrad_without_conflict_is_the_plain_sum():
    G = torch.rand(3, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # positive: no conflicts
    result, gram = pcgrad(G, [[1, 2], [0, 2], [0, 1]])
    assert conflict_share(gram) == 0
    torch.testing.assert_close(result, G.sum(0), rtol=1e-12, atol=0)


def test_pcgrad_reduction_is_a_sum_not_a_mean():
    g = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = torch.stack([g, 2 * g, 0.5 * g])
    result, _ = pcgrad(G, [[1, 2], [2, 0], [0, 1]])
    torch.testing.assert_close(result, G.sum(0), rtol=1e-12, atol=0)
    assert not torch.allclose(result, G.mean(0))


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_agrees_with_torchjd_two_tasks(seed):
    from torchjd.aggregation import PCGrad

    G = conflicting(2, 40, seed)
    ours, gram = pcgrad(G, [[1], [0]])
    assert conflict_share(gram) == 1
    torch.testing.assert_close(ours, PCGrad()(G), rtol=1e-10, atol=1e-12)


def test_pcgrad_agrees_with_torchjd_when_order_does_not_matter():
    """g3 is orthogonal to span(g1, g2): every projection order gives the same update."""
    from torchjd.aggregation import PCGrad

    G = conflicting(3, 40, seed=5)
    basis, _ = torch.linalg.qr(G[:2].T)
    G[2] = G[2] - basis @ (basis.T @ G[2])
    results = [pcgrad(G, o)[0] for o in all_orders(3)]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-10, atol=1e-12)
    for seed in range(3):
        torch.manual_seed(seed)
        torch.testing.assert_close(PCGrad()(G), results[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pcgrad_torchjd_result_is_one_of_ours_for_some_order(seed):
    from torchjd.aggregation import PCGrad

    G = conflicting(3, 30, seed)
    G[2] = -0.5 * G[1] + 0.4 * G[2]
    torch.manual_seed(seed)
    theirs = PCGrad()(G)
    distance = min(float((pcgrad(G, o)[0] - theirs).abs().max()) for o in all_orders(3))
    assert distance < 1e-10


def test_gramian_keeps_float32_inner_products_accurate():
    """A single float32 GEMM over 2M entries errs by ~1e-4 of the norms: enough to flip a small conflict."""
    G = torch.randn(3, 1 << 21, generator=torch.Generator().manual_seed(0))
    exact = G.double() @ G.double().T
    assert float((gramian(G) - exact).abs().max() / exact.diag().max()) < 1e-6
    odd = torch.randn(3, 4096 * 3 + 17, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(gramian(odd), odd @ odd.T, rtol=1e-12, atol=1e-12)  # blocks plus a remainder


def test_pcgrad_on_tiny_model_heads_keep_own_gradient(tiny):
    cfg, model, batches = tiny
    model = copy.deepcopy(model)
    shared = model.shared_parameters()
    losses = losses_of(model, batches)
    per_task = torch.stack([ref_grads(losses[t], shared) for t in TASKS])
    heads = {t: list(model.heads[t].parameters()) for t in TASKS}
    head_ref = {t: ref_grads(losses[t], heads[t]) for t in TASKS}

    orders = [[2, 1], [0, 2], [1, 0]]
    balancer = PCGradBalancer(model, TASKS, cfg.train)
    balancer.draw_orders = lambda: orders
    stats = balancer.backward(losses)

    torch.testing.assert_close(flat_grads(shared), pcgrad_by_hand(per_task, orders), rtol=1e-9, atol=1e-12)
    assert float(stats["pcgrad_conflict_share"]) > 0  # these batches do conflict, so projections happen
    assert (flat_grads(shared) - per_task.sum(0)).norm() > 1e-6 * per_task.sum(0).norm()
    for t in TASKS:
        torch.testing.assert_close(flat_grads(heads[t]), head_ref[t], rtol=0, atol=0)
    gram = per_task @ per_task.T
    by_hand_share = sum(float(gram[i, j]) < 0 for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    assert float(stats["pcgrad_conflict_share"]) == pytest.approx(by_hand_share)


def test_pcgrad_orders_are_random_and_resume_exactly(tiny):
    cfg, model, _ = tiny
    a = PCGradBalancer(model, TASKS, cfg.train)
    draws = [a.draw_orders() for _ in range(20)]
    assert len({str(d) for d in draws}) > 1
    assert all(sorted(o) == [j for j in range(3) if j != i] for d in draws for i, o in enumerate(d))
    b = PCGradBalancer(model, TASKS, cfg.train)
    b.load_state_dict(save_load(a.state_dict()))
    assert [a.draw_orders() for _ in range(5)] == [b.draw_orders() for _ in range(5)]


# ---------------------------------------------------------------- GradNorm


def gradnorm_weight_grad_by_hand(losses, W, weights, L0, alpha) -> torch.Tensor:
    """d/dw_i sum_j |w_j n_j - target_j| with the target constant: sign(G_i - target_i) * n_i."""
    n = torch.stack([torch.autograd.grad(losses[t], W, retain_graph=True)[0].norm() for t in TASKS]).float()
    L = torch.stack([losses[t].detach().float() for t in TASKS])
    ratio = L / L0
    target = (weights * n).mean() * (ratio / ratio.mean()) ** alpha
    return torch.sign(weights * n - target) * n


def test_gradnorm_step_matches_the_algorithm(tiny):
    cfg, model, batches = tiny
    model = copy.deepcopy(model)
    tc = dataclasses.replace(cfg.train, gn_alpha=1.5)
    balancer = GradNormBalancer(model, TASKS, tc)
    W, params = balancer.W, [p for p in model.parameters() if p.requires_grad]

    losses = losses_of(model, batches, 0)
    L0 = torch.stack([losses[t].detach().float() for t in TASKS])
    expected_wgrad = gradnorm_weight_grad_by_hand(losses, W, torch.ones(3), L0, tc.gn_alpha)
    stats = balancer.backward(losses)
    torch.testing.assert_close(balancer.initial_losses, L0, rtol=0, atol=0)  # L_i(0): the first step's losses
    torch.testing.assert_close(balancer.weights.grad, expected_wgrad, rtol=1e-5, atol=1e-7)
    assert [float(stats[f"gn_weight_{t}"]) for t in TASKS] == [1.0, 1.0, 1.0]
    balancer.after_step()
    w = balancer.weights.detach().clone()
    assert float(w.sum()) == pytest.approx(len(TASKS), abs=1e-5)
    assert float(w.max() - w.min()) > 1e-3  # the weights did move

    # Second step: the network's gradients are exactly those of sum_i w_i L_i (no second-order term).
    model.zero_grad(set_to_none=True)
    losses = losses_of(model, batches, 1)
    reference = ref_grads(sum(w[i].item() * losses[t] for i, t in enumerate(TASKS)), params)
    expected_wgrad = gradnorm_weight_grad_by_hand(losses, W, w, L0, tc.gn_alpha)
    stats = balancer.backward(losses)
    torch.testing.assert_close(flat_grads(params), reference, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(balancer.initial_losses, L0, rtol=0, atol=0)  # kept, not re-taken
    torch.testing.assert_close(balancer.weights.grad, expected_wgrad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.stack([stats[f"gn_weight_{t}"] for t in TASKS]), w)
    balancer.after_step()
    assert float(balancer.weights.detach().sum()) == pytest.approx(len(TASKS), abs=1e-5)


class ToyMultitask(nn.Module):
    """One shared layer and identical heads: identical tasks train at identical rates."""

    def __init__(self, scales):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 4)
        head = nn.Linear(4, 1)
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in scales)
        self.scales = scales

    def shared_parameters(self):
        return list(self.body.parameters())

    def shared_layer(self):
        return self.body.weight

    def losses(self, x, y):
        """One forward per task, as in the pipeline (disjoint graphs)."""
        return {t: s * ((head(torch.tanh(self.body(x))).squeeze(-1) - y) ** 2).mean()
                for t, s, head in zip(TASKS, self.scales, self.heads)}


def run_toy_gradnorm(scales, steps=8):
    model = ToyMultitask(scales)
    cfg = load_config(PARAMS, profile="cpu", overrides=["train.gn_lr=0.05"]).train
    balancer = GradNormBalancer(model, TASKS, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, generator=gen)
        balancer.backward(model.losses(x, y))
        opt.step()
        opt.zero_grad(set_to_none=True)
        balancer.after_step()
        assert float(balancer.weights.detach().sum()) == pytest.approx(3.0, abs=1e-5)
    return balancer.weights.detach()


def test_gradnorm_equal_training_rates_keep_weights_equal():
    w = run_toy_gradnorm([1.0, 1.0, 1.0])
    torch.testing.assert_close(w, torch.ones(3))
    skewed = run_toy_gradnorm([1.0, 1.0, 4.0])  # same rates, 4x the gradient norm: its weight must drop
    assert skewed[2] < skewed[0] - 1e-3


def test_gradnorm_state_round_trip_restores_the_next_step(tiny):
    cfg, model, batches = tiny
    model = copy.deepcopy(model)
    a = GradNormBalancer(model, TASKS, cfg.train)
    for k in range(2):
        a.backward(losses_of(model, batches, k))
        a.after_step()
        model.zero_grad(set_to_none=True)
    b, fresh = GradNormBalancer(model, TASKS, cfg.train), GradNormBalancer(model, TASKS, cfg.train)
    b.load_state_dict(save_load(a.state_dict()))
    results = []
    for balancer in (a, b, fresh):
        model.zero_grad(set_to_none=True)
        balancer.backward(losses_of(model, batches, 2))
        grads = flat_grads(model.parameters())
        balancer.after_step()
        results.append((grads, balancer.weights.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][1], results[2][1])  # without the state the step differs


def test_gradnorm_needs_a_trainable_shared_layer(make_cfg):
    cfg = make_cfg("model.mode=pretrain")
    with pytest.raises(ConfigError, match="train.balancer=gradnorm"):
        GradNormBalancer(build_model(cfg.model, TASKS), TASKS, cfg.train)


# ---------------------------------------------------------------- torchjd aggregators and the plumbing


def test_jacobian_plumbing_mean_is_the_average_of_task_gradients(tiny):
    cfg, model, batches = tiny
    model = copy.deepcopy(model)
    shared = model.shared_parameters()
    losses = losses_of(model, batches)
    per_task = torch.stack([ref_grads(losses[t], shared) for t in TASKS])
    head_ref = {t: ref_grads(losses[t], list(model.heads[t].parameters())) for t in TASKS}
    stats = make_balancer("mean", model, TASKS, cfg.train).backward(losses)
    torch.testing.assert_close(flat_grads(shared), per_task.mean(0), rtol=1e-10, atol=1e-14)
    for t in TASKS:
        torch.testing.assert_close(flat_grads(model.heads[t].parameters()), head_ref[t], rtol=0, atol=0)
    assert 0 <= float(stats["conflict_share"]) <= 1


@pytest.mark.parametrize("name", TORCHJD)
def test_every_torchjd_aggregator_trains_one_step(tiny, name):
    cfg, model, batches = tiny
    model = copy.deepcopy(model).float()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    balancer = make_balancer(name, model, TASKS, cfg.train)
    assert isinstance(balancer, JacobianBalancer)
    stats = balancer.backward(losses_of(model, batches))
    shared = flat_grads(model.shared_parameters())
    assert torch.isfinite(shared).all() and shared.abs().sum() > 0
    assert all(torch.isfinite(v).all() for v in stats.values())
    opt.step()
    balancer.after_step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    balancer.load_state_dict(save_load(balancer.state_dict()))  # what a checkpoint does


@pytest.mark.parametrize("name", TORCHJD)
def test_torchjd_balancer_matches_the_aggregator_and_resumes(name):
    """Our Gram-matrix shortcut gives what the aggregator itself gives; a state round trip changes nothing."""
    model = ToyMultitask([1.0, 1.0, 1.0])
    cfg = load_config(PARAMS, profile="cpu").train
    G = conflicting(3, 50, seed=2).float()
    a = make_balancer(name, model, TASKS, cfg)
    torch.manual_seed(0)
    ours = a.combine(G)[0]
    torch.manual_seed(0)
    theirs = REGISTRY[name](model, TASKS, cfg).aggregator(G)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    b = make_balancer(name, model, TASKS, cfg)
    b.load_state_dict(save_load(a.state_dict()))
    G2 = conflicting(3, 50, seed=3).float()
    torch.manual_seed(1)
    next_a = a.combine(G2)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(b.combine(G2)[0], next_a, rtol=1e-5, atol=1e-6)


def test_frozen_backbone_jacobian_methods_act_like_the_sum(make_cfg, prepared):
    cfg = make_cfg("model.mode=pretrain", "model.dropout=0.0")
    pad_id = tokenizer_info(prepared)["pad_id"]
    batches = {t: [collate(load_split(prepared, t, "train"), np.arange(4), pad_id)] for t in TASKS}
    torch.manual_seed(0)
    model = build_model(cfg.model, TASKS).eval()
    grads = []
    for balancer in (SumBalancer(model, TASKS, cfg.train), PCGradBalancer(model, TASKS, cfg.train)):
        model.zero_grad(set_to_none=True)
        balancer.backward(losses_of(model, batches))
        grads.append(flat_grads(model.heads.parameters()))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------- through train()


@pytest.mark.parametrize("balancer", ["pcgrad", "gradnorm"])
def test_train_end_to_end_logs_balancer_stats(make_cfg, tmp_path, balancer):
    best = train(make_cfg(f"train.balancer={balancer}", "train.epochs=1"), run_dir=tmp_path / balancer)
    assert np.isfinite(best["avg"])
    steps = [json.loads(line) for line in (tmp_path / balancer / "steps.jsonl").read_text().splitlines()]
    assert len(steps) > 1
    for s in steps:
        if balancer == "pcgrad":
            assert 0 <= s["pcgrad_conflict_share"] <= 1
        else:
            assert sum(s[f"gn_weight_{t}"] for t in TASKS) == pytest.approx(3.0, abs=1e-4)
            assert np.isfinite(s["gn_loss"])
    if balancer == "gradnorm":
        assert steps[-1]["gn_weight_sst"] != steps[0]["gn_weight_sst"]


def test_train_resumed_from_checkpoint_logs_the_same_steps(make_cfg, tmp_path, balancer="gradnorm"):
    """GradNorm's state (weights, Adam, L_i(0)) goes through the real checkpoint: 1 epoch + resume == 2 straight."""
    straight = make_cfg(f"train.balancer={balancer}", "train.epochs=2", "train.epoch_fraction=0.25")
    train(straight, run_dir=tmp_path / "straight")
    train(make_cfg(f"train.balancer={balancer}", "train.epochs=1", "train.epoch_fraction=0.25"), run_dir=tmp_path / "r")
    train(straight, run_dir=tmp_path / "r")
    read = lambda d: (tmp_path / d / "steps.jsonl").read_text().splitlines()
    assert len(read("straight")) > 2 and read("r") == read("straight")
