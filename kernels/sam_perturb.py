"""SAM's perturbation as fused multi-tensor Triton kernels, each beside its plain PyTorch reference.

One SAM step moves every weight along its gradient, takes a second gradient there, and moves back:

    scale = rho / (||g|| + eps)       the caller forms it once (sam.py), from sum_squares
    backups <- w; w += scale * g      perturb_   (ASAM, adaptive=True: w += scale * w^2 * g)
    ... forward and backward at w + e ...
    w <- backups                      restore_, bit for bit

    sum_squares(xs)              -> fp32 0-dim   sum_i ||x_i||^2
    asam_sums(grads, params)     -> fp32 [3]     [sum g^2, sum (|w| g)^2, sum (w^2 g)^2]
    perturb_(ws, gs, backups, scale, adaptive=False)
    restore_(ws, backups)
    path_for(tensors)            -> "triton" | "torch"

Memory traffic per weight, in element sizes: sum_squares reads g (1; asam_sums reads g and w, 2);
perturb_ reads w and g and writes w and its backup (4); restore_ reads the backup and writes w (2).
Each kernel moves exactly that, and perturb_ reads `scale` from device memory: no host sync.

One launch covers a whole list: a small int64 table on the device holds the tensors' addresses, a
second one cuts every tensor into chunks of at most BLOCK * ITERS elements, and program i works on
chunk i. Chunks end on a multiple of VEC elements, so the masks keep 16-byte vector accesses; the
last n % VEC elements of a tensor go through the reference. A list that mixes devices or dtypes
gets one launch per (device, dtype) group.

Which path runs: FLATTUNE_KERNELS=auto (the default) takes Triton for CUDA tensors when triton is
installed and the reference otherwise; `torch` forces the reference; `triton` forces Triton, which on
CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1 before this module is imported, as
tests/conftest.py sets it). Every function takes `backend=` to override the variable for one call.
"""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
    jit = triton.jit
except ImportError:     # no triton (macOS, minimal installs): the reference does everything
    HAVE_TRITON = False
    jit = lambda fn: fn  # noqa: E731  the kernels below are then defined but never launched

    class tl:           # their annotations still read `tl.constexpr`
        constexpr = None

BACKENDS = ("auto", "triton", "torch")
# triton.jit made the kernels below interpreted or compiled when this module was imported
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
BLOCK = 1024        # elements per vector operation in a program
ITERS = 8           # BLOCKs per chunk: one program covers BLOCK * ITERS elements of one tensor
VEC = 16            # chunks end on multiples of VEC, so fp32 and bf16 get 16-byte accesses
NUM_WARPS = 4       # per program on a GPU (bench/gpu_check.py sweeps BLOCK, ITERS and this)
CPU_PIECE = 1 << 19  # the reference perturb_ on CPU works in cache-sized pieces (see _pieces)
GPU_PIECE = 1 << 24  # ... and on GPUs in pieces that bound the adaptive temporaries
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16} if HAVE_TRITON else {}


# ----------------------------------------------------------------------------- which path

def _choice(backend: str | None) -> str:
    choice = (backend or os.environ.get("FLATTUNE_KERNELS") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"FLATTUNE_KERNELS={choice!r} is not a kernel backend; use one of "
                         f"{', '.join(BACKENDS)}.")
    return choice


def path_for(tensors, backend: str | None = None) -> str:
    """"triton" or "torch": the path these tensors take under FLATTUNE_KERNELS (or `backend`).

    "triton" when at least one (device, dtype) group of them runs a kernel; the launchers still send
    each group that cannot (CPU tensors with compiled kernels) to the reference."""
    choice = _choice(backend)
    if choice == "torch" or not tensors:
        return "torch"
    on_cuda = any(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if HAVE_TRITON and on_cuda else "torch"
    if not HAVE_TRITON:
        raise RuntimeError("FLATTUNE_KERNELS=triton but triton is not installed; install it or use "
                           "FLATTUNE_KERNELS=torch.")
    if not on_cuda and not INTERPRET:
        raise RuntimeError("FLATTUNE_KERNELS=triton on CPU tensors needs the Triton interpreter; start "
                           "Python with TRITON_INTERPRET=1 (or use FLATTUNE_KERNELS=torch).")
    return "triton"


def _kernel_runs_on(device, choice: str) -> bool:
    """Whether a kernel may take tensors on `device`: compiled kernels need CUDA pointers; CPU
    tensors only go through the interpreter, and only when `triton` is forced."""
    return device.type == "cuda" or (choice == "triton" and INTERPRET)


def _check(name, first, *others, same_dtype=False):
    for other in others:
        if len(other) != len(first):
            raise ValueError(f"{name}: the tensor lists have different lengths "
                             f"({len(first)} and {len(other)}).")
        for a, b in zip(first, other):
            if a.shape != b.shape or a.device != b.device:
                raise ValueError(f"{name}: paired tensors must have the same shape and device, got "
                                 f"{tuple(a.shape)} on {a.device} and {tuple(b.shape)} on {b.device}.")
    if same_dtype and any(w.dtype != b.dtype for w, b in zip(first, others[-1])):
        raise ValueError(f"{name}: each backup must have its parameter's dtype (it is an exact copy).")


# ----------------------------------------------------------------------------- one launch per list

_TABLES = {}        # launch tables by content: a training loop builds its tables once


def _device_table(key, make, device):
    """An int64 table on `device`, made once per key. On CUDA it is copied from pinned memory without
    a host sync; the cache keeps the pinned copy alive until the copy is done."""
    if key not in _TABLES:
        if len(_TABLES) >= 64:
            _TABLES.pop(next(iter(_TABLES)))
        host = torch.tensor(make(), dtype=torch.int64)
        host = host.pin_memory() if device.type == "cuda" else host
        _TABLES[key] = (host.to(device, non_blocking=True), host)
    return _TABLES[key][0]


def _groups(*lists):
    """Indices of parallel lists grouped by (device, dtypes): one kernel launch each."""
    out = {}
    for i, ts in enumerate(zip(*lists)):
        out.setdefault((ts[0].device,) + tuple(t.dtype for t in ts), []).append(i)
    return list(out.values())


def _launches(lists, backend, reference):
    """Yields (group, ptrs, chunks, n_chunks, align) per (device, dtype) group of parallel lists, on
    the group's GPU. A group no kernel can take (CPU tensors with compiled kernels, float64,
    non-contiguous tensors) goes to reference(*group), every tensor's last n % VEC elements to
    reference(*views). chunks is [3, n_chunks]: tensor index, first element, end."""
    choice, per = _choice(backend), BLOCK * ITERS
    for idx in _groups(*lists):
        group = [[ts[i] for i in idx] for ts in lists]
        flat = [t for ts in group for t in ts]
        device = flat[0].device
        if not (_kernel_runs_on(device, choice) and all(t.dtype in _TL_DTYPES and t.is_contiguous()
                                                        for t in flat)):
            reference(*group)
            continue
        tails = [i for i, t in enumerate(group[0]) if t.numel() % VEC]
        if tails:
            reference(*[[ts[i].view(-1)[ts[i].numel() // VEC * VEC:] for i in tails] for ts in group])
        numels = tuple(t.numel() // VEC * VEC for t in group[0])
        n_chunks = sum(-(-n // per) for n in numels)
        if n_chunks == 0:
            continue
        chunks = _device_table(("chunks", device, numels, per), lambda: list(zip(*[
            (i, s, min(s + per, n)) for i, n in enumerate(numels) for s in range(0, n, per)])), device)
        ptr_values = [t.data_ptr() for t in flat]
        ptrs = _device_table(("ptrs", device, tuple(ptr_values)), lambda: ptr_values, device)
        align = 16 if all(p % 16 == 0 for p in ptr_values) else 1      # the pointers' known alignment
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield group, ptrs, chunks, n_chunks, align


@jit
def _chunk(chunks, n_chunks, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """This program's chunk: (tensor index, first element, end)."""
    pid = tl.program_id(0)
    start = tl.multiple_of(tl.load(chunks + n_chunks + pid), BLOCK)
    return tl.load(chunks + pid), start, tl.multiple_of(tl.load(chunks + 2 * n_chunks + pid), VEC)


# ----------------------------------------------------------------------------- sums of squares

@jit
def _sums_kernel(ptrs, n_tensors, chunks, n_chunks, partials,
                 X_DTYPE: tl.constexpr, W_DTYPE: tl.constexpr, WEIGHTED: tl.constexpr,
                 ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    # partials[0, pid] = sum x^2 over this chunk; WEIGHTED adds sum (|w| x)^2 and sum (w^2 x)^2
    acc_g = tl.zeros([BLOCK], tl.float32)
    acc_wg = tl.zeros([BLOCK], tl.float32)
    acc_wwg = tl.zeros([BLOCK], tl.float32)
    t, start, stop = _chunk(chunks, n_chunks, BLOCK, VEC)
    x_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(X_DTYPE)), ALIGN)
    w_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        g = tl.load(x_ptr + offs, mask=offs < stop, other=0.0).to(tl.float32)
        acc_g += g * g
        if WEIGHTED:
            w = tl.load(w_ptr + offs, mask=offs < stop, other=0.0).to(tl.float32)
            acc_wg += (w * g) * (w * g)
            acc_wwg += (w * w * g) * (w * w * g)
    pid = tl.program_id(0)
    tl.store(partials + pid, tl.sum(acc_g, 0))
    if WEIGHTED:
        tl.store(partials + n_chunks + pid, tl.sum(acc_wg, 0))
        tl.store(partials + 2 * n_chunks + pid, tl.sum(acc_wwg, 0))


def sum_squares(xs, *, backend: str | None = None) -> torch.Tensor:
    """sum_i ||x_i||^2 as an fp32 0-dim tensor on xs[0]'s device (SAM's squared gradient norm)."""
    if path_for(xs, backend) == "torch":
        return _sum_squares_torch(xs)
    return _sums(xs, xs, False, backend)[0]


def asam_sums(grads, params, *, backend: str | None = None) -> torch.Tensor:
    """fp32 [sum g^2, sum (|w| g)^2, sum (w^2 g)^2] in one pass: ||g||, ASAM's norm and ||e|| / s."""
    _check("asam_sums", grads, params)
    if path_for(grads, backend) == "torch":
        return _asam_sums_torch(grads, params)
    return _sums(grads, params, True, backend)


def _sums(xs, ws, weighted: bool, backend) -> torch.Tensor:
    device = xs[0].device
    total = torch.zeros(3 if weighted else 1, dtype=torch.float32, device=device)

    def reference(gx, gw):
        total.add_((_asam_sums_torch(gx, gw) if weighted else _sum_squares_torch(gx)).to(device))
    for (gx, gw), ptrs, chunks, n_chunks, align in _launches([xs, ws], backend, reference):
        partials = torch.empty(total.numel(), n_chunks, dtype=torch.float32, device=gx[0].device)
        _sums_kernel[(n_chunks,)](ptrs, len(gx), chunks, n_chunks, partials,
                                  X_DTYPE=_TL_DTYPES[gx[0].dtype], W_DTYPE=_TL_DTYPES[gw[0].dtype],
                                  WEIGHTED=weighted, ALIGN=align, BLOCK=BLOCK, VEC=VEC, num_warps=NUM_WARPS)
        total += partials.sum(dim=1).to(device)
    return total


def _sum_squares_torch(xs) -> torch.Tensor:
    """The reference of sum_squares (and its path off CUDA)."""
    total = torch.zeros((), dtype=torch.float32, device=xs[0].device if xs else "cpu")
    for idx in _groups(xs):
        group = [xs[i] for i in idx]
        low = group[0].dtype in (torch.bfloat16, torch.float16)    # accumulate those in fp32
        norms = torch._foreach_norm(group, 2, dtype=torch.float32 if low else None)
        total += torch.stack(norms).square().sum().float().to(total.device)
    return total


def _asam_sums_torch(grads, params) -> torch.Tensor:
    """The reference of asam_sums (and its path off CUDA)."""
    total = torch.zeros(3, dtype=torch.float32, device=grads[0].device if grads else "cpu")
    for g, w in zip(grads, params):     # one tensor at a time: temporaries stay one tensor big
        g, w = g.float(), w.float()
        wg = w.abs() * g
        total += torch.stack([g.square().sum(), wg.square().sum(), (wg * w).square().sum()]).to(total.device)
    return total


# ----------------------------------------------------------------------------- perturb

@jit
def _perturb_kernel(ptrs, n_tensors, chunks, n_chunks, scale_ptr,
                    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, ADAPTIVE: tl.constexpr,
                    ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    # b <- w; w += s * g (s * w^2 * g when ADAPTIVE), in fp32, rounded once to w's dtype
    t, start, stop = _chunk(chunks, n_chunks, BLOCK, VEC)
    w_ptr = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    g_ptr = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(G_DTYPE)), ALIGN)
    b_ptr = tl.multiple_of(tl.load(ptrs + 2 * n_tensors + t).to(tl.pointer_type(W_DTYPE)), ALIGN)
    s = tl.load(scale_ptr)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        w_raw = tl.load(w_ptr + offs, mask=offs < stop)
        tl.store(b_ptr + offs, w_raw, mask=offs < stop)
        w = w_raw.to(tl.float32)
        e = s * tl.load(g_ptr + offs, mask=offs < stop).to(tl.float32)
        if ADAPTIVE:
            e = e * w * w
        tl.store(w_ptr + offs, (w + e).to(W_DTYPE), mask=offs < stop)


def perturb_(ws, gs, backups, scale: torch.Tensor, adaptive: bool = False, *,
             backend: str | None = None) -> None:
    """backups <- ws; ws += scale * gs (scale * ws^2 * gs when `adaptive`), in place.

    scale: SAM's step length rho / (||g|| + eps) as a 0-dim fp32 tensor, formed once by the caller;
    the kernel loads it from device memory, so nothing waits for the host."""
    _check("perturb_", ws, gs, backups, same_dtype=True)
    if not (isinstance(scale, torch.Tensor) and scale.dim() == 0):
        raise TypeError("perturb_: scale must be a 0-dim tensor, rho / (||g|| + eps).")
    if path_for(ws, backend) == "torch":
        return _perturb_torch(ws, gs, backups, scale, adaptive)
    reference = lambda w, g, b: _perturb_torch(w, g, b, scale, adaptive)     # noqa: E731
    for (w, g, _), ptrs, chunks, n_chunks, align in _launches([ws, gs, backups], backend, reference):
        _perturb_kernel[(n_chunks,)](ptrs, len(w), chunks, n_chunks, scale.to(w[0].device, torch.float32),
                                     W_DTYPE=_TL_DTYPES[w[0].dtype], G_DTYPE=_TL_DTYPES[g[0].dtype],
                                     ADAPTIVE=adaptive, ALIGN=align, BLOCK=BLOCK, VEC=VEC, num_warps=NUM_WARPS)


def _perturb_torch(ws, gs, backups, scale, adaptive):
    """The reference of _perturb_kernel (and perturb_'s path off CUDA), in cache-sized pieces."""
    for idx in _groups(ws, gs):
        group = [[ws[i] for i in idx], [gs[i] for i in idx], [backups[i] for i in idx]]
        device = group[0][0].device
        s = scale.to(device, torch.float32)
        for pw, pg, pb in _pieces(group, CPU_PIECE if device.type == "cpu" else GPU_PIECE):
            torch._foreach_copy_(pb, pw)
            if adaptive:      # e = s * w^2 * g, in fp32 like the kernel; temporaries one piece big
                pg = [w.to(torch.float32, copy=True).square_().mul_(g) for w, g in zip(pw, pg)]
            if pw[0].dtype == torch.float32 or adaptive:
                # a 0-dim s broadcasts, so it stays on the device; addcmul rounds once, as the kernel
                torch._foreach_addcmul_(pw, pg, [s] * len(pw))
            else:             # bf16/fp16 would round s to their precision: form e in fp32
                torch._foreach_add_(pw, [g.to(torch.float32, copy=True).mul_(s) for g in pg])


def _pieces(lists, piece):
    """Parallel lists cut into buckets of about `piece` elements (views of contiguous tensors): on
    CPU the backup copy leaves a piece in cache for the add, so memory sees each byte once."""
    buckets, current, size = [], [[] for _ in lists], 0
    for ts in zip(*lists):
        n = ts[0].numel()
        if all(t.is_contiguous() for t in ts) and n > piece:
            views = [[t.view(-1)[s:s + piece] for s in range(0, n, piece)] for t in ts]
        else:
            views = [[t] for t in ts]
        for parts in zip(*views):
            for lst, part in zip(current, parts):
                lst.append(part)
            size += parts[0].numel()
            if size >= piece:
                buckets.append(current)
                current, size = [[] for _ in lists], 0
    return buckets + ([current] if current[0] else [])


# ----------------------------------------------------------------------------- restore

@jit
def _copy_kernel(ptrs, n_tensors, chunks, n_chunks, DTYPE: tl.constexpr,
                 ALIGN: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    # dst <- src, bit for bit
    t, start, stop = _chunk(chunks, n_chunks, BLOCK, VEC)
    dst = tl.multiple_of(tl.load(ptrs + t).to(tl.pointer_type(DTYPE)), ALIGN)
    src = tl.multiple_of(tl.load(ptrs + n_tensors + t).to(tl.pointer_type(DTYPE)), ALIGN)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < stop), mask=offs < stop)


def restore_(ws, backups, *, backend: str | None = None) -> None:
    """ws <- backups, bit for bit, in place (the reference is torch._foreach_copy_)."""
    _check("restore_", ws, backups, same_dtype=True)
    if path_for(ws, backend) == "torch":
        return torch._foreach_copy_(list(ws), list(backups)) if ws else None
    for (w, _), ptrs, chunks, n_chunks, align in _launches([ws, backups], backend, torch._foreach_copy_):
        _copy_kernel[(n_chunks,)](ptrs, len(w), chunks, n_chunks, DTYPE=_TL_DTYPES[w[0].dtype],
                                  ALIGN=align, BLOCK=BLOCK, VEC=VEC, num_warps=NUM_WARPS)
