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
    if reads:
        own = prof.get("host_syncs_per_step_by_phase", {})
        others = "; ".join(f"{b}: " + ", ".join(f"{k} {v}" for k, v in ph.items()) for b, ph in reads.items())
        where = {"forward": "in the forward passes (transformers' mask test, outside our code)",
                 "backward": "in the backward", "optimizer": "in the optimizer step (torch's AdamW)",
                 "step_other": "in train_step's own finite-loss check and log entry (reads of host copies made "
                               "once per step)", "collate": "in collate"}
        parts = ", ".join(f"{v:.0f} {where.get(k, 'in ' + k)}" for k, v in own.items())
        out.append(f"Tensor reads into Python numbers per step (each a host-device sync on CUDA), summed loss: "
                   f"{parts or 'none'}; with the other balancers: {others}.")
    gn = met.get("gradnorm_vs_library_agreement")
    if gn and gn["value"] is not None:
        d = gn["details"]["shared_grad"]
        out.append(f"gradnorm-pytorch is not the paper's GradNorm in two ways we measured or read: its network "
                   f"gradient differs from ours (cosine {d['cosine']:.3f}) because its GradNorm loss is "
                   f"backpropagated into the network, and it raises r_i to -alpha where the paper uses +alpha (equal "
                   f"on the first step, where r_i = 1, which is why the comparison is made there).")
    speed = met.get("train_speedup_full_vs_starter")
    if speed and speed["value"]:
        d = speed["details"]
        sides = d["sides"]
        cause = max(d["cause"], key=d["cause"].get)
        if d["cause"][cause] > 0:
            out.append(f"On the same computation the starter-style loop's extra time is mostly "
                       f"{cause.replace('_', ' ')} "
                       f"({d['cause'][cause]:.1f} s per block): {sides['starter']['padding_share']:.0%} of its token "
                       f"positions are padding against {sides['full']['padding_share']:.0%} of ours, and tokenising "
                       f"every step costs it {sides['starter']['phases_s'].get('tokenize', 0):.2f} s per block.")
        cpu = met.get("train_speedup_cpu_vs_starter")
        if cpu and cpu["value"] and "cpu" in sides:
            out.append(f"The cpu profile's step ({sides['cpu']['what']}) runs {sides['cpu']['gflop_per_step']:.1f} "
                       f"GFLOP against the full step's {sides['full']['gflop_per_step']:.1f}: "
                       f"{cpu['value']:.1f}× the starter-style loop's speed, where the loop alone (every layer "
                       f"training) gives {speed['value']:.1f}×.")
    share = met.get("train_step_peak_share_fp32")
    if share and share["value"] is not None:
        d = share["details"]["sides"]
        out.append("Share of the fp32 matmul peak: " + ", ".join(
            f"{n} {v['peak_share']:.0%}" for n, v in d.items() if v["precision"] == "fp32")
            + " (executed FLOPs of matrix products over step time, benchmarks/flops.py).")
    return out
