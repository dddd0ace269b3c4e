"""SAM's perturbation as multi-tensor kernels: Triton on CUDA, `torch._foreach_*` everywhere else.

Five primitives over lists of tensors (a model's parameters or their local shards):

  sum_squares(xs)                      sum_i ||x_i||^2 in fp32, one Triton launch for the whole list
  asam_sums(grads, params)             [sum g^2, sum (|w| g)^2, sum (w^2 g)^2] in one pass (ASAM)
  perturb_(ws, gs, backups, sumsq, rho)  backups <- w; w += s * g with s = perturb_scale(sumsq, rho)
                                       = rho / (sqrt(sumsq) + eps), a 0-dim tensor formed on the device
                                       (no host sync); `adaptive` uses s * w^2 * g
  restore_(ws, backups)                w <- backups, bit for bit
  add_(ws, ds, alpha)                  w += alpha * d (landscape.py moves weights along directions)

Each primitive has its own Triton kernel (launcher and torch reference side by side below), and
each covers a whole list in one launch: a small device table holds the tensors'
addresses and sizes, and every program looks up which tensor and which chunk of it to work on.
Lists that mix dtypes or devices get one launch per (device, dtype) group.

Which path runs: `FLATTUNE_KERNELS=auto` (default) takes Triton for CUDA tensors when triton is
importable and the reference otherwise; `torch` forces the reference; `triton` forces Triton, which
on CPU tensors needs the interpreter (`TRITON_INTERPRET=1`; the tests use it). The choice is made
per (device, dtype) group, so in a list that mixes CUDA and CPU tensors the CPU ones always take the
reference unless `triton` is forced with the interpreter on. Every function also takes `backend=`
to override the variable for one call. Kernels are decorated on first use, so the
interpreter setting in force at that moment applies, whenever triton was imported.
"""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:     # triton absent (macOS, minimal installs): the reference does everything
    triton = None
    HAVE_TRITON = False

    class tl:           # the kernels' annotations still need `tl.constexpr` to evaluate
        constexpr = None

BACKENDS = ("auto", "triton", "torch")
BLOCK = 1024        # elements per vector operation in a program
ITERS = 8           # blocks per program: one program covers BLOCK * ITERS elements of one tensor
VEC = 16            # masks keep VEC-element groups whole, so fp32 and bf16 get 16-byte accesses
NUM_WARPS = 4       # per program on a GPU (bench/gpu_check.py sweeps BLOCK, ITERS and this)
CPU_PIECE = 1 << 19  # reference perturb on CPU works in cache-sized pieces (see _pieces)
GPU_PIECE = 1 << 24  # ... and on GPUs in pieces that bound the adaptive temporaries
_TABLE_CACHE_SIZE = 64


# ----------------------------------------------------------------------------- path selection

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _choice(backend: str | None) -> str:
    choice = (backend or os.environ.get("FLATTUNE_KERNELS") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"FLATTUNE_KERNELS={choice!r} is not a kernel backend; use one of "
                         f"{', '.join(BACKENDS)}.")
    return choice


def _kernel_runs_on(device, choice: str) -> bool:
    """Whether a Triton launch may take tensors on `device`: a compiled kernel needs CUDA pointers;
    CPU tensors only go through the interpreter, and only when `triton` is forced."""
    return device.type == "cuda" or (choice == "triton" and _interpreting())


def backend(tensors, backend: str | None = None) -> str:
    """"triton" or "torch": the path these tensors take under FLATTUNE_KERNELS (or `backend`).

    "triton" when at least one (device, dtype) group of them runs a kernel; the launchers still
    send each group that cannot (CPU tensors without the interpreter) to the reference."""
    choice = _choice(backend)
    if choice == "torch" or not tensors:
        return "torch"
    on_cuda = any(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if HAVE_TRITON and on_cuda else "torch"
    if not HAVE_TRITON:
        raise RuntimeError("FLATTUNE_KERNELS=triton but triton is not installed; install it or use "
                           "FLATTUNE_KERNELS=torch.")
    if not on_cuda and not _interpreting():
        raise RuntimeError("FLATTUNE_KERNELS=triton on CPU tensors needs the Triton interpreter; set "
                           "TRITON_INTERPRET=1 (or use FLATTUNE_KERNELS=torch).")
    return "triton"


_TL_DTYPES = {}
if HAVE_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _check_lists(name, first, *others):
    for other in others:
        if len(other) != len(first):
            raise ValueError(f"{name}: the tensor lists have different lengths "
                             f"({len(first)} and {len(other)}).")
        for a, b in zip(first, other):
            if a.shape != b.shape or a.device != b.device:
                raise ValueError(f"{name}: paired tensors must have the same shape and device, got "
                                 f"{tuple(a.shape)} on {a.device} and {tuple(b.shape)} on {b.device}.")


def _groups(*lists):
    """Indices grouped by (device, dtypes), so each group is one kernel launch."""
    out = {}
    for i, ts in enumerate(zip(*lists)):
        out.setdefault((ts[0].device,) + tuple(t.dtype for t in ts), []).append(i)
    return list(out.values())


def _triton_ok(*ts) -> bool:
    return all(t.dtype in _TL_DTYPES and t.is_contiguous() for t in ts)


# ----------------------------------------------------------------------------- Triton kernels
# Plain functions, decorated with triton.jit on first use (see _jit). Every program handles one
# chunk of at most BLOCK * ITERS elements of one tensor; the chunk table holds, per program, the
# tensor's index, the chunk's first element and its end. The chunks cover each tensor's first
# n - n % VEC elements, so every mask bound is a multiple of VEC and the compiler can use 16-byte
# vector accesses (a mask against an arbitrary n forbids them); the few trailing elements of a
# tensor whose size is not a multiple of VEC go through the torch reference on views (_tails).
# Every kernel finds its chunk with _chunk, passed in as CHUNK = _jit(_chunk) so that it is made
# under the same interpreter setting as the kernel; loop bounds use plain arithmetic rather than
# tl.cdiv, since each nested jit call costs the interpreter about 2 ms per program.

def _chunk(chunks, n_chunks, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """(tensor index, first element, end, number of BLOCKs) of this program's chunk."""
    pid = tl.program_id(0)
    start = tl.multiple_of(tl.load(chunks + n_chunks + pid), BLOCK)
    stop = tl.multiple_of(tl.load(chunks + 2 * n_chunks + pid), VEC)
    return tl.load(chunks + pid), start, stop, (stop - start + BLOCK - 1) // BLOCK


def _sumsq_kernel(ptrs, n_tensors, chunks, partials, n_chunks,
                  X_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, WEIGHTED: tl.constexpr,
                  ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr):
    # partials[pid] = sum x^2; WEIGHTED adds sum (|w| x)^2 and sum (w^2 x)^2 in rows 1 and 2
    acc_g = tl.full([BLOCK], 0.0, tl.float32)
    acc_wg = tl.full([BLOCK], 0.0, tl.float32)
    acc_wwg = tl.full([BLOCK], 0.0, tl.float32)
    t, start, stop, n_blocks = CHUNK(chunks, n_chunks, BLOCK, VEC)
    x_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(X_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    for i in range(n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < stop
        g = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_g += g * g
        if WEIGHTED:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc_wg += (w * g) * (w * g)
            acc_wwg += (w * w * g) * (w * w * g)
    # tl.reduce with tl.sum's own combine function, not tl.sum: tl.sum is a jit function made when
    # triton was imported, which the interpreter cannot call if that was not under TRITON_INTERPRET
    pid = tl.program_id(0)
    tl.store(partials + pid, tl.reduce(acc_g, 0, tl.standard._sum_combine))
    if WEIGHTED:
        tl.store(partials + n_chunks + pid, tl.reduce(acc_wg, 0, tl.standard._sum_combine))
        tl.store(partials + 2 * n_chunks + pid, tl.reduce(acc_wwg, 0, tl.standard._sum_combine))


def _perturb_kernel(ptrs, n_tensors, chunks, n_chunks, scale_ptr,
                    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr):
    # b <- w; w += s * g (s * w^2 * g when ADAPTIVE), with s = scale[0] from perturb_scale
    t, start, stop, n_blocks = CHUNK(chunks, n_chunks, BLOCK, VEC)
    w_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(G_DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    s = tl.load(scale_ptr)
    for i in range(n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < stop
        w_raw = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(b_ptr + offs, w_raw, mask=mask)
        w = w_raw.to(tl.float32)
        e = s * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ADAPTIVE:
            e = e * w * w
        tl.store(w_ptr + offs, (w + e).to(W_DTYPE), mask=mask)


def _add_kernel(ptrs, n_tensors, chunks, n_chunks, alpha_ptr,
                W_DTYPE: tl.constexpr, D_DTYPE: tl.constexpr, ALIGN: tl.constexpr,
                BLOCK: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr):
    # w += alpha[0] * d, in fp32, rounded once to w's dtype
    a = tl.load(alpha_ptr)
    t, start, stop, n_blocks = CHUNK(chunks, n_chunks, BLOCK, VEC)
    w_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    d_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(D_DTYPE)), ALIGN)
    for i in range(n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        w = tl.load(w_ptr + offs, mask=offs < stop, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=offs < stop, other=0.0).to(tl.float32)
        tl.store(w_ptr + offs, (w + a * d).to(W_DTYPE), mask=offs < stop)


def _copy_kernel(ptrs, n_tensors, chunks, n_chunks, DTYPE: tl.constexpr,
                 ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr):
    # dst <- src, bit for bit (restore_)
    t, start, stop, n_blocks = CHUNK(chunks, n_chunks, BLOCK, VEC)
    dst = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(DTYPE)), ALIGN)
    src = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    for i in range(n_blocks):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < stop), mask=offs < stop)


_JITTED = {}


def _jit(fn):
    """triton.jit(fn), made once per interpreter setting (the decorator reads TRITON_INTERPRET)."""
    key = (fn.__name__, _interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


# ----------------------------------------------------------------------------- launch tables

_TABLES = {}


def _to_device(values, device):
    """A small int64 table on `device` without a host sync (pinned host copy, kept alive in cache)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device), None
    host = host.pin_memory()
    return host.to(device, non_blocking=True), host


def _cached(key, make):
    if key not in _TABLES:
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = make()
    return _TABLES[key][0]


def _launch_tables(lists):
    """(pointer table [k*T], chunk table [3*P], P, alignment 16 or 1) for parallel lists: the chunks cover each
    tensor's first n - n % VEC elements in pieces of at most BLOCK * ITERS (tensor, start, stop)."""
    first = lists[0]
    device = first[0].device
    numels = tuple(t.numel() for t in first)
    per = BLOCK * ITERS

    def make_chunks():
        tensor_ids, starts, stops = [], [], []
        for i, n in enumerate(numels):
            n_vec = n - n % VEC
            for s in range(0, n_vec, per):
                tensor_ids.append(i)
                starts.append(s)
                stops.append(min(s + per, n_vec))
        return _to_device(tensor_ids + starts + stops, device) + (len(starts),)

    chunk_entry = ("chunks", device, numels, per, VEC)
    chunks = _cached(chunk_entry, make_chunks)
    n_chunks = _TABLES[chunk_entry][2]
    ptr_values = [t.data_ptr() for ts in lists for t in ts]
    ptrs = _cached(("ptrs", device, tuple(ptr_values)), lambda: _to_device(ptr_values, device))
    align = 16 if all(p % 16 == 0 for p in ptr_values) else 1      # the pointers' known alignment
    return ptrs, chunks, n_chunks, align


def _kernel_groups(lists, choice, reference, same_dtype=False):
    """The (device, dtype) groups of parallel lists that run a kernel, with their launch tables:
    yields (group, (ptrs, chunks, n_chunks, align)). Groups that cannot (CPU tensors without the
    interpreter, unsupported dtypes, non-contiguous tensors) go to reference(*group) whole, and the
    trailing n % VEC elements of the others to reference(*views)."""
    for idx in _groups(*lists):
        group = [[ts[i] for i in idx] for ts in lists]
        flat = [t for g in group for t in g]
        if not _triton_ok(*flat) or not _kernel_runs_on(flat[0].device, choice) \
                or (same_dtype and len({t.dtype for t in flat}) > 1):
            reference(*group)
            continue
        keep = [i for i, t in enumerate(group[0]) if t.numel() % VEC]
        if keep:
            reference(*[[ts[i].view(-1)[ts[i].numel() - ts[i].numel() % VEC:] for i in keep] for ts in group])
        tables = _launch_tables(group)
        if tables[2]:
            yield group, tables


def _launch_opts(device):
    # the interpreter runs programs one by one in Python: no warps to choose
    return {} if device.type != "cuda" else {"num_warps": NUM_WARPS}


def _on(device):
    """Launch on the tensors' GPU, whichever GPU is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- public API

def sum_squares(tensors, weights=None, *, backend: str | None = None) -> torch.Tensor:
    """sum_i ||x_i||^2 (or ||w_i * x_i||^2 with `weights`, taking |w|) as an fp32 0-dim tensor."""
    if weights is not None:
        return asam_sums(tensors, weights, backend=backend)[1]
    device = tensors[0].device if tensors else torch.device("cpu")
    if _pick(tensors, backend) == "torch":
        return _sum_squares_torch(tensors)
    return _sums_triton(tensors, tensors, weighted=False, choice=_choice(backend)).to(device)[0]


def asam_sums(grads, params, *, backend: str | None = None) -> torch.Tensor:
    """fp32 [sum g^2, sum (|w| g)^2, sum (w^2 g)^2] in one pass: ASAM's norms and ||e||/s."""
    _check_lists("asam_sums", grads, params)
    if _pick(grads, backend) == "torch":
        return _asam_sums_torch(grads, params)
    return _sums_triton(grads, params, weighted=True, choice=_choice(backend))


def perturb_scale(sumsq: torch.Tensor, rho: float, eps: float = 1e-12) -> torch.Tensor:
    """SAM's step length s = rho / (||g|| + eps) from the fp32 0-dim squared norm, as an fp32 0-dim
    tensor on its device (no host sync). The one place it is formed: both paths of perturb_ read it."""
    return rho / (sumsq.to(torch.float32).sqrt() + eps)


def perturb_(params, grads, backups, scale: torch.Tensor, adaptive: bool = False,
             *, backend: str | None = None) -> None:
    """backups[i] <- params[i]; params[i] += scale * grads[i] (times params[i]^2 when `adaptive`).

    `scale` is the caller's 0-dim fp32 tensor (sam.py forms rho / (||g|| + eps) once); it stays on
    the device, so nothing waits for the host. The backups hold the exact old values for restore_.
    """
    _check_lists("perturb_", params, grads, backups)
    if any(b.dtype != p.dtype for b, p in zip(backups, params)):
        raise ValueError("perturb_: each backup must have its parameter's dtype (it is an exact copy).")
    if not params:
        return
    scale = scale.to(torch.float32)
    if _pick(params, backend) == "torch":
        return _perturb_torch(params, grads, backups, scale, adaptive)
    _perturb_triton(params, grads, backups, scale, adaptive, _choice(backend))


def restore_(params, backups, *, backend: str | None = None) -> None:
    """params[i] <- backups[i], bit for bit, in place."""
    _check_lists("restore_", params, backups)
    if _pick(params, backend) == "torch":
        return torch._foreach_copy_(list(params), list(backups)) if params else None
    _copy_triton(params, backups, _choice(backend))


def add_(tensors, others, alpha=1.0, *, backend: str | None = None) -> None:
    """tensors[i] += alpha * others[i] in place; `alpha` a float or a 0-dim tensor on the device."""
    _check_lists("add_", tensors, others)
    if _pick(tensors, backend) == "torch":
        return _add_torch(tensors, others, alpha)
    _add_triton(tensors, others, alpha, _choice(backend))


def _pick(tensors, choice):
    return backend(list(tensors), choice)


# ----------------------------------------------------------------------------- Triton launchers

def _sums_triton(xs, ws, weighted: bool, choice: str) -> torch.Tensor:
    """fp32 [3] (weighted) or [1] sums over all (device, dtype) groups, on the first device."""
    device = xs[0].device if xs else torch.device("cpu")
    total = torch.zeros(3 if weighted else 1, dtype=torch.float32, device=device)

    def reference(gx, gw):
        total.add_((_asam_sums_torch(gx, gw) if weighted else _sum_squares_torch(gx).reshape(1)).to(device))
    for (gx, gw), (ptrs, chunks, n_chunks, align) in _kernel_groups([xs, ws], choice, reference):
        partials = torch.empty((3 if weighted else 1, n_chunks), dtype=torch.float32, device=gx[0].device)
        with _on(gx[0].device):
            _jit(_sumsq_kernel)[(n_chunks,)](
                ptrs, len(gx), chunks, partials, n_chunks,
                X_DTYPE=_TL_DTYPES[gx[0].dtype], W_DTYPE=_TL_DTYPES[gw[0].dtype], WEIGHTED=weighted,
                ALIGN=align, BLOCK=BLOCK, VEC=VEC, CHUNK=_jit(_chunk), **_launch_opts(gx[0].device))
        total += partials.sum(dim=1).to(device)
    return total


def _copy_triton(params, backups, choice):
    for (ps, bs), (ptrs, chunks, n_chunks, align) in _kernel_groups(
            [params, backups], choice, torch._foreach_copy_, same_dtype=True):
        with _on(ps[0].device):
            _jit(_copy_kernel)[(n_chunks,)](ptrs, len(ps), chunks, n_chunks, DTYPE=_TL_DTYPES[ps[0].dtype],
                                            ALIGN=align, BLOCK=BLOCK, VEC=VEC, CHUNK=_jit(_chunk),
                                            **_launch_opts(ps[0].device))


def _perturb_triton(ws, gs, bs, scale, adaptive, choice):
    reference = lambda w, g, b: _perturb_torch(w, g, b, scale, adaptive)
    for (gw, gg, _), (ptrs, chunks, n_chunks, align) in _kernel_groups([ws, gs, bs], choice, reference):
        device = gw[0].device
        with _on(device):
            _jit(_perturb_kernel)[(n_chunks,)](
                ptrs, len(gw), chunks, n_chunks, scale.to(device),
                W_DTYPE=_TL_DTYPES[gw[0].dtype], G_DTYPE=_TL_DTYPES[gg[0].dtype], ADAPTIVE=adaptive,
                ALIGN=align, BLOCK=BLOCK, VEC=VEC, CHUNK=_jit(_chunk), **_launch_opts(device))


def _add_triton(ws, ds, alpha, choice):
    reference = lambda w, d: _add_torch(w, d, alpha)
    for (gw, gd), (ptrs, chunks, n_chunks, align) in _kernel_groups([ws, ds], choice, reference):
        device = gw[0].device
        # the kernel reads alpha from the device: a float becomes a 0-dim tensor (a fill, no sync)
        a = alpha.to(device, torch.float32) if isinstance(alpha, torch.Tensor) \
            else torch.full((), float(alpha), dtype=torch.float32, device=device)
        with _on(device):
            _jit(_add_kernel)[(n_chunks,)](
                ptrs, len(gw), chunks, n_chunks, a,
                W_DTYPE=_TL_DTYPES[gw[0].dtype], D_DTYPE=_TL_DTYPES[gd[0].dtype], ALIGN=align,
                BLOCK=BLOCK, VEC=VEC, CHUNK=_jit(_chunk), **_launch_opts(device))


# ----------------------------------------------------------------------------- torch reference

def _sum_squares_torch(tensors) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for idx in _groups(tensors):
        group = [tensors[i] for i in idx]
        low = group[0].dtype in (torch.bfloat16, torch.float16)    # accumulate those in fp32
        norms = torch._foreach_norm(group, 2, dtype=torch.float32 if low else None)
        total += torch.stack(norms).square().sum().float().to(device)
    return total


def _asam_sums_torch(grads, params) -> torch.Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros(3, dtype=torch.float32, device=device)
    for g, w in zip(grads, params):     # one tensor at a time: temporaries stay one tensor big
        g, w = g.float(), w.float()
        wg = w.abs() * g
        total += torch.stack([g.square().sum(), wg.square().sum(), (wg * w).square().sum()]).to(device)
    return total


def _pieces(tensors_lists, piece):
    """Split parallel lists into buckets of about `piece` elements (views of contiguous tensors).

    On CPU, copying a piece to the backup and then adding to it finds the piece still in cache,
    so memory sees each byte once, as in the fused kernel.
    """
    buckets, current, size = [], [[] for _ in tensors_lists], 0
    for ts in zip(*tensors_lists):
        n = ts[0].numel()
        if all(t.is_contiguous() for t in ts) and n > piece:
            flats = [t.view(-1) for t in ts]
            views = [[f[s:s + piece] for s in range(0, n, piece)] for f in flats]
        else:
            views = [[t] for t in ts]
        for parts in zip(*views):
            for lst, part in zip(current, parts):
                lst.append(part)
            size += parts[0].numel()
            if size >= piece:
                buckets.append(current)
                current, size = [[] for _ in tensors_lists], 0
    if current[0]:
        buckets.append(current)
    return buckets


def _add_torch(tensors, others, alpha):
    if not tensors:
        return
    if not isinstance(alpha, torch.Tensor):
        return torch._foreach_add_(list(tensors), list(others), alpha=alpha)
    for idx in _groups(tensors, others):    # a device tensor alpha goes to each group's device
        ts, ds = [tensors[i] for i in idx], [others[i] for i in idx]
        torch._foreach_add_(ts, torch._foreach_mul(ds, alpha.to(ds[0].device, ds[0].dtype)))


def _perturb_torch(params, grads, backups, scale, adaptive):
    """The reference of _perturb_kernel; `scale` is perturb_scale's 0-dim tensor."""
    for idx in _groups(params, grads):
        group = [[params[i] for i in idx], [grads[i] for i in idx], [backups[i] for i in idx]]
        device = group[0][0].device
        s = scale.to(device)
        piece = CPU_PIECE if device.type == "cpu" else GPU_PIECE
        for ws, gs, bs in _pieces(group, piece):
            torch._foreach_copy_(bs, ws)
            if adaptive:      # e = s * w^2 * g, in fp32 like the kernel; temporaries one piece big
                gs = [w.to(torch.float32, copy=True).square_().mul_(g) for w, g in zip(ws, gs)]
            if ws[0].dtype == torch.float32 or adaptive:
                # a 0-dim scale broadcasts, so s stays on the device; addcmul rounds once, as the
                # kernel does
                torch._foreach_addcmul_(ws, gs, [s] * len(ws))
            else:             # bf16/fp16 would round s to their precision: form e in fp32
                torch._foreach_add_(ws, [g.to(torch.float32, copy=True).mul_(s) for g in gs])
