"""Benchmark of SAM's cost: the perturbation primitive, the step time, the extra memory.

    python bench/bench_sam.py                    # CPU, full sizes (~6 GB RAM, a few minutes)
    python bench/bench_sam.py --device cuda      # on a GPU: adds the Triton kernels
    python bench/bench_sam.py --quick            # smoke test: small shapes, the `tiny` model

Prints one Markdown table and writes it, the numbers (bench.json) and args.json to --out.
1. perturb + restore (norm, w <- w + s g keeping a copy, copy back) on the parameter shapes of one
   Llama-2-7B decoder layer (202M fp32 parameters), as a share of the bandwidth of a plain copy
   measured in the same run, counting the 7 x 4 bytes per parameter the primitive must move
   (read g for the norm; read w, g and write w, copy; read copy, write w);
2. one SAM step / one AdamW step on SmolLM2-135M, bf16 autocast (fp32 where bf16 is emulated), micro-batch 4 x 256 tokens of
   random token ids, timed alternately so both see the same machine load;
3. extra memory of SAM over AdamW in units of the parameter bytes: the bytes of the tensors the
   optimizer object holds (state, copies, buffers; not the parameters or their gradients) at the
   step's peak, i.e. right after first_step for SAM and after step() for AdamW. On CUDA also the
   allocator's peak over a whole step (torch.cuda.max_memory_allocated) minus AdamW's.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import kernels  # noqa: E402
from probe import resolve_precision  # noqa: E402
from sam import SAM  # noqa: E402

LLAMA7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 3 + [(4096,)] * 2
QUICK_LAYER = [(512, 512)] * 4 + [(1376, 512)] * 3 + [(512,)] * 2
PRIMITIVE_BYTES = 7         # x element size: what perturb + restore must move per parameter


def timed(fn, device, repeats):
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- 1. the primitive

def loop_with_clones(ws, gs, bs, rho):
    """The common per-parameter pattern: a norm per tensor, a fresh clone per tensor."""
    norm = torch.stack([g.norm(2) for g in gs]).norm(2)
    scale = rho / (norm + 1e-12)
    olds = []
    for w, g in zip(ws, gs):
        olds.append(w.clone())
        w.add_(g * scale)
    for w, old in zip(ws, olds):
        w.copy_(old)


def plain_foreach(ws, gs, bs, rho):
    """Straightforward torch._foreach code: copy, scale into a temporary, add, copy back."""
    norm = torch.stack(torch._foreach_norm(gs)).norm(2)
    scale = rho / (norm + 1e-12)
    torch._foreach_copy_(bs, ws)
    torch._foreach_add_(ws, torch._foreach_mul(gs, scale))
    torch._foreach_copy_(ws, bs)


def flattune(path):
    def run(ws, gs, bs, rho):
        scale = rho / (kernels.sum_squares(gs, backend=path).sqrt() + 1e-12)
        kernels.perturb_(ws, gs, bs, scale, backend=path)
        kernels.restore_(ws, bs, backend=path)
    return run


def bench_primitive(shapes, device, repeats):
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(s, device=device, generator=gen) for s in shapes]
    gs = [torch.randn(s, device=device, generator=gen) for s in shapes]
    bs = [torch.empty_like(w) for w in ws]
    n = sum(w.numel() for w in ws)

    def plain_copy():
        for b, w in zip(bs, ws):
            b.copy_(w)
    t_copy = timed(plain_copy, device, repeats)
    copy_bw = 2 * 4 * n / t_copy
    rows = [("plain copy of the same tensors (bandwidth reference)", t_copy,
             f"{copy_bw / 1e9:.1f} GB/s", "")]
    approaches = [("per-parameter loop, fresh clones", loop_with_clones, 10),
                  ("torch._foreach: copy, mul, add, copy", plain_foreach, 10),
                  ("flattune kernels, torch path", flattune("torch"), 8)]
    if device.type == "cuda" and kernels.HAVE_TRITON:
        approaches.append(("flattune kernels, Triton", flattune("triton"), 7))
    for name, fn, own_bytes in approaches:
        t = timed(lambda: fn(ws, gs, bs, 2.0), device, repeats)
        share = PRIMITIVE_BYTES * 4 * n / t / copy_bw
        target = ">= 90% (85% Triton on GPU)" if name.startswith("flattune") else ""
        rows.append((f"{name} (its ops move {own_bytes} x 4 B/param)", t, f"{share:.0%} of copy", target))
    return n, rows


# ----------------------------------------------------------------------------- 2. and 3. steps

class PerParameterSAM:
    """The algorithm of the widely used PyTorch SAM wrapper, for comparison: a clone per
    parameter kept in the optimizer state, restored by assigning p.data (which FSDP2 forbids)."""

    def __init__(self, params, rho, **kw):
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = torch.optim.AdamW(self.params, **kw)
        self.state, self.rho = {}, rho

    @torch.no_grad()
    def first_step(self, zero_grad=True):
        with_grad = [p for p in self.params if p.grad is not None]
        norm = torch.stack([p.grad.norm(2) for p in with_grad]).norm(2)
        for p in with_grad:
            self.state[p] = p.data.clone()
            p.add_(p.grad * (self.rho / (norm + 1e-12)))
        if zero_grad:
            self.base_optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad=True):
        for p, old in self.state.items():
            p.data = old
        self.base_optimizer.step()
        if zero_grad:
            self.base_optimizer.zero_grad(set_to_none=True)


def held_bytes(obj, skip_ids, seen=None, depth=0):
    """Bytes of the distinct tensor storages reachable from an optimizer's attributes."""
    seen = set() if seen is None else seen
    if torch.is_tensor(obj):
        if id(obj) in skip_ids or obj.untyped_storage().data_ptr() in seen:
            return 0
        seen.add(obj.untyped_storage().data_ptr())
        return obj.untyped_storage().nbytes()
    if depth > 6:
        return 0
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif isinstance(obj, (torch.optim.Optimizer, PerParameterSAM)):
        items = list(vars(obj).values())
    else:
        return 0
    return sum(held_bytes(x, skip_ids, seen, depth + 1) for x in items)


def make_step(kind, model, opt, ids, autocast_device, memory, precision):
    def loss_backward():
        with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    skip = {id(p) for p in model.parameters()}

    def step():
        loss_backward()
        if kind == "adamw":
            opt.step()
            memory.append(held_bytes(opt, skip))
            opt.zero_grad(set_to_none=True)
            return
        opt.first_step(zero_grad=True)
        memory.append(held_bytes(opt, skip))        # SAM's peak: the copy of w is held now
        loss_backward()
        opt.second_step(zero_grad=True)
    return step


def bench_steps(model_name, batch, seq, device, repeats, precision):
    model = common.load_model(model_name, device=device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    kw = dict(lr=1e-7, weight_decay=0.0)
    optimizers = {"adamw": torch.optim.AdamW(params, **kw),
                  "per-parameter SAM wrapper": PerParameterSAM(params, rho=2.0, **kw),
                  "SAM, flattune": SAM(params, torch.optim.AdamW, rho=2.0, **kw)}
    memory = {k: [] for k in optimizers}
    steps = {k: make_step(k, model, opt, ids, device.type, memory[k], precision) for k, opt in optimizers.items()}
    times, cuda_peak = {k: [] for k in steps}, {k: 0 for k in steps}
    for k, step in steps.items():       # warm-up: allocates optimizer state and buffers
        step()
    for _ in range(repeats):            # alternate, so every optimizer sees the same load
        for k, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                cuda_peak[k] = max(cuda_peak[k], torch.cuda.max_memory_allocated() - base)
            times[k].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in times.items()}
    held = {k: max(v) for k, v in memory.items()}
    rows = []
    for k in steps:
        ratio = t[k] / t["adamw"]
        rows.append((f"step: {k}", t[k], f"{ratio:.2f}x AdamW",
                     "<= 2.05" if k == "SAM, flattune" else ""))
    for k in steps:
        if k == "adamw":
            continue
        extra = (held[k] - held["adamw"]) / param_bytes
        note = f"{extra:.2f}x param bytes (held by the optimizer)"
        if device.type == "cuda":
            note += f"; {(cuda_peak[k] - cuda_peak['adamw']) / param_bytes:.2f}x (allocator peak)"
        rows.append((f"extra memory: {k}", None, note,
                     "<= 1.0" if k == "SAM, flattune" else ""))
    return sum(p.numel() for p in params), rows


def main(device: str = "cpu", quick: bool = False, repeats: int = 0, model: str = "",
         out: str = "results/bench_sam", precision: str = "auto") -> list:
    device = torch.device(device)
    precision = resolve_precision(precision, device)     # bf16 only where it has matrix units
    if device.type == "cuda" and not torch.cuda.is_available():
        common.die("--device cuda: no GPU is visible; run on a GPU machine or use --device cpu.")
    repeats = repeats or (1 if quick else 5)
    model = model or ("tiny" if quick else "smollm2-135m")
    batch, seq = (2, 64) if quick else (4, 256)
    shapes = QUICK_LAYER if quick else LLAMA7B_LAYER
    n, rows = bench_primitive(shapes, device, repeats)
    head = [(f"perturb+restore, {len(shapes)} tensors of a Llama-2-7B layer"
             f"{' (scaled down)' if quick else ''}, {n / 1e6:.0f}M fp32 params", None, "", "")]
    n_model, step_rows = bench_steps(model, batch, seq, device, repeats, precision)
    head2 = [(f"{model} ({n_model / 1e6:.0f}M params), {precision} compute, micro-batch {batch} x {seq}",
              None, "", "")]
    table = ["| measurement | ms | result | target |", "|---|---:|---|---|"]
    for name, t, result, target in head + rows + head2 + step_rows:
        ms = "" if t is None else f"{t * 1e3:.1f}"
        table.append(f"| {name} | {ms} | {result} | {target} |")
    text = f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}\n\n" \
           + "\n".join(table) + "\n"
    print(text, flush=True)
    common.write_text(Path(out) / "table.md", text)
    common.write_json(Path(out) / "bench.json", {"rows": head + rows + head2 + step_rows})
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes and the tiny model")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (default 5; 1 quick)")
    parser.add_argument("--model", default="", help="model for the step timing "
                        "(default smollm2-135m; tiny with --quick)")
    parser.add_argument("--out", default="results/bench_sam", help="folder for table.md, bench.json")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="step compute: auto = bf16 on GPUs and CPUs with bf16 units, else fp32")
    args = parser.parse_args()
    common.write_json(Path(args.out) / "args.json", vars(args))
    main(**vars(args))
