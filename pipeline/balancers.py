"""How task losses become one update: sum, GradNorm, PCGrad, or any torchjd aggregator.

Every method is a `Balancer`: `backward(losses)` fills the parameters' `.grad`
and returns statistics for logging as 0-d tensors (no host sync here; the loop
converts them); `after_step()` runs after the optimizer step. Tasks run
separate forward passes on separate batches, so each task's graph is disjoint
and one backward per task costs what one backward of the summed loss costs: no
method here needs an extra forward pass.

Adding a method: subclass `Balancer` (or `JacobianBalancer` to combine the
per-task gradients of the shared parameters) and add one line to `REGISTRY`.
"""
from __future__ import annotations

import random
from typing import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError


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


def _flat_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of `flat` shaped like `params`."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


def gramian(G: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """G @ G.T in float64, summed over column blocks.

    One float32 GEMM over millions of entries accumulates sequentially and its
    error can exceed the small inner products whose sign PCGrad tests; blocked
    partial sums keep it near float32 precision, and the batched GEMM is also
    faster than one (T x D) @ (D x T) product.
    """
    T, D = G.shape
    K = D // block
    gram = torch.zeros(T, T, dtype=torch.float64, device=G.device)
    if K:
        A = G[:, : K * block].view(T, K, block).transpose(0, 1)  # (K, T, block)
        gram += torch.bmm(A, A.transpose(1, 2)).sum(0, dtype=torch.float64)
    rest = G[:, K * block:].double()
    return gram + rest @ rest.T


class JacobianBalancer(Balancer):
    """Collects one flattened gradient of the shared parameters per task, then combines them.

    Task heads keep their own task's gradient; only the shared backbone's
    gradients are combined by `combine(G)`, G being the (tasks x params) matrix
    in a buffer reused every step, as is the combined gradient's.
    """

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.shared = list(model.shared_parameters())
        if len({(p.dtype, p.device) for p in self.shared}) > 1:
            raise ConfigError(f"train.balancer={self.name}: shared parameters must share one dtype and device")
        self.numel = sum(p.numel() for p in self.shared)
        self._G: torch.Tensor | None = None
        self._rows: list[list[torch.Tensor]] = []
        self._out: torch.Tensor | None = None

    def _buffer(self) -> torch.Tensor:
        p0 = self.shared[0]
        if self._G is None or self._G.dtype != p0.dtype or self._G.device != p0.device:
            self._G = torch.empty(len(self.tasks), self.numel, dtype=p0.dtype, device=p0.device)
            self._rows = [_flat_views(row, self.shared) for row in self._G]
            self._out = torch.empty(self.numel, dtype=p0.dtype, device=p0.device)
        return self._G

    def task_gradients(self, losses) -> torch.Tensor:
        G = self._buffer()
        for p in self.shared:
            p.grad = None
        for i, task in enumerate(self.tasks):
            losses[task].backward()
            for p, v in zip(self.shared, self._rows[i]):
                if p.grad is None:  # this task does not reach p
                    v.zero_()
                else:
                    v.copy_(p.grad)
                    p.grad = None
        return G

    def combination(self, G: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights[i] * G[i], written into the reused output buffer."""
        return torch.mv(G.T, weights.to(G.dtype), out=self._out)

    def write_shared(self, vector: torch.Tensor) -> None:
        for p, v in zip(self.shared, _flat_views(vector.to(self.shared[0].dtype), self.shared)):
            p.grad = v

    def combine(self, G: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def backward(self, losses):
        if not self.shared:  # frozen backbone: heads are disjoint, nothing to combine
            return SumBalancer.backward(self, losses)
        vector, stats = self.combine(self.task_gradients(losses))
        self.write_shared(vector)
        return stats


def conflict_share(gram: torch.Tensor) -> torch.Tensor:
    """Share of task pairs whose gradients conflict (negative inner product)."""
    T = gram.shape[0]
    iu = torch.triu_indices(T, T, offset=1, device=gram.device)
    return (gram[iu[0], iu[1]] < 0).float().mean()


def pcgrad_weights(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad as weights on the original task gradients: the update is sum_k weights[k] g_k.

    Each projected gradient is g_i' = sum_k C[i, k] g_k, so its inner product with
    g_j is (C @ gram)[i, j]: every projection is done on the T x T Gram matrix and
    the D-dimensional gradients are touched once, when summing. `orders[i]` is the
    order in which task i is projected against the others, always against their
    original gradients. Branch-free (min(dot, 0)), so no host sync on a GPU.
    """
    T = gram.shape[0]
    C = torch.eye(T, dtype=gram.dtype, device=gram.device)
    for i in range(T):
        for j in orders[i]:
            dot = C[i] @ gram[:, j]
            C[i, j] -= dot.clamp_max(0) / gram[j, j].clamp_min(torch.finfo(gram.dtype).tiny)
    return C.sum(0)  # the projected gradients are summed, not averaged


def pcgrad(G: torch.Tensor, orders: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The PCGrad update for task gradients G (rows) and projection orders; also the Gram matrix."""
    gram = gramian(G)
    return torch.mv(G.T, pcgrad_weights(gram, orders).to(G.dtype)), gram


class PCGradBalancer(JacobianBalancer):
    """PCGrad (Yu et al., 2020): drop each task gradient's component that conflicts with another's, then sum."""

    name = "pcgrad"

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.rng = random.Random(getattr(cfg, "seed", 0))  # own stream: orders do not disturb dropout

    def draw_orders(self) -> list[list[int]]:
        """A fresh random order of the other tasks for each task."""
        orders = []
        for i in range(len(self.tasks)):
            others = [j for j in range(len(self.tasks)) if j != i]
            self.rng.shuffle(others)
            orders.append(others)
        return orders

    def combine(self, G):
        gram = gramian(G)
        vector = self.combination(G, pcgrad_weights(gram, self.draw_orders()))
        return vector, {"pcgrad_conflict_share": conflict_share(gram)}

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return {"rng": torch.tensor(internal, dtype=torch.int64), "rng_version": version, "rng_gauss": gauss}

    def load_state_dict(self, state):
        if "rng_version" in state:
            self.rng.setstate((state["rng_version"], tuple(int(x) for x in state["rng"].tolist()), state["rng_gauss"]))
        elif "rng" in state:  # checkpoints written before the state became a tensor
            version, internal, gauss = state["rng"]
            self.rng.setstate((version, tuple(internal), gauss))


class TorchJDBalancer(JacobianBalancer):
    """Any torchjd aggregator applied to the tasks' shared-parameter Jacobian.

    Weighting-based aggregators get our blocked float64 Gram matrix (accurate,
    and computed once) and their weights are applied here; the others (GradDrop,
    ConFIG) see the matrix itself. Aggregators that draw random numbers use the
    global torch RNG, which train() seeds and checkpoints.
    """

    def __init__(self, model, tasks, cfg, factory: Callable[[int], nn.Module], name: str):
        self.name = name
        super().__init__(model, tasks, cfg)
        self.aggregator = factory(len(tasks))

    def combine(self, G):
        from torchjd.aggregation import GramianWeightedAggregator, WeightedAggregator

        gram = gramian(G)
        agg = self.aggregator
        if isinstance(agg, GramianWeightedAggregator):
            vector = self.combination(G, agg.gramian_weighting(gram))
        elif isinstance(agg, WeightedAggregator):
            vector = self.combination(G, agg.weighting(G))
        else:
            vector = agg(G)
        return vector, {"conflict_share": conflict_share(gram)}

    # NashMTL is the one stateful aggregator here: its previous solution warm-starts the next.
    def state_dict(self):
        alpha = getattr(getattr(self.aggregator, "weighting", None), "prvs_alpha", None)
        return {} if alpha is None else {"prvs_alpha": torch.as_tensor(alpha).clone()}

    def load_state_dict(self, state):
        if "prvs_alpha" in state:
            self.aggregator.reset()
            self.aggregator.weighting.prvs_alpha = state["prvs_alpha"].numpy()


class GradNormBalancer(Balancer):
    """GradNorm (Chen et al., 2018) on the last shared layer W (the pooler dense weights).

    - Task weights w_i start at 1; the network's gradient is exactly that of sum_i w_i L_i
      (w detached), so no second-order term of the GradNorm loss reaches the network.
    - L_i(0) is the loss of the first training step (before any update), the usual choice;
      it is checkpointed, so a resumed run keeps it.
    - G_i = ||grad_W w_i L_i||, read from a per-task W gradient buffer filled by the same
      backward that trains the network; the target mean(G) * r_i^alpha is a constant.
    - L_grad = sum_i |G_i - target_i| is differentiated with respect to w only; after each
      step the weights are kept positive and renormalised to sum to T.
    - The logged gn_weight_* are the weights that scaled this step's update.
    """

    name = "gradnorm"
    MIN_WEIGHT = 1e-4

    def __init__(self, model, tasks, cfg):
        super().__init__(model, tasks, cfg)
        self.W = model.shared_layer()
        if not self.W.requires_grad:
            raise ConfigError("train.balancer=gradnorm needs a trainable shared layer (model.mode=pretrain freezes it)")
        self.alpha = float(cfg.gn_alpha)
        self.weights = torch.ones(len(self.tasks), device=self.W.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=cfg.gn_lr)
        self.initial_losses: torch.Tensor | None = None
        self._wg: torch.Tensor | None = None

    def backward(self, losses):
        W = self.W
        if self._wg is None or self._wg.dtype != W.dtype or self._wg.device != W.device:
            self._wg = torch.zeros(len(self.tasks), *W.shape, dtype=W.dtype, device=W.device)
        wg = self._wg
        wg.zero_()
        L = torch.stack([losses[t].detach().float() for t in self.tasks]).to(self.weights.device)
        if self.initial_losses is None:
            self.initial_losses = L.clone()
        w_now = self.weights.detach().clone()
        for i, task in enumerate(self.tasks):
            W.grad = wg[i]  # this task's W gradient lands in its own slot, in place
            slot = W.grad
            (w_now[i].to(losses[task].dtype) * losses[task]).backward()
            if W.grad is not slot:
                wg[i].copy_(W.grad)
        W.grad = wg.sum(0)
        norms = wg.flatten(1).float().norm(dim=1).to(w_now.device) / w_now  # ||grad_W L_i||
        G = self.weights * norms
        ratio = L / self.initial_losses.clamp_min(1e-12)
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
