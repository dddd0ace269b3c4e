"""2-D loss landscapes, the paper's flatness metrics (SC, AG, MAG) and Hessian sharpness.

    python landscape.py                                   # smollm2-135m, gsm8k, 5x5 grid on +-0.1
    python landscape.py --model runs/stage2/adamw --out runs/landscape/adamw --directions dirs.pt --hessian
    torchrun --nproc_per_node 8 landscape.py --model DIR --steps 21 --batches 16 --batch-size 8 \
        --max-len 512 --dtype bf16                        # a larger scan, grid points split over ranks
    python landscape.py --compare runs/landscape/a runs/landscape/b --out runs/landscape/compare

f(a, b) = L(theta0 + a*d1 + b*d2): L is the token-weighted mean masked SFT loss over a fixed set of
batches of --data; d1, d2 are seeded Gaussian directions, by default filter-normalised (Li et al.,
2018). The grid is linspace(-range, range, steps) on both axes and Z[i, j] = f(alphas[i], betas[j]).
Metrics (lower = flatter), finite differences on that grid with steps ha, hb:
  SC  = mean over interior points of |f_aa + f_bb|, central second differences      (nats / unit^2)
  AG  = mean over all points of sqrt(f_a^2 + f_b^2), np.gradient, 2nd order at edges (nats / unit)
  MAG = mean over rows i and j of |Z[i, j+1] - Z[i, j]| / hb (neighbours along rows) (nats / unit)
The paper's "%" is read here as 100 x these values (PERCENT_SCALE), an assumption stated in the README.
--dtype bf16 autocasts the forward passes (weights stay fp32); use it only where bf16 matmuls are
fast (GPUs, AMX CPUs).
"""
import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import common
from common import (atomic_path, cleanup_distributed, die, init_distributed, is_main, load_model,
                    load_tokenizer, log, write_json, write_text)

PERCENT_SCALE = 100.0


# ----------------------------------------------------------------------------- directions

def _params(model):
    return [p for _, p in model.named_parameters()]


def _filter_normalize(d, w):
    """Give every filter (row along dim 0) of d the norm of the same row of w; 1-D params -> 0."""
    if w.dim() <= 1:
        return torch.zeros_like(d)           # Li et al.: norms/biases are not perturbed
    wn = w.detach().float().flatten(1).norm(dim=1)
    dn = d.flatten(1).norm(dim=1)
    return d * (wn / (dn + 1e-10)).view(-1, *[1] * (d.dim() - 1))


def random_directions(model, seed=0, norm="filter"):
    """Two seeded Gaussian directions shaped like the model's parameters: (d1, d2), lists of tensors.

    Drawn on the CPU in fp32 (so a seed gives the same directions on any device), then
    filter-normalised (`norm="filter"`) or left raw (`norm="none"`, the paper's plain Gaussian).
    """
    if norm not in ("filter", "none"):
        raise ValueError(f"norm={norm!r}: use 'filter' or 'none'.")
    gen = torch.Generator().manual_seed(seed)
    dirs = []
    for _ in range(2):
        d = []
        for p in _params(model):
            x = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
            if norm == "filter":
                x = _filter_normalize(x, p)
            d.append(x.to(p.dtype))
        dirs.append(d)
    return dirs[0], dirs[1]


UNKNOWN_SEED, UNKNOWN_NORM = -1, "unknown"     # directions saved without their seed/norm


def save_directions(path, model, d1, d2, seed=None, norm=None):
    """Write d1, d2 for load_directions. seed/norm are stored as plain values (-1 / "unknown" when
    not given), so they land in surface.npz as numbers and strings, which --compare can read."""
    names = [n for n, _ in model.named_parameters()]
    obj = {"names": names, "seed": UNKNOWN_SEED if seed is None else int(seed),
           "norm": UNKNOWN_NORM if norm is None else str(norm),
           "d1": [t.detach().cpu() for t in d1], "d2": [t.detach().cpu() for t in d2]}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_directions(path, model):
    """(d1, d2, meta) from save_directions, on the model's devices/dtypes; ValueError if they don't fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"directions file {path} does not exist; omit --directions or pass a "
                                f"file written by an earlier run.")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    named = list(model.named_parameters())
    shapes_ok = obj["names"] == [n for n, _ in named] and all(
        tuple(a.shape) == tuple(p.shape) for a, (_, p) in zip(obj["d1"], named))
    if not shapes_ok:
        raise ValueError(f"directions file {path} was made for a model with different parameters; "
                         f"make new directions for this architecture (omit --directions).")
    d1, d2 = ([t.to(p.device, p.dtype) for t, (_, p) in zip(obj[k], named)] for k in ("d1", "d2"))
    seed, norm = obj.get("seed"), obj.get("norm")      # None in files written before -1/"unknown"
    return d1, d2, {"seed": UNKNOWN_SEED if seed is None else seed,
                    "norm": UNKNOWN_NORM if norm is None else norm}


# ----------------------------------------------------------------------------- surface

def serpentine(m, n):
    """Grid indices in boustrophedon order: every move is one step along one axis."""
    return [(i, j) for i in range(m) for j in (range(n) if i % 2 == 0 else reversed(range(n)))]


def _fmt_s(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


@torch.no_grad()
def surface(model, loss_fn, d1, d2, alphas, betas, *, progress=True):
    """Z[i, j] = loss_fn(model) at theta0 + alphas[i] d1 + betas[j] d2, a float64 numpy array.

    The weights walk the grid in place (serpentine: one `w += h d` per point) and are copied back
    bit-exactly at the end from a host-memory snapshot: device memory = model + d1 + d2, host
    memory = one more copy of the weights. Under torch.distributed each rank scans a contiguous
    chunk of the walk and Z is summed over ranks (each point is computed by exactly one rank).
    """
    alphas, betas = np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64)
    params = _params(model)
    low = sorted({str(p.dtype) for p in params if p.dtype not in (torch.float32, torch.float64)})
    if low:     # each in-place step would round to the low precision and the walk would drift
        raise ValueError(f"surface() walks the weights in place and needs float32/float64 parameters, "
                         f"got {', '.join(low)}; load the model in float32 and autocast the loss to "
                         f"bf16 instead (as landscape.py --dtype bf16 does).")
    rank, world = common.rank_world()
    mine = np.array_split(np.array(serpentine(len(alphas), len(betas))), world)[rank].tolist()
    Z = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    theta0 = [p.detach().to("cpu", copy=True) for p in params]
    a, b, t0 = 0.0, 0.0, time.time()
    every = max(1, len(mine) // 20)
    try:
        for k, (i, j) in enumerate(mine):
            for d, step in ((d1, alphas[i] - a), (d2, betas[j] - b)):
                if step != 0.0:
                    torch._foreach_add_(params, d, alpha=float(step))
            a, b = alphas[i], betas[j]
            Z[i, j] = float(loss_fn(model))
            if progress and ((k + 1) % every == 0 or k + 1 == len(mine)):
                rate = (k + 1) / (time.time() - t0)
                log(f"point {k + 1}/{len(mine)} | a {a:+.3f} b {b:+.3f} | loss {Z[i, j]:.4f} | "
                    f"{rate:.2f} pt/s | eta {_fmt_s((len(mine) - k - 1) / rate)}")
        # walk back to the origin only to measure the rounding drift of the walk, then copy back
        torch._foreach_add_(params, d1, alpha=-float(a))
        torch._foreach_add_(params, d2, alpha=-float(b))
        drift = max(float((p.float() - t.to(p.device).float()).abs().max()) for p, t in zip(params, theta0))
        log(f"scan done: max |w - theta0| after walking back {drift:.2e}; weights restored exactly")
    finally:
        for p, t in zip(params, theta0):
            p.copy_(t)
    if world > 1:
        Zd = Z.to(params[0].device)
        dist.all_reduce(Zd)
        Z = Zd.cpu()
    return Z.numpy()


# ----------------------------------------------------------------------------- metrics

def _step(x, name):
    h = np.diff(x)
    if len(x) < 3 or not (h[0] > 0 and np.allclose(h, h[0], rtol=1e-6, atol=0)):
        raise ValueError(f"{name} must be an increasing, evenly spaced grid of at least 3 points.")
    return float(h[0])


def flatness_metrics(Z, alphas, betas):
    """The paper's flatness metrics (Appendix A.3) on a uniform grid, Z[i, j] = f(alphas[i], betas[j]).

    ha, hb are the grid steps.
    sc  = mean_{interior i,j} |(Z[i+1,j] - 2Z[i,j] + Z[i-1,j]) / ha^2 + (Z[i,j+1] - 2Z[i,j] + Z[i,j-1]) / hb^2|
    ag  = mean_{all i,j} sqrt(Za^2 + Zb^2), (Za, Zb) = np.gradient(Z, alphas, betas, edge_order=2)
    mag = mean_{i, j<n-1} |Z[i,j+1] - Z[i,j]| / hb        (neighbours along the rows, i.e. along d2)
    For f = p a^2 + q b^2 on symmetric odd grids of radii ra, rb: sc = 2|p + q|, mag = |q| rb,
    and with q = 0, ag = |p| ra (m + 1) / m. Values are in loss units (nats) per unit of a, b.
    """
    Z = np.asarray(Z, dtype=np.float64)
    alphas, betas = np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64)
    if Z.shape != (len(alphas), len(betas)):
        raise ValueError(f"Z has shape {Z.shape}, expected (len(alphas), len(betas)) = "
                         f"({len(alphas)}, {len(betas)}).")
    ha, hb = _step(alphas, "alphas"), _step(betas, "betas")
    c = Z[1:-1, 1:-1]
    f_aa = (Z[2:, 1:-1] - 2 * c + Z[:-2, 1:-1]) / ha ** 2
    f_bb = (Z[1:-1, 2:] - 2 * c + Z[1:-1, :-2]) / hb ** 2
    g_a, g_b = np.gradient(Z, alphas, betas, edge_order=2)
    return {"sc": float(np.mean(np.abs(f_aa + f_bb))),
            "ag": float(np.mean(np.hypot(g_a, g_b))),
            "mag": float(np.mean(np.abs(np.diff(Z, axis=1))) / hb)}


# ----------------------------------------------------------------------------- Hessian

@contextlib.contextmanager
def _double_backward(model):
    """Fused attention kernels (SDPA) have no second derivative: switch to eager attention meanwhile."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        with torch.enable_grad():
            yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


def _hvp(model, loss_fn, params, v):
    """H v of loss_fn at the current weights, summed batch by batch when loss_fn has `terms`."""
    terms = loss_fn.terms(model) if hasattr(loss_fn, "terms") else [(1.0, loss_fn(model))]
    out = [torch.zeros_like(p) for p in params]
    for w, loss in terms:
        g = torch.autograd.grad(loss, params, create_graph=True)
        torch._foreach_add_(out, torch.autograd.grad(g, params, grad_outputs=v), alpha=w)
    return out


def _dot(x, y):
    return float(sum((a.double() * b.double()).sum() for a, b in zip(x, y)))


def hessian_top_eigenvalue(model, loss_fn, iters=20, tol=1e-4, seed=0):
    """Dominant (largest-magnitude) Hessian eigenvalue by power iteration on Hessian-vector products.

    loss_fn(model) returns a differentiable scalar, or loss_fn.terms(model) yields (weight, loss)
    pairs whose weighted sum is the loss (one graph per batch). Stops when the Rayleigh quotient
    changes by less than tol (relative) or after `iters` products.
    """
    params = [p for p in _params(model) if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
    lam = None
    with _double_backward(model):
        for it in range(iters):
            torch._foreach_div_(v, math.sqrt(_dot(v, v)))
            hv = _hvp(model, loss_fn, params, v)
            new, v = _dot(hv, v), hv
            log(f"power iteration {it + 1}/{iters} | lambda_max {new:.5g}")
            if lam is not None and abs(new - lam) <= tol * abs(new):
                return new
            lam = new
    log(f"power iteration did not converge to {tol:g} in {iters} steps; raise --hessian-iters")
    return lam


def hessian_trace(model, loss_fn, samples=10, seed=0):
    """Hutchinson estimate of tr(H) = E[v^T H v], v Rademacher: returns (mean, standard error or None).

    Under torch.distributed the samples are split across ranks and gathered.
    """
    params = [p for p in _params(model) if p.requires_grad]
    rank, world = common.rank_world()
    vals = torch.zeros(samples, dtype=torch.float64)
    with _double_backward(model):
        for s in range(rank, samples, world):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
            v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype) for p in params]
            vals[s] = _dot(_hvp(model, loss_fn, params, v), v)
            log(f"hutchinson sample {s + 1}/{samples} | v^T H v {vals[s]:.5g}")
    if world > 1:
        vd = vals.to(params[0].device)
        dist.all_reduce(vd)
        vals = vd.cpu()
    se = float(vals.std() / math.sqrt(samples)) if samples > 1 else None
    return float(vals.mean()), se


# ----------------------------------------------------------------------------- the SFT loss

class SFTLoss:
    """Mean next-token loss over the answer tokens of a fixed list of batches: the f of the surface."""

    def __init__(self, batches, compute_dtype=torch.float32):
        counts = [int((b["labels"][:, 1:] != common.IGNORE).sum()) for b in batches]
        if sum(counts) == 0:
            raise ValueError("the evaluation batches contain no answer tokens (all labels are -100).")
        keep = [k for k, c in enumerate(counts) if c]
        self.batches, self.weights = [batches[k] for k in keep], [1 / sum(counts)] * len(keep)
        self.dtype = compute_dtype

    def terms(self, model):
        device = next(model.parameters()).device
        for w, batch in zip(self.weights, self.batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                yield w, common.token_loss(logits, batch["labels"])

    def __call__(self, model):
        with torch.no_grad():
            return sum(w * float(loss) for w, loss in self.terms(model))


def eval_batches(data, tokenizer, batches, batch_size, max_len, template="alpaca", seed=0):
    import data as data_lib
    records = data_lib.load_records(data, limit=batches * batch_size, seed=seed)
    examples, _ = data_lib.tokenize(records, tokenizer, max_len, template=template)
    if not examples:
        raise ValueError(f"--data {data}: no usable examples at --max-len {max_len}; raise --max-len.")
    return [data_lib.collate(examples[k:k + batch_size], tokenizer.pad_token_id)
            for k in range(0, len(examples), batch_size)]


# ----------------------------------------------------------------------------- figures and tables

def _figure(*size):
    plt = common.pyplot()
    return plt, plt.figure(figsize=size)


def _save(plt, fig, path):
    common.save_png(fig, path, crop=True)


def _draw(fig, where, r, norm, title=None):
    """Contour at subplot `where[0]` and 3-D surface at `where[1]` (either may be None)."""
    A, B = np.meshgrid(r["alphas"], r["betas"], indexing="ij")
    cs = None
    if where[0]:
        ax = fig.add_subplot(*where[0])
        levels = np.linspace(norm.vmin, norm.vmax, 21)
        cs = ax.contourf(A, B, r["Z"], levels=levels, cmap="viridis", norm=norm, extend="both")
        ax.contour(A, B, r["Z"], levels=levels, colors="k", linewidths=0.3)
        ax.set(title=title, xlabel="alpha (d1)", ylabel="beta (d2)", aspect="equal")
    if where[1]:
        ax3 = fig.add_subplot(*where[1], projection="3d")
        ax3.plot_surface(A, B, r["Z"], cmap="viridis", norm=norm, linewidth=0)
        ax3.set(title=title if not where[0] else None, xlabel="alpha", ylabel="beta", zlabel="loss",
                zlim=(norm.vmin, norm.vmax))
    return cs


def _norm(zs):
    from matplotlib.colors import Normalize
    return Normalize(min(float(np.min(z)) for z in zs), max(float(np.max(z)) for z in zs))


def plot_single(r, out):
    """contour.png and surface3d.png of one run, in the manner of the paper's Fig. 1."""
    norm = _norm([r["Z"]])
    plt, fig = _figure(5.5, 4.5)
    fig.colorbar(_draw(fig, ((1, 1, 1), None), r, norm), label="loss (nats)", format="%.3g")
    _save(plt, fig, out / "contour.png")
    plt, fig = _figure(5.5, 4.5)
    _draw(fig, (None, (1, 1, 1)), r, norm)
    _save(plt, fig, out / "surface3d.png")


def plot_runs(runs, path):
    """Contours (top row) and 3-D surfaces (bottom row) of several runs on one colour scale."""
    norm, k = _norm([r["Z"] for _, r in runs]), len(runs)
    plt, fig = _figure(5.2 * k + 1, 9)
    for i, (label, r) in enumerate(runs):
        cs = _draw(fig, ((2, k, i + 1), (2, k, k + i + 1)), r, norm, title=label)
    fig.subplots_adjust(wspace=0.35)
    fig.colorbar(cs, ax=fig.axes, shrink=0.6, label="loss (nats)", format="%.3g")
    _save(plt, fig, path)


def metrics_table(rows):
    """Markdown in the layout of the paper's Table 1: one row per model, SC / AG / MAG (x100)."""
    hess = any(r.get("hessian_top_eigenvalue") is not None for r in rows)
    head = "| model | SC | AG | MAG |" + (" lambda_max | tr(H) |" if hess else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["model"]] + [f"{PERCENT_SCALE * r[k]:.2f}" for k in ("sc", "ag", "mag")]
        if hess:
            for k in ("hessian_top_eigenvalue", "hessian_trace"):
                cells.append("-" if r.get(k) is None else f"{r[k]:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"SC, AG, MAG in % = {PERCENT_SCALE:g} x (nats per unit^2 for SC, nats per unit for AG and "
                 f"MAG) of the direction coefficients; lower is flatter. lambda_max, tr(H) in nats per unit^2 "
                 f"of the raw weights.")
    return "\n".join(lines) + "\n"


def compare_runs(dirs, out, labels=None):
    """Side-by-side figure on one colour scale and the Table-1-style metrics table of several runs."""
    if labels and len(labels) != len(dirs):
        die(f"--labels has {len(labels)} names for {len(dirs)} --compare folders; give one per folder.")
    runs, rows = [], []
    for k, d in enumerate(dirs):
        d = Path(d)
        if not (d / "surface.npz").is_file() or not (d / "metrics.json").is_file():
            die(f"--compare {d}: no surface.npz/metrics.json there; pass folders written by landscape.py.")
        label = labels[k] if labels else d.name
        with np.load(d / "surface.npz") as z:     # only the grid: older files hold object arrays
            if not {"Z", "alphas", "betas"} <= set(z.files):
                die(f"--compare {d}: surface.npz lacks Z/alphas/betas; rerun landscape.py for it.")
            runs.append((label, {k2: z[k2] for k2 in ("Z", "alphas", "betas")}))
        rows.append({**json.loads((d / "metrics.json").read_text()), "model": label, "dir": str(d)})
    if len({(r["seed"], r["norm"], r["radius"], r["steps"]) for r in rows}) > 1:
        log("note: the runs differ in seed/norm/range/steps; their surfaces are not along the same grid.")
    out = Path(out)
    plot_runs(runs, out / "compare.png")
    table = metrics_table(rows)
    print(table, end="")
    write_text(out / "table.md", table)
    write_json(out / "table.json", {"percent_scale": PERCENT_SCALE, "rows": rows})
    return rows


# ----------------------------------------------------------------------------- main

def prepare(model, data, batches, batch_size, max_len, template, data_seed, dtype, seed, norm,
            directions, device):
    """(net, loss_fn, d1, d2, seed, norm): the model, its fixed evaluation loss and the directions."""
    try:
        tok = load_tokenizer(model)
        net = load_model(model, device=device)
        loss_fn = SFTLoss(eval_batches(data, tok, batches, batch_size, max_len, template, data_seed),
                          torch.bfloat16 if dtype == "bf16" else torch.float32)
        if directions and Path(directions).exists():
            d1, d2, meta = load_directions(directions, net)
            seed, norm = meta["seed"], meta["norm"]
            log(f"directions from {directions} (seed {seed}, norm {norm}; --seed/--norm ignored)")
        else:
            d1, d2 = random_directions(net, seed, norm)
            if directions and is_main():
                save_directions(directions, net, d1, d2, seed, norm)
    except (OSError, ValueError) as e:
        die(str(e))
    return net, loss_fn, d1, d2, seed, norm


def main(model: str = "smollm2-135m", data: str = "gsm8k", out: str | None = None, radius: float = 0.1,
         steps: int = 5, norm: str = "filter", seed: int = 0, directions: str | None = None,
         batches: int = 1, batch_size: int = 4, max_len: int = 192, data_seed: int = 0,
         template: str = "alpaca", dtype: str = "fp32", hessian: bool = False, hessian_iters: int = 20,
         hutchinson_samples: int = 10, compare: list | None = None, labels: list | None = None) -> dict:
    args = dict(locals())
    if compare:
        out = Path(out or "runs/landscape/compare")
        rows = compare_runs(compare, out, labels)
        write_json(out / "args.json", args)
        return {"rows": rows}
    if steps < 3 or radius <= 0 or batches < 1 or batch_size < 1:
        die("--steps must be >= 3 and --range, --batches, --batch-size positive.")
    out = Path(out or f"runs/landscape/{Path(model).name}")
    rank, world, device = init_distributed()
    t0 = time.time()
    net, loss_fn, d1, d2, seed, norm = prepare(model, data, batches, batch_size, max_len, template,
                                               data_seed, dtype, seed, norm, directions, device)
    n_tok = sum(int((b["labels"][:, 1:] != common.IGNORE).sum()) for b in loss_fn.batches)
    log(f"{model}: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M params | {len(loss_fn.batches)} "
        f"batches, {n_tok} answer tokens | {steps}x{steps} grid on +-{radius} | {world} rank(s)")
    alphas = betas = np.linspace(-radius, radius, steps)
    center = loss_fn(net)
    Z = surface(net, loss_fn, d1, d2, alphas, betas)
    metrics = {**flatness_metrics(Z, alphas, betas), "percent_scale": PERCENT_SCALE,
               "loss_center": center, "loss_min": float(Z.min()), "loss_max": float(Z.max()),
               "model": model, "data": data, "answer_tokens": n_tok, "seed": seed, "norm": norm,
               "directions": directions, "radius": radius, "steps": steps, "dtype": dtype,
               "hessian_top_eigenvalue": None, "hessian_trace": None, "hessian_trace_se": None}
    if hessian:
        metrics["hessian_top_eigenvalue"] = hessian_top_eigenvalue(net, loss_fn, hessian_iters, seed=seed)
        metrics["hessian_trace"], metrics["hessian_trace_se"] = hessian_trace(
            net, loss_fn, hutchinson_samples, seed=seed)
    metrics["seconds"] = round(time.time() - t0, 1)
    if is_main():
        with atomic_path(out / "surface.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, Z=Z, alphas=alphas, betas=betas, seed=seed, norm=norm, radius=radius)
        write_json(out / "metrics.json", metrics)
        write_json(out / "args.json", args)
        plot_single({"Z": Z, "alphas": alphas, "betas": betas}, out)
        log(metrics_table([{**metrics, "model": Path(model).name}]), end="")
        log(f"wrote {out}/ (surface.npz, metrics.json, args.json, contour.png, surface3d.png)")
    cleanup_distributed()
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    """The flags below, and `--config FILE` (YAML/JSON, args.json too: runconfig.py) under them."""
    import runconfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF folder | hub name")
    p.add_argument("--data", default="gsm8k", help="data set name or .jsonl whose SFT loss is f")
    p.add_argument("--out", default=None, help="output folder (default runs/landscape/<model name>)")
    p.add_argument("--range", dest="radius", metavar="R", type=float, default=0.1, help="grid is [-range, range]^2")
    p.add_argument("--steps", type=int, default=5, help="grid points per axis (larger scans: 21)")
    p.add_argument("--norm", choices=["filter", "none"], default="filter")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions")
    p.add_argument("--directions", default=None, help=".pt file: loaded if it exists, else written")
    p.add_argument("--batches", type=int, default=1, help="evaluation batches in f (larger scans: 16)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=192)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation sample of --data")
    p.add_argument("--template", default="alpaca", help="prompt template (see data.py)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype; weights stay fp32")
    p.add_argument("--hessian", action="store_true", help="also top Hessian eigenvalue and trace")
    p.add_argument("--hessian-iters", type=int, default=20, help="power-iteration steps")
    p.add_argument("--hutchinson-samples", type=int, default=10, help="Rademacher samples for the trace")
    p.add_argument("--compare", nargs="+", default=None, help="landscape folders to draw and tabulate")
    p.add_argument("--labels", nargs="+", default=None, help="names of the --compare folders")
    return runconfig.parse(p, argv)


if __name__ == "__main__":
    main(**vars(parse_args()))
