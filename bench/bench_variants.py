"""The SAM variants' cost over AdamW, side by side in one run: step time and extra memory.

    python bench/bench_variants.py                      # SmolLM2-135M, GSM8K, 2 rounds
    python bench/bench_variants.py --precision fp32     # CPUs without AMX / AVX512-BF16
    python bench/bench_variants.py --quick              # smoke test: tiny model, 1 round

One model and one set of batches in one process; every configuration starts from the same weights
with a fresh optimizer, takes one warm-up step (untimed: Momentum-SAM has no moment before it),
then `--steps` timed steps (5: a whole period of LookSAM k = 5 and interval 5). Rounds interleave
the configurations (A B C ... A B C ...), so a load change on a shared machine hits them alike.
Reported per configuration: mean step time over AdamW's (the ratio of the per-round medians'
mean), forward/backward passes per step, and the extra memory: on CUDA the peak allocated over
AdamW's peak; everywhere the bytes SAM itself holds (exact copies of w, LookSAM's g_v).
Targets: msam <= 1.15x AdamW, looksam k=5 <= 1.35x, sam interval 5 <= 1.3x, sam and samon <= 2.05x.
bench/gpu_check.py runs measure() on a GPU.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
from sam import SAM, normalization_parameters  # noqa: E402

# name -> (variant or None for AdamW, interval, target ratio)
CONFIGS = {"adamw": (None, 1, None), "sam": ("sam", 1, 2.05), "asam": ("asam", 1, 2.05),
           "samon": ("samon", 1, 2.05), "sam_interval5": ("sam", 5, 1.3), "looksam_k5": ("looksam", 5, 1.35),
           "msam": ("msam", 1, 1.15)}


def build(name, model, lr=5e-6):
    variant, interval, _ = CONFIGS[name]
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=lr, weight_decay=0.0, fused=True)          # as finetune.py
    if variant is None:
        return torch.optim.AdamW(params, **kw)
    only = normalization_parameters(model) if variant == "samon" else None
    return SAM(params, torch.optim.AdamW, rho=0.02, variant=variant, interval=interval, perturb_only=only, **kw)


def one_step(model, opt, batches, targets, ctx, device) -> int:
    """finetune.py's loop body; returns the passes it took."""
    sam = isinstance(opt, SAM)
    if sam and opt.perturbs_before_pass:
        opt.first_step()
    finetune.forward_backward(model, batches, targets, ctx, device, 1)
    passes = 1
    if sam and opt.perturbs_this_step:
        opt.first_step(zero_grad=True)
        finetune.forward_backward(model, batches, targets, ctx, device, 1)
        passes = 2
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    step = opt.second_step if sam else opt.step
    step()
    opt.zero_grad(set_to_none=True)
    return passes


def sam_bytes(opt) -> int:
    """What SAM holds beyond AdamW: the exact copies of w and LookSAM's g_v."""
    if not isinstance(opt, SAM):
        return 0
    held = list(opt._backups.values()) + [s["looksam_gv"] for s in opt.state.values() if "looksam_gv" in s]
    return sum(t.numel() * t.element_size() for t in held)


def measure(model, step_batches, ctx, device, names=tuple(CONFIGS), rounds=2, steps=5,
            log=lambda m: print(m, flush=True)) -> dict:
    """{name: {"ratio", "passes", "sam_mb", "peak_extra_mb", "step_s"}}; step_batches[i] = (batches, targets)."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    times = {n: [] for n in names}
    passes, held, peak = {n: 0 for n in names}, {}, {}
    for r in range(rounds):
        for name in names:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(start[k])
            opt = build(name, model)
            one_step(model, opt, *step_batches[0], ctx, device)          # warm-up, untimed
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t, p = [], 0
            for i in range(steps):
                t0 = time.perf_counter()
                p += one_step(model, opt, *step_batches[(1 + i) % len(step_batches)], ctx, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t.append(time.perf_counter() - t0)
            times[name].append(sum(t) / steps)
            passes[name], held[name] = p / steps, sam_bytes(opt)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated()
            log(f"round {r + 1}/{rounds} {name:14s} {times[name][-1]:.3f} s/step, {passes[name]:.1f} passes")
            del opt
    base = statistics.median(times["adamw"]) if "adamw" in times else None
    out = {}
    for n in names:
        out[n] = {"step_s": statistics.median(times[n]), "passes": passes[n], "sam_mb": held[n] / 2**20,
                  "ratio": statistics.median(times[n]) / base if base else None,
                  "ratio_per_round": [a / b for a, b in zip(times[n], times["adamw"])] if base else None,
                  "peak_extra_mb": (peak[n] - peak["adamw"]) / 2**20 if peak and "adamw" in peak else None,
                  "target": CONFIGS[n][2]}
    return out


def table(results: dict) -> str:
    lines = ["| configuration | s / step | x AdamW (per round) | passes / step | SAM holds (MB) | "
             "peak over AdamW (MB) | target |", "|---|---|---|---|---|---|---|"]
    for n, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"] or [])
        peak = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        target = "" if r["target"] is None else f"<= {r['target']}x " + ("met" if r["ratio"] <= r["target"] else "MISSED")
        lines.append(f"| {n} | {r['step_s']:.3f} | {r['ratio']:.2f} ({rounds}) | {r['passes']:.1f} | "
                     f"{r['sam_mb']:.0f} | {peak} | {target} |")
    return "\n".join(lines)


def main(model_name: str, items: int, max_len: int, precision: str, rounds: int, steps: int):
    import common
    import data
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = common.load_tokenizer(model_name)
    examples, _ = data.tokenize(data.load_records("gsm8k", limit=items), tok, max_len)
    plan = finetune.epoch_plan(examples, 4, 2, 1, 0, 0)         # micro-batch 4 x accumulation 2
    step_batches = [([data.collate([examples[j] for j in mb], tok.pad_token_id) for mb in step],
                     sum(finetune.n_targets(examples[j]) for mb in step for j in mb)) for step in plan]
    model = common.load_model(model_name, device=device).train()
    ctx = finetune.probe.autocast_ctx(precision, device)
    results = measure(model, step_batches, ctx, device, rounds=rounds, steps=steps)
    print(f"\n{model_name}, micro-batch 4 x accumulation 2, max len {max_len}, {precision} compute, "
          f"{rounds} interleaved rounds of {steps} timed steps, {torch.get_num_threads()} threads on {device}")
    print(table(results))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round: a smoke test")
    a = p.parse_args()
    if a.quick:
        a.model, a.items, a.precision, a.rounds = "tiny", 24, "fp32", 1
    main(a.model, a.items, a.max_len, a.precision, a.rounds, a.steps)
