"""The Triton kernels against the torch._foreach reference and against float64.

With a GPU (and triton) the cases run compiled on CUDA, with larger odd sizes and fp16 throughout
(bench/gpu_check.py runs this file there); without one they run under the Triton interpreter on CPU
(TRITON_INTERPRET=1), on the smaller sizes."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import sam_perturb

ROOT = Path(__file__).resolve().parent.parent
ON_GPU = kernels.HAVE_TRITON and torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# the kernels are compiled or interpreted from the moment kernels is imported: on CPU interpreted,
# which tests/conftest.py arranges by setting TRITON_INTERPRET=1 before anything imports triton
needs_triton = pytest.mark.skipif(not (kernels.HAVE_TRITON and (ON_GPU or sam_perturb.INTERPRET)),
                                  reason="needs triton, and on CPU TRITON_INTERPRET=1 at import")
KERNELS = ("_sums_kernel", "_perturb_kernel", "_copy_kernel")


@pytest.fixture(autouse=True)
def default_path(monkeypatch):
    monkeypatch.delenv("FLATTUNE_KERNELS", raising=False)


class Spy:
    """Stands in for a kernel and counts its launches."""
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def spy_on_kernels(monkeypatch):
    spies = {name: Spy(getattr(sam_perturb, name)) for name in KERNELS}
    for name, spy in spies.items():
        monkeypatch.setattr(sam_perturb, name, spy)
    return spies


def scale_of(sumsq, rho=2.0):
    """SAM's step length rho / (||g|| + eps): the caller forms it once, as sam.py does."""
    return rho / (sumsq.sqrt() + 1e-12)


def _sizes():
    gen = torch.Generator().manual_seed(0)
    sizes = {
        "1": [(1,)],
        "1023": [(1023,)],
        "4097": [(4097,)],
        "200_small": [(int(n),) for n in torch.randint(1, 40, (200,), generator=gen)],
        "mix": [(1,), (33, 17), (4097,), (3, 1023), (8, 1024), (2,), (9000,)],
    }
    if ON_GPU:     # sizes the interpreter would take minutes over
        sizes["1823x781"] = [(1823, 781)]
        sizes["big_mix"] = [(3_000_017,), (4096, 11008), (7,), (1023, 4097)]
    return sizes


SIZES = _sizes()
# interpreter time is what limits the CPU run: fp16 there on the mixed list only
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CPU_FP16_CASES = ("mix",)
# elementwise results round once to the parameter dtype; bf16 keeps 8 bits of mantissa, fp16 11
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6),
       torch.float16: dict(rtol=2 ** -10, atol=1e-5)}
SUM_RTOL = 1e-5     # both accumulate in fp32, in different orders


def _runs(case, dtype):
    return ON_GPU or dtype != torch.float16 or case in CPU_FP16_CASES


def make(shapes, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def close(got, want, dtype):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def fp64_sums(g, w):
    """[sum g^2, sum (|w| g)^2, sum (w^2 g)^2] in float64: the definition."""
    g, w = [x.double() for x in g], [x.double() for x in w]
    return [sum(x.square().sum() for x in g).item(),
            sum((b.abs() * a).square().sum() for a, b in zip(g, w)).item(),
            sum((b.square() * a).square().sum() for a, b in zip(g, w)).item()]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SIZES))
def test_sums_match_float64(case, dtype):
    if not _runs(case, dtype):
        pytest.skip("fp16 runs on the mixed list only under the interpreter")
    g, w = make(SIZES[case], dtype, 1), make(SIZES[case], dtype, 2)
    want = fp64_sums(g, w)
    for path in ("triton", "torch"):
        got = kernels.sum_squares(g, backend=path)
        assert got.dtype == torch.float32 and got.dim() == 0 and got.device == DEVICE
        assert got.item() == pytest.approx(want[0], rel=SUM_RTOL)
        sums = kernels.asam_sums(g, w, backend=path)
        assert sums.dtype == torch.float32 and sums.shape == (3,)
        assert sums.tolist() == pytest.approx(want, rel=SUM_RTOL)


# every combination, less one 200-tensor case under the interpreter (~6 ms per program there)
PERTURB_CASES = [(case, dtype, adaptive) for case in SIZES for dtype in DTYPES
                 for adaptive in (False, True)
                 if _runs(case, dtype) and (ON_GPU or not (case == "200_small"
                                                           and dtype == torch.bfloat16 and adaptive))]


@needs_triton
@pytest.mark.parametrize("case, dtype, adaptive", PERTURB_CASES)
def test_perturb_matches_the_reference_and_restore_is_exact(case, dtype, adaptive):
    w0, g = make(SIZES[case], dtype, 3), make(SIZES[case], dtype, 4)
    sumsq = kernels.asam_sums(g, w0)[1] if adaptive else kernels.sum_squares(g)
    results = {}
    for path in ("triton", "torch"):
        w = [t.clone() for t in w0]
        backups = [torch.empty_like(t) for t in w]
        kernels.perturb_(w, g, backups, scale_of(sumsq), adaptive=adaptive, backend=path)
        assert all(torch.equal(b, t) for b, t in zip(backups, w0))
        results[path] = [t.clone() for t in w]
        kernels.restore_(w, backups, backend=path)
        assert all(torch.equal(a, b) for a, b in zip(w, w0))
    close(results["triton"], results["torch"], dtype)
    # and both against the definition, in float64
    norm = sumsq.double().sqrt()
    for path in ("triton", "torch"):
        for got, w, gi in zip(results[path], w0, g):
            e = 2.0 * gi.double() / norm * (w.double().square() if adaptive else 1.0)
            torch.testing.assert_close(got.double(), (w.double() + e).to(dtype).double(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_all_zero_gradients_leave_the_weights_and_give_no_nan(path, dtype):
    w0 = make(SIZES["mix"], dtype, 5)
    g = [torch.zeros_like(t) for t in w0]
    assert kernels.sum_squares(g, backend=path).item() == 0.0
    for adaptive in (False, True):
        w, backups = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(w, g, backups, scale_of(kernels.sum_squares(g)), adaptive=adaptive, backend=path)
        assert all(torch.equal(a, b) for a, b in zip(w, w0))


@needs_triton
def test_a_list_mixing_fp32_bf16_and_fp16_gets_one_launch_per_dtype():
    shapes = [(1,), (33, 17), (4097,), (3, 1023), (9000,), (2,)]
    low = (torch.bfloat16, torch.float16)
    w0 = [t.to(low[k // 2 % 2]) if k % 2 else t for k, t in enumerate(make(shapes, torch.float32, 8))]
    g = [t.to(w.dtype) for t, w in zip(make(shapes, torch.float32, 9), w0)]
    want = fp64_sums(g, w0)
    assert kernels.sum_squares(g, backend="triton").item() == pytest.approx(want[0], rel=SUM_RTOL)
    assert kernels.asam_sums(g, w0, backend="triton").tolist() == pytest.approx(want, rel=SUM_RTOL)
    for adaptive in (False, True):
        sumsq = kernels.asam_sums(g, w0)[1] if adaptive else kernels.sum_squares(g)
        out = {}
        for path in ("triton", "torch"):
            w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
            kernels.perturb_(w, g, b, scale_of(sumsq), adaptive=adaptive, backend=path)
            out[path] = [t.clone() for t in w]
            kernels.restore_(w, b, backend=path)
            assert all(torch.equal(a, c) and a.dtype == c.dtype for a, c in zip(w, w0))
        for a, c, w in zip(out["triton"], out["torch"], w0):
            assert a.dtype == w.dtype
            torch.testing.assert_close(a.float(), c.float(), **TOL[w.dtype])


@needs_triton
def test_cpu_groups_never_reach_a_compiled_kernel(monkeypatch):
    # what the CPU part of a mixed CUDA/CPU list meets once the list as a whole took the Triton
    # path: with compiled kernels each CPU group must go to the reference, not to a kernel
    monkeypatch.setattr(sam_perturb, "INTERPRET", False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sam_perturb._kernel_runs_on(cuda, "auto") and sam_perturb._kernel_runs_on(cuda, "triton")
    assert not sam_perturb._kernel_runs_on(cpu, "auto") and not sam_perturb._kernel_runs_on(cpu, "triton")
    monkeypatch.setattr(sam_perturb, "INTERPRET", True)
    assert sam_perturb._kernel_runs_on(cpu, "triton") and not sam_perturb._kernel_runs_on(cpu, "auto")
    monkeypatch.setattr(sam_perturb, "INTERPRET", False)
    spies = spy_on_kernels(monkeypatch)
    # as if the list held CUDA tensors too: the launchers see each (device, dtype) group
    monkeypatch.setattr(sam_perturb, "path_for", lambda tensors, backend=None: "triton")
    w0, g = make(SIZES["mix"], torch.float32, 10, cpu), make(SIZES["mix"], torch.float32, 11, cpu)
    for choice in ("auto", "triton"):
        got = kernels.asam_sums(g, w0, backend=choice)
        torch.testing.assert_close(got, sam_perturb._asam_sums_torch(g, w0), rtol=0, atol=0)
        w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        scale = scale_of(kernels.sum_squares(g, backend=choice))
        kernels.perturb_(w, g, b, scale, backend=choice)
        ref, rb = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        sam_perturb._perturb_torch(ref, g, rb, scale, False)
        assert all(torch.equal(x, y) for x, y in zip(w, ref))
        torch._foreach_add_(w, g, alpha=0.5)
        kernels.restore_(w, b, backend=choice)
        assert all(torch.equal(x, y) for x, y in zip(w, w0))
    assert all(spy.launches == 0 for spy in spies.values())     # no kernel was launched for them


@pytest.mark.skipif(not (kernels.HAVE_TRITON and torch.cuda.is_available()), reason="needs a GPU")
def test_a_list_mixing_cuda_and_cpu_tensors_matches_the_reference():
    w0 = make(SIZES["mix"], torch.float32, 12, torch.device("cpu"))
    w0 = [t.cuda() if k % 2 else t for k, t in enumerate(w0)]
    g = [t.to(w.device) for t, w in zip(make(SIZES["mix"], torch.float32, 13, torch.device("cpu")), w0)]
    assert kernels.path_for(w0) == "triton"
    assert kernels.sum_squares(g).item() == pytest.approx(
        kernels.sum_squares(g, backend="torch").item(), rel=SUM_RTOL)
    out = {}
    for path in ("auto", "torch"):
        w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(w, g, b, scale_of(kernels.sum_squares(g)), backend=path)
        out[path] = [t.clone() for t in w]
        for t, x in zip(w, g):
            t.add_(x, alpha=0.5)
        kernels.restore_(w, b, backend=path)
        assert all(torch.equal(x, y) for x, y in zip(w, w0))
    close(out["auto"], out["torch"], torch.float32)


@needs_triton
def test_non_contiguous_and_float64_tensors_through_the_triton_path():
    # The kernels address a tensor as data_ptr + 0..numel-1. A column slice keeps its elements
    # elsewhere (rows with gaps between them) and a transposed view in another order, so a kernel
    # that took them would read and write the wrong elements, the gaps that belong to the rest of
    # `base` included. _launches must send their (device, dtype) group to the reference.
    gen = torch.Generator().manual_seed(14)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)   # noqa: E731
    base, gbase = rnd(9, 16), rnd(9, 20)
    base0 = base.clone()
    w0 = [base0[:, 3:10], rnd(300), rnd(5, 9).double()]       # float64: no kernel either
    g = [rnd(7, 9).t(), rnd(300), rnd(5, 9).double()]
    gcut = gbase[:, 5:12]                                      # a gapped gradient for the norms
    assert not base[:, 3:10].is_contiguous() and not g[0].is_contiguous()
    assert kernels.sum_squares([gcut], backend="triton").item() == pytest.approx(
        fp64_sums([gcut], [gcut])[0], rel=SUM_RTOL)
    assert kernels.asam_sums([gcut], [base[:, 3:10]], backend="triton").tolist() == pytest.approx(
        fp64_sums([gcut], [base[:, 3:10]]), rel=SUM_RTOL)
    want = fp64_sums(g, w0)
    assert kernels.asam_sums(g, w0, backend="triton").tolist() == pytest.approx(want, rel=SUM_RTOL)
    for adaptive in (False, True):
        sumsq = torch.tensor(want[1 if adaptive else 0], dtype=torch.float32, device=DEVICE)
        out = {}
        for path in ("triton", "torch"):
            w = [base[:, 3:10], w0[1].clone(), w0[2].clone()]
            b = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in w]
            kernels.perturb_(w, g, b, scale_of(sumsq, 1.5), adaptive=adaptive, backend=path)
            out[path] = [t.clone() for t in w]
            assert torch.equal(base[:, :3], base0[:, :3]) and torch.equal(base[:, 10:], base0[:, 10:])
            for t, x in zip(w, g):              # the second pass may move w further; restore_ undoes all
                t.add_(x, alpha=-0.25)
            kernels.restore_(w, b, backend=path)
            assert torch.equal(base, base0) and all(torch.equal(x, y) for x, y in zip(w, w0))
        norm = sumsq.double().sqrt()
        for got, w, gi in zip(out["triton"], w0, g):
            e = 1.5 * gi.double() / norm * (w.double().square() if adaptive else 1.0)
            torch.testing.assert_close(got.double(), w.double() + e, **TOL[torch.float32])


@needs_triton
def test_unaligned_contiguous_views_take_the_kernel():
    # views that start 4 bytes into their storage: contiguous, so the kernels take them, without
    # the 16-byte alignment hint
    w0, g = (make([(1001,)], torch.float32, seed)[0][1:] for seed in (15, 16))
    assert w0.is_contiguous() and w0.data_ptr() % 16
    sumsq = kernels.sum_squares([g], backend="triton")
    assert sumsq.item() == pytest.approx(g.double().square().sum().item(), rel=SUM_RTOL)
    out = {}
    for path in ("triton", "torch"):
        w, b = torch.cat([w0[:1], w0])[1:], torch.empty(1001, device=DEVICE)[1:]
        kernels.perturb_([w], [g], [b], scale_of(sumsq), backend=path)
        out[path] = w.clone()
        w.add_(g, alpha=0.5)
        kernels.restore_([w], [b], backend=path)
        assert torch.equal(w, w0)
    close([out["triton"]], [out["torch"]], torch.float32)


def test_launchers_reject_mismatched_lists():
    a, b = [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(5)]
    with pytest.raises(ValueError, match="same shape"):
        kernels.restore_(a, b)
    with pytest.raises(ValueError, match="lengths"):
        kernels.restore_(a, a[:1])
    with pytest.raises(ValueError, match="dtype"):
        kernels.perturb_(a, a, [t.double() for t in a], torch.ones(()))
    with pytest.raises(TypeError, match="0-dim"):           # the caller forms the scale, not rho
        kernels.perturb_(a, a, [t.clone() for t in a], 2.0)


def test_path_selection(monkeypatch):
    cpu = [torch.zeros(2)]
    assert kernels.path_for(cpu) == "torch"                    # auto: the reference on CPU
    monkeypatch.setenv("FLATTUNE_KERNELS", "torch")
    assert kernels.path_for(cpu) == "torch"
    monkeypatch.setenv("FLATTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="FLATTUNE_KERNELS"):
        kernels.path_for(cpu)
    if kernels.HAVE_TRITON:
        monkeypatch.setenv("FLATTUNE_KERNELS", "triton")
        monkeypatch.setattr(sam_perturb, "INTERPRET", True)
        assert kernels.path_for(cpu) == "triton"               # the interpreter
        monkeypatch.setattr(sam_perturb, "INTERPRET", False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.path_for(cpu)


def test_import_and_reference_work_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "assert not kernels.HAVE_TRITON and kernels.path_for([torch.zeros(1)]) == 'torch'\n"
            "print(kernels.sum_squares([torch.ones(3), torch.ones(2)]).item())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLATTUNE_KERNELS="auto")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "5.0"


@needs_triton
def test_sam_takes_the_same_steps_through_either_kernel_path(monkeypatch):
    from sam import SAM
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).to(DEVICE)
    x, y = torch.randn(16, 8, device=DEVICE), torch.randn(16, 2, device=DEVICE)
    weights, spies = {}, spy_on_kernels(monkeypatch)
    for path in ("triton", "torch"):
        monkeypatch.setenv("FLATTUNE_KERNELS", path)
        model = copy.deepcopy(base)
        opt = SAM(model.parameters(), rho=2.0, adaptive=True, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.second_step(zero_grad=True)
        weights[path] = list(model.parameters())
    close(weights["triton"], weights["torch"], torch.float32)
    # the kernels really ran: compiled on a GPU, interpreted on CPU
    assert spies["_perturb_kernel"].launches > 0 and spies["_copy_kernel"].launches > 0


COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import sam_perturb as K
assert not K.INTERPRET
common = {"ptrs": "*i64", "n_tensors": "i32", "chunks": "*i64", "n_chunks": "i32"}
cases = {
    "_perturb_kernel": ({**common, "scale_ptr": "*fp32"},
                        dict(W_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, ADAPTIVE=True)),
    "_copy_kernel": (common, dict(DTYPE=tl.float32)),
    "_sums_kernel": ({**common, "partials": "*fp32"}, dict(X_DTYPE=tl.float32, W_DTYPE=tl.bfloat16, WEIGHTED=True)),
}
for name, (sig, const) in cases.items():
    fn = getattr(K, name)
    const = {**const, "ALIGN": 16, "BLOCK": K.BLOCK, "VEC": K.VEC}
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in const}},
                    {(fn.arg_names.index(k),): v for k, v in const.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(name, "vector" if ".v4." in ptx or ".v2." in ptx else "scalar")     # ld/st.global.v4.b32 etc.
"""


@needs_triton
def test_kernels_compile_for_a_gpu_with_vector_accesses():
    """Compiled Triton (not the interpreter) on a machine without a GPU: every kernel lowers to PTX
    for sm_90, and the aligned kernels use vector loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(line.split() for line in proc.stdout.splitlines())
    assert got == {k: "vector" for k in KERNELS}, got
