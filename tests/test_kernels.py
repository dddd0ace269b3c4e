"""The Triton kernels (under TRITON_INTERPRET=1 on CPU) against the torch._foreach reference."""
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
needs_triton = pytest.mark.skipif(not kernels.HAVE_TRITON, reason="triton is not installed")

# kernels are decorated on first use with the interpreter setting of that moment, so setting the
# variable per test works whatever imported triton (or the kernels) before this module
@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FLATTUNE_KERNELS", raising=False)


def _sizes():
    gen = torch.Generator().manual_seed(0)
    return {
        "1": [(1,)],
        "1023": [(1023,)],
        "4097": [(4097,)],
        "200_small": [(int(n),) for n in torch.randint(1, 40, (200,), generator=gen)],
        "mix": [(1,), (33, 17), (4097,), (3, 1023), (8, 1024), (2,), (9000,)],
    }


SIZES = _sizes()
# elementwise results round once to the parameter dtype; bf16 keeps 8 bits of mantissa
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-6)}
SUM_RTOL = 1e-5     # both accumulate in fp32, in different orders


def make(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def close(got, want, dtype):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(SIZES))
def test_sums_match_the_reference(case, dtype):
    g, w = make(SIZES[case], dtype, 1), make(SIZES[case], dtype, 2)
    want = sum(x.double().square().sum() for x in g).item()
    for path in ("triton", "torch"):
        got = kernels.sum_squares(g, backend=path)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert got.item() == pytest.approx(want, rel=SUM_RTOL)
    torch.testing.assert_close(kernels.asam_sums(g, w, backend="triton"),
                               kernels.asam_sums(g, w, backend="torch"), rtol=SUM_RTOL, atol=0)


# every combination, less one 200-tensor case (the interpreter takes ~6 ms per program)
PERTURB_CASES = [(case, dtype, adaptive) for case in SIZES
                 for dtype in (torch.float32, torch.bfloat16) for adaptive in (False, True)
                 if not (case == "200_small" and dtype == torch.bfloat16 and adaptive)]


@needs_triton
@pytest.mark.parametrize("case, dtype, adaptive", PERTURB_CASES)
def test_perturb_matches_the_reference_and_restore_is_exact(case, dtype, adaptive):
    w0, g = make(SIZES[case], dtype, 3), make(SIZES[case], dtype, 4)
    sumsq = kernels.sum_squares(g, weights=w0 if adaptive else None)
    results = {}
    for path in ("triton", "torch"):
        w = [t.clone() for t in w0]
        backups = [torch.empty_like(t) for t in w]
        kernels.perturb_(w, g, backups, sumsq, 2.0, adaptive=adaptive, backend=path)
        assert all(torch.equal(b, t) for b, t in zip(backups, w0))
        results[path] = [t.clone() for t in w]
        kernels.restore_(w, backups, backend=path)
        assert all(torch.equal(a, b) for a, b in zip(w, w0))
    close(results["triton"], results["torch"], dtype)
    # and the reference itself against the definition, in float64
    norm = sumsq.double().sqrt()
    for got, w, gi in zip(results["torch"], w0, g):
        e = 2.0 * gi.double() / norm * (w.double().square() if adaptive else 1.0)
        torch.testing.assert_close(got.double(), (w.double() + e).to(dtype).double(), **TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_all_zero_gradients_leave_the_weights_and_give_no_nan(path, dtype):
    w0 = make(SIZES["mix"], dtype, 5)
    g = [torch.zeros_like(t) for t in w0]
    assert kernels.sum_squares(g, backend=path).item() == 0.0
    for adaptive in (False, True):
        w, backups = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(w, g, backups, kernels.sum_squares(g), 2.0, adaptive=adaptive, backend=path)
        assert all(torch.equal(a, b) for a, b in zip(w, w0))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_matches_the_reference(dtype):
    w0 = make(SIZES["mix"], dtype, 6)
    d = make(SIZES["mix"], torch.float32, 7)         # fp32 directions onto bf16 weights too
    for alpha in (0.37, torch.tensor(-1.5)):
        out = {}
        for path in ("triton", "torch"):
            out[path] = [t.clone() for t in w0]
            kernels.add_(out[path], d, alpha, backend=path)
        close(out["triton"], out["torch"], dtype)
        a = float(alpha)
        close(out["torch"], [(w.double() + a * x.double()).to(dtype) for w, x in zip(w0, d)], dtype)


@needs_triton
def test_a_list_mixing_fp32_and_bf16_gets_one_launch_per_dtype():
    shapes = [(1,), (33, 17), (4097,), (3, 1023), (9000,), (2,)]
    w0 = [t.to(torch.bfloat16) if k % 2 else t for k, t in enumerate(make(shapes, torch.float32, 8))]
    g = [t.to(w.dtype) for t, w in zip(make(shapes, torch.float32, 9), w0)]
    want = sum(x.double().square().sum() for x in g).item()
    assert kernels.sum_squares(g, backend="triton").item() == pytest.approx(want, rel=SUM_RTOL)
    torch.testing.assert_close(kernels.asam_sums(g, w0, backend="triton"),
                               kernels.asam_sums(g, w0, backend="torch"), rtol=SUM_RTOL, atol=0)
    for adaptive in (False, True):
        sumsq = kernels.sum_squares(g, weights=w0 if adaptive else None)
        out = {}
        for path in ("triton", "torch"):
            w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
            kernels.perturb_(w, g, b, sumsq, 2.0, adaptive=adaptive, backend=path)
            out[path] = [t.clone() for t in w]
            kernels.restore_(w, b, backend=path)
            assert all(torch.equal(a, c) and a.dtype == c.dtype for a, c in zip(w, w0))
        for a, c, w in zip(out["triton"], out["torch"], w0):
            assert a.dtype == w.dtype
            torch.testing.assert_close(a.float(), c.float(), **TOL[w.dtype])


@needs_triton
def test_cpu_groups_never_reach_a_compiled_kernel(monkeypatch):
    # what the CPU part of a mixed CUDA/CPU list meets once the list as a whole took the Triton
    # path: without the interpreter each CPU group must go to the reference, not to a kernel
    monkeypatch.delenv("TRITON_INTERPRET")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sam_perturb._kernel_runs_on(cuda, "auto") and sam_perturb._kernel_runs_on(cuda, "triton")
    assert not sam_perturb._kernel_runs_on(cpu, "auto") and not sam_perturb._kernel_runs_on(cpu, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sam_perturb._kernel_runs_on(cpu, "triton") and not sam_perturb._kernel_runs_on(cpu, "auto")
    monkeypatch.delenv("TRITON_INTERPRET")
    jitted = set(sam_perturb._JITTED)
    w0, g = make(SIZES["mix"], torch.float32, 10), make(SIZES["mix"], torch.float32, 11)
    for choice in ("auto", "triton"):
        got = sam_perturb._sums_triton(g, w0, weighted=True, choice=choice)
        torch.testing.assert_close(got, kernels.asam_sums(g, w0, backend="torch"), rtol=0, atol=0)
        w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        sumsq = kernels.sum_squares(g)
        sam_perturb._axpy_triton(w, g, b, sumsq, 2.0, 1e-12, mode=2, adaptive=False, save=True,
                                 choice=choice)
        ref, rb = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(ref, g, rb, sumsq, 2.0, backend="torch")
        assert all(torch.equal(x, y) for x, y in zip(w, ref))
        sam_perturb._copy_triton(w, b, choice)
        assert all(torch.equal(x, y) for x, y in zip(w, w0))
    assert set(sam_perturb._JITTED) == jitted                  # no kernel was made for them


@pytest.mark.skipif(not (kernels.HAVE_TRITON and torch.cuda.is_available()), reason="needs a GPU")
def test_a_list_mixing_cuda_and_cpu_tensors_matches_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    w0 = make(SIZES["mix"], torch.float32, 12)
    w0 = [t.cuda() if k % 2 else t for k, t in enumerate(w0)]
    g = [t.to(w.device) for t, w in zip(make(SIZES["mix"], torch.float32, 13), w0)]
    assert kernels.backend(w0) == "triton"
    assert kernels.sum_squares(g).item() == pytest.approx(
        kernels.sum_squares(g, backend="torch").item(), rel=SUM_RTOL)
    out = {}
    for path in ("auto", "torch"):
        w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(w, g, b, kernels.sum_squares(g), 2.0, backend=path)
        out[path] = [t.clone() for t in w]
        kernels.add_(w, g, torch.tensor(0.5, device="cuda"), backend=path)
        kernels.restore_(w, b, backend=path)
        assert all(torch.equal(x, y) for x, y in zip(w, w0))
    close(out["auto"], out["torch"], torch.float32)


@needs_triton
def test_tensors_the_kernel_cannot_take_fall_back_to_the_reference():
    w0 = [torch.randn(5, 7).t(), torch.randn(9, dtype=torch.float64), torch.randn(300)]
    g = [torch.randn_like(t) for t in w0]
    assert kernels.sum_squares(g, backend="triton").item() == pytest.approx(
        kernels.sum_squares(g, backend="torch").item(), rel=SUM_RTOL)
    out = {}
    for path in ("triton", "torch"):
        w, b = [t.clone() for t in w0], [torch.empty_like(t) for t in w0]
        kernels.perturb_(w, g, b, kernels.sum_squares(g), 1.0, backend=path)
        out[path] = w
    close(out["triton"], out["torch"], torch.float32)


def test_launchers_reject_mismatched_lists():
    a, b = [torch.zeros(3), torch.zeros(4)], [torch.zeros(3), torch.zeros(5)]
    with pytest.raises(ValueError, match="same shape"):
        kernels.add_(a, b, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        kernels.restore_(a, a[:1])
    with pytest.raises(ValueError, match="dtype"):
        kernels.perturb_(a, a, [t.double() for t in a], torch.ones(()), 1.0)


def test_path_selection(monkeypatch):
    cpu = [torch.zeros(2)]
    assert kernels.backend(cpu) == "torch"                     # auto: the reference on CPU
    monkeypatch.setenv("FLATTUNE_KERNELS", "torch")
    assert kernels.backend(cpu) == "torch"
    monkeypatch.setenv("FLATTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="FLATTUNE_KERNELS"):
        kernels.backend(cpu)
    if kernels.HAVE_TRITON:
        monkeypatch.setenv("FLATTUNE_KERNELS", "triton")
        assert kernels.backend(cpu) == "triton"                # the interpreter, as in these tests
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.backend(cpu)


def test_import_and_reference_work_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "assert not kernels.HAVE_TRITON and kernels.backend([torch.zeros(1)]) == 'torch'\n"
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
    base = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    weights = {}
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
    assert sam_perturb._JITTED                                 # the kernels really ran
