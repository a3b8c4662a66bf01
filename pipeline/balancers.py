"""How task losses become one update: sum, GradNorm, PCGrad, or any torchjd aggregator.

Every method is a `Balancer`: `backward(losses)` fills the parameters' `.grad`
and returns detached statistics for logging; `after_step()` runs after the
optimizer step. Tasks run separate forward passes on separate batches, so each
task's graph is disjoint and one backward per task costs what one backward of
the summed loss costs: no method here needs an extra forward pass.

Adding a method: subclass `Balancer` (or `JacobianBalancer` to combine the
per-task gradients of the shared parameters) and add one line to `REGISTRY`.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from torch import nn


class Balancer:
    name = "base"

    def __init__(self, model: nn.Module, tasks: list[str], cfg) -> None:
        self.model, self.tasks, self.cfg = model, list(tasks), cfg

    def backward(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after optimizer.step()."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (resume)."""


class SumBalancer(Balancer):
    """The paper's baseline: the plain sum of the task losses."""

    name = "sum"

    def backward(self, losses):
        torch.stack([losses[t] for t in self.tasks]).sum().backward()
        return {}


class JacobianBalancer(Balancer):
    """Collects one flattened gradient of the shared parameters per task, then combines them.

    Task heads keep their own task's gradient; only the shared backbone's
    gradients are combined by `combine(G)`, G being the (tasks x params) matrix.
    """

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.shared = [p for p in model.shared_parameters()]
        self.numel = sum(p.numel() for p in self.shared)
        self._buffer: torch.Tensor | None = None

    def task_gradients(self, losses) -> torch.Tensor:
        if self._buffer is None:
            p0 = self.shared[0]
            self._buffer = torch.zeros(len(self.tasks), self.numel, device=p0.device, dtype=torch.float32)
        G = self._buffer
        for p in self.shared:
            p.grad = None
        for i, task in enumerate(self.tasks):
            losses[task].backward()
            offset = 0
            for p in self.shared:
                n = p.numel()
                if p.grad is None:
                    G[i, offset: offset + n].zero_()
                else:
                    G[i, offset: offset + n].copy_(p.grad.reshape(-1))
                    p.grad = None
                offset += n
        return G

    def write_shared(self, vector: torch.Tensor) -> None:
        offset = 0
        for p in self.shared:
            n = p.numel()
            p.grad = vector[offset: offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def combine(self, G: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def backward(self, losses):
        G = self.task_gradients(losses)
        vector, stats = self.combine(G)
        self.write_shared(vector)
        return stats


def conflict_share(gram: torch.Tensor) -> torch.Tensor:
    """Share of task pairs whose gradients conflict (negative inner product)."""
    T = gram.shape[0]
    iu = torch.triu_indices(T, T, offset=1, device=gram.device)
    return (gram[iu[0], iu[1]] < 0).float().mean()


def pcgrad_coefficients(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad in the span of the task gradients.

    Each projected gradient is g_i' = sum_k C[i, k] g_k, so its inner product with
    g_j is (C @ gram)[i, j]: every projection is done on the T x T Gram matrix and
    the D-dimensional gradients are touched once, when summing. `orders[i]` is the
    (random) order in which task i is projected against the others, always
    against their original gradients.
    """
    T = gram.shape[0]
    C = torch.eye(T, dtype=gram.dtype, device=gram.device)
    for i in range(T):
        for j in orders[i]:
            dot = C[i] @ gram[:, j]
            if dot < 0:
                C[i, j] -= dot / gram[j, j].clamp_min(1e-20)
    return C


class PCGradBalancer(JacobianBalancer):
    """PCGrad (Yu et al., 2020): drop each task gradient's component that conflicts with another's, then sum."""

    name = "pcgrad"

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.rng = random.Random(getattr(cfg, "seed", 0))

    def combine(self, G):
        gram = G @ G.T
        T = G.shape[0]
        orders = []
        for i in range(T):
            others = [j for j in range(T) if j != i]
            self.rng.shuffle(others)
            orders.append(others)
        C = pcgrad_coefficients(gram.double(), orders).to(G.dtype)
        return C.sum(0) @ G, {"pcgrad_conflict_share": conflict_share(gram)}

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        if "rng" in state:
            st = state["rng"]
            self.rng.setstate((st[0], tuple(st[1]), st[2]))


class TorchJDBalancer(JacobianBalancer):
    """Any torchjd aggregator applied to the tasks' shared-parameter Jacobian."""

    def __init__(self, model, tasks, cfg, factory: Callable[[int], nn.Module], name: str):
        super().__init__(model, tasks, cfg)
        self.name = name
        torch.manual_seed(getattr(cfg, "seed", 0))  # some aggregators draw random numbers
        self.aggregator = factory(len(tasks))

    def combine(self, G):
        gram = G @ G.T
        return self.aggregator(G), {"pcgrad_conflict_share": conflict_share(gram)}


class GradNormBalancer(Balancer):
    """GradNorm (Chen et al., 2018) on the last shared layer W (the pooler dense weights).

    - Task weights w_i start at 1; the network's gradient is exactly that of sum_i w_i L_i
      (w detached), so no second-order term of the GradNorm loss reaches the network.
    - L_i(0) is the loss of the first training step (before any update), the usual choice.
    - G_i = ||grad_W w_i L_i|| = w_i ||grad_W L_i||; the target mean(G) * r_i^alpha is a constant.
    - L_grad = sum_i |G_i - target_i| is differentiated with respect to w only; after each
      step the weights are kept positive and renormalised to sum to T.
    """

    name = "gradnorm"
    MIN_WEIGHT = 1e-4

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.W = model.shared_layer()
        self.alpha = float(cfg.gn_alpha)
        self.weights = torch.ones(len(self.tasks), device=self.W.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=cfg.gn_lr)
        self.initial_losses: torch.Tensor | None = None

    def backward(self, losses):
        L = torch.stack([losses[t] for t in self.tasks])
        L_detached = L.detach().float()
        if self.initial_losses is None:
            self.initial_losses = L_detached.clone()
        w_now = self.weights.detach()
        norms = []
        for i, task in enumerate(self.tasks):
            before = None if self.W.grad is None else self.W.grad.detach().clone()
            (w_now[i] * losses[task]).backward()
            after = self.W.grad
            diff = after if before is None else after - before
            norms.append(diff.float().norm() / w_now[i])  # ||grad_W L_i||
        norms = torch.stack(norms).detach()
        G = self.weights * norms
        ratio = L_detached / self.initial_losses.clamp_min(1e-12)
        r = ratio / ratio.mean()
        target = (G.mean() * r.pow(self.alpha)).detach()
        grad_loss = (G - target).abs().sum()
        self.weights.grad = torch.autograd.grad(grad_loss, self.weights)[0]
        return {"gn_loss": grad_loss.detach(), **{f"gn_weight_{t}": w_now[i] for i, t in enumerate(self.tasks)}}

    def after_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.weights.clamp_(min=self.MIN_WEIGHT)
            self.weights.mul_(len(self.tasks) / self.weights.sum())

    def state_dict(self):
        return {"weights": self.weights.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "initial_losses": self.initial_losses}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.weights.copy_(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initial_losses = state["initial_losses"]


def _torchjd(name: str, make: Callable[[int], nn.Module]):
    return lambda model, tasks, cfg: TorchJDBalancer(model, tasks, cfg, make, name)


def _agg(cls_name: str, **kw):
    def make(n_tasks: int):
        import torchjd.aggregation as agg

        cls = getattr(agg, cls_name)
        return cls(n_tasks=n_tasks, **kw) if cls_name == "NashMTL" else cls(**kw)

    return make


REGISTRY: dict[str, Callable] = {
    "sum": SumBalancer,
    "gradnorm": GradNormBalancer,
    "pcgrad": PCGradBalancer,
    # torchjd aggregators, selectable by name
    "upgrad": _torchjd("upgrad", _agg("UPGrad")),
    "mgda": _torchjd("mgda", _agg("MGDA")),
    "cagrad": _torchjd("cagrad", _agg("CAGrad", c=0.5)),
    "imtlg": _torchjd("imtlg", _agg("IMTLG")),
    "alignedmtl": _torchjd("alignedmtl", _agg("AlignedMTL")),
    "dualproj": _torchjd("dualproj", _agg("DualProj")),
    "nashmtl": _torchjd("nashmtl", _agg("NashMTL")),
    "graddrop": _torchjd("graddrop", _agg("GradDrop")),
    "config": _torchjd("config", _agg("ConFIG")),
    "mean": _torchjd("mean", _agg("Mean")),
    "torchjd-pcgrad": _torchjd("torchjd-pcgrad", _agg("PCGrad")),
}


def known_balancers() -> list[str]:
    return list(REGISTRY)


def make_balancer(name: str, model: nn.Module, tasks: list[str], cfg) -> Balancer:
    return REGISTRY[name](model, tasks, cfg)
