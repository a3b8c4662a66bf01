"""FLOPs of a training step, counted analytically, and this machine's matmul peak, measured.

Only matrix products count (the convention of MFU figures): the Linear layers, the two attention
products and the heads. Softmax, GELU, LayerNorm, dropout, the embedding lookup, the losses, the
cosine head and AdamW are left out: they are memory-bound and small next to the products.

For an encoder pass over n sequences padded to width L (N = n*L token positions), with hidden
size d and P_l the weights of layer l's Linear layers (4d^2 + 2df for a BERT layer: Q, K, V,
the attention output, the two feed-forward matrices; f the intermediate size):

    forward of layer l      F_l = 2*N*P_l + 4*n*L^2*d        (QK^T and PV: 2*n*L^2*d each)
    backward of layer l     2*F_l  when the layer trains and its input needs a gradient
                            2*F_l - 2*N*P_qkv  when the layer below is frozen (or cached): the
                            Q, K and V projections compute weight gradients but no input gradient
                            0  for a frozen layer (it runs forward only, under no_grad)
    a layer read from the prefix cache costs nothing (its states were computed once, by `cache`)
    pooler                  2*n*d^2 forward (the [CLS] row only), twice that backward when trained
    heads                   2*B*sum(in*out) forward over the task's B examples, twice that backward
                            (less the input gradient of its first layer when nothing below trains)

    step FLOPs = sum over the step's task batches of forward + backward.

"Executed" FLOPs take the padded shapes the kernels run on (N = n*L, attention n*L^2); "useful"
FLOPs take the real tokens only (N = sum of lengths, attention sum of length^2). Achieved FLOP/s
= executed FLOPs of the timed steps / their wall time; its share of the peak is measured against
a large matmul timed in the same process with the same thread count (`matmul_peak`).

tests/test_benchmarks.py checks this count against torch.utils.flop_counter.FlopCounterMode on a
tiny eager-attention BERT, full fine-tuning and a frozen, cached prefix alike.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def formula() -> str:
    """The counting rules of the module docstring, for the reports."""
    paragraphs = (__doc__ or "").split("\n\n")
    return "\n\n".join(p.strip("\n") for p in paragraphs[2:4])


@dataclass
class Dims:
    """The shapes of a MultitaskBert that its FLOPs depend on."""

    hidden: int
    layer_params: list[int]                 # weights of each encoder layer's Linear layers
    qkv_params: list[int]                   # of those, the Q, K and V projections (they read the layer input)
    layer_trains: list[bool]
    frozen_layers: int
    embeddings_train: bool
    pooler_params: int = 0                  # 0: no pooler in the backbone
    pooler_trains: bool = False
    pooling: str = "pooler"
    heads: dict[str, list[int]] = field(default_factory=dict)   # task -> in*out of each Linear, in order


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def model_dims(model) -> Dims:
    bert = model.bert
    layers = list(bert.encoder.layer)
    qkv = []
    for layer in layers:
        attn = getattr(getattr(layer, "attention", None), "self", None)
        names = ("query", "key", "value")
        qkv.append(sum(getattr(attn, n).weight.numel() for n in names) if attn is not None and
                   all(hasattr(attn, n) for n in names) else 3 * bert.config.hidden_size ** 2)
    pooler = getattr(bert, "pooler", None)
    return Dims(hidden=bert.config.hidden_size, layer_params=[_linear_weights(x) for x in layers], qkv_params=qkv,
                layer_trains=[_trains(x) for x in layers], frozen_layers=model.frozen_layers,
                embeddings_train=_trains(bert.embeddings),
                pooler_params=pooler.dense.weight.numel() if pooler is not None else 0,
                pooler_trains=pooler is not None and _trains(pooler), pooling=model.cfg.pooling,
                heads={t: [m.weight.numel() for m in h.modules() if isinstance(m, nn.Linear)]
                       for t, h in model.heads.items()})


def pass_flops(dims: Dims, rows: int, tokens: float, sq_tokens: float, cached_layers: int, examples: int,
               task: str) -> tuple[float, float]:
    """(forward, backward) FLOPs of one task batch: `rows` sequences, `tokens` = sum of their (padded or real)
    lengths, `sq_tokens` = sum of squared lengths, the lower `cached_layers` layers read from the cache."""
    d, fwd, bwd = dims.hidden, 0.0, 0.0
    grad_below = dims.embeddings_train and cached_layers == 0  # does the input of the next layer need a gradient?
    for i, (p, qkv, trains) in enumerate(zip(dims.layer_params, dims.qkv_params, dims.layer_trains)):
        if i < cached_layers:
            continue
        f = 2 * tokens * p + 4 * sq_tokens * d
        fwd += f
        if trains and i >= dims.frozen_layers:
            bwd += 2 * f - (0 if grad_below else 2 * tokens * qkv)
            grad_below = True
    used_pooler = dims.pooler_params and dims.pooling == "pooler"
    if dims.pooler_params and (used_pooler or dims.frozen_layers == 0):  # the backbone's own forward runs it
        f = 2 * rows * dims.pooler_params
        fwd += f
        if used_pooler and dims.pooler_trains:
            bwd += 2 * f - (0 if grad_below else 2 * rows * dims.pooler_params)
            grad_below = True
    for k, w in enumerate(dims.heads.get(task, [])):
        f = 2 * examples * w
        fwd += f
        bwd += 2 * f - (0 if (k > 0 or grad_below) else f)
    return fwd, bwd


def batch_flops(dims: Dims, task: str, batch: dict) -> dict:
    """Executed and useful FLOPs (forward, backward) of one collated task batch."""
    mask = batch["attention_mask"]
    rows, width = mask.shape
    lengths = mask.sum(1).to(torch.float64)
    cached = int(batch.get("hidden_layers", 0)) if batch.get("hidden") is not None else 0
    examples = int(batch.get("pair_size") or rows)
    ex = pass_flops(dims, rows, rows * width, rows * width ** 2, cached, examples, task)
    use = pass_flops(dims, rows, float(lengths.sum()), float((lengths ** 2).sum()), cached, examples, task)
    return {"forward": ex[0], "backward": ex[1], "useful_forward": use[0], "useful_backward": use[1]}


def step_flops(model, batches: dict[str, dict]) -> dict:
    """FLOPs of one optimizer step over one batch per task (see the module docstring)."""
    dims = model_dims(model)
    out = {"forward": 0.0, "backward": 0.0, "useful_forward": 0.0, "useful_backward": 0.0}
    for task, batch in batches.items():
        for k, v in batch_flops(dims, task, batch).items():
            out[k] += v
    out["total"] = out["forward"] + out["backward"]
    out["useful_total"] = out["useful_forward"] + out["useful_backward"]
    return out


# ---------------------------------------------------------------- the machine's matmul peak


def _time_kernel(fn, reps: int, budget_s: float) -> float:
    """Best wall time of `reps` calls after one warm-up call (stopping early past budget_s)."""
    fn()
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    return best


KERNELS = {"torch.matmul": lambda a, b: a @ b, "F.linear": lambda a, b: F.linear(a, b)}
# fp32 at 2048 (~17 GFLOP a call). bf16: F.linear takes oneDNN's path; torch.matmul on an AVX2 CPU falls
# back to a reference kernel ~10x slower, timed at 512 so that it costs a fraction of a second.
SIZES = {"fp32": {"torch.matmul": 2048, "F.linear": 2048}, "bf16": {"torch.matmul": 512, "F.linear": 1024}}


def matmul_peak(device: torch.device, reps: int = 3, budget_s: float = 2.0, sizes: dict | None = None) -> dict:
    """GFLOP/s of a large square matmul in fp32 and bf16, best of the kernels in KERNELS, on torch's current
    thread count. {precision: {"gflops": best, "kernels": {name: {"n": n, "gflops": g}}}}."""
    sizes = sizes or SIZES
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        kernels = {}
        for name, n in sizes[precision].items():
            a = torch.randn(n, n, generator=gen).to(device, dtype)
            b = torch.randn(n, n, generator=gen).to(device, dtype)
            kernel = KERNELS[name]

            def call(a=a, b=b, kernel=kernel):
                kernel(a, b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            kernels[name] = {"n": n, "gflops": 2 * n ** 3 / _time_kernel(call, reps, budget_s) / 1e9}
        out[precision] = {"gflops": max(k["gflops"] for k in kernels.values()), "kernels": kernels}
    return out


def merge_peaks(*peaks: dict) -> dict:
    """The best of several peak measurements, kernel by kernel (load from other processes only lowers them)."""
    out = {}
    for precision in peaks[0]:
        kernels = {}
        for name in peaks[0][precision]["kernels"]:
            runs = [p[precision]["kernels"][name] for p in peaks]
            kernels[name] = {"n": runs[0]["n"], "gflops": max(r["gflops"] for r in runs),
                             "measurements": [r["gflops"] for r in runs]}
        out[precision] = {"gflops": max(k["gflops"] for k in kernels.values()), "kernels": kernels}
    return out
