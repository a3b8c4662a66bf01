"""What the measurements say to change, as sentences built from the results (no typed-in numbers)."""
from __future__ import annotations


def findings(res: dict) -> list[str]:
    met, prof = res["metrics"], res.get("profile") or {}
    out = []
    phases = prof.get("phases_share", {})
    top = {op["op"]: op["share_of_self_cpu"] for op in prof.get("top_ops", [])}
    gemm = sum(top.get(k, 0.0) for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    if phases:
        bound = ("so the step is bound by matrix products and the remaining levers on CPU are fewer padded tokens, "
                 "the optimizer and threads" if gemm >= 0.5 else "so overheads outside the matrix products matter "
                 "at this model size")
        out.append(f"Profile: backward {phases.get('backward', 0):.0%}, forward {phases.get('forward', 0):.0%}, "
                   f"optimizer {phases.get('optimizer', 0):.0%} of a step; matrix products (mm, addmm, bmm) are "
                   f"{gemm:.0%} of operator self time, {bound}.")
    fused = met.get("adamw_fused_speedup")
    if fused and fused["value"] and "optimizer" in phases:
        share = phases["optimizer"]
        saving = share * (1 - 1 / fused["value"])
        out.append(f"The loop builds AdamW with the fused kernel on CPU as on CUDA (`pipeline.train.make_optimizer`, "
                   f"which this suite also uses): the optimizer is {share:.0%} of our step and the fused step is "
                   f"{fused['value']:.1f}× faster than the default one on the same parameters, about {saving:.0%} "
                   f"of a step saved (estimated from those two measurements).")
    reads = prof.get("scalar_reads_per_step_by_balancer") or {}
    n_tasks = len(res["config"]["tasks"])
    if reads:
        own = prof.get("host_syncs_per_step_by_phase", {})
        stat_reads = {b: ph.get("log", 0) - n_tasks for b, ph in reads.items()}
        worst = max(stat_reads, key=stat_reads.get)
        out.append(f"Tensor reads into Python numbers per step (each a host-device sync on CUDA): the finite-loss "
                   f"check {own.get('loss_check', 0):.0f} (by design), the transformers SDPA mask test "
                   f"`padding_mask.all()` {own.get('forward', 0):.0f} (one per task forward, outside our code), and "
                   f"the step log's balancer statistics, read with one stacked copy per step ({worst}: "
                   f"{stat_reads[worst]}).")
    gn = met.get("gradnorm_vs_library_agreement")
    if gn and gn["value"] is not None:
        d = gn["details"]["shared_grad"]
        out.append(f"gradnorm-pytorch is not the paper's GradNorm in two ways we measured or read: its network "
                   f"gradient differs from ours (cosine {d['cosine']:.3f}) because its GradNorm loss is "
                   f"backpropagated into the network, and it raises r_i to -alpha where the paper uses +alpha (equal "
                   f"on the first step, where r_i = 1, which is why the comparison is made there).")
    speed = met.get("train_speedup_vs_naive")
    if speed and speed["value"]:
        d = speed["details"]
        cause = max(d["cause"], key=d["cause"].get)
        if d["cause"][cause] > 0:
            out.append(f"The naive loop's extra time is mostly {cause.replace('_', ' ')} "
                       f"({d['cause'][cause]:.1f} s per block), from padding: {d['padding_share_naive']:.0%} of its "
                       f"token positions are padding against {d['padding_share_ours']:.0%} of ours; tokenising every "
                       f"step costs it {d['sides']['naive']['phases_s'].get('tokenize', 0):.2f} s per block.")
    return out
