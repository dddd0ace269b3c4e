"""landscape.py: metrics against closed forms, exact restore, directions, Hessian, CLI and --compare."""
import json

import numpy as np
import pytest
import torch

import landscape
from landscape import flatness_metrics, hessian_top_eigenvalue, hessian_trace, random_directions, surface


def grid(r, n):
    return np.linspace(-r, r, n)


# ----------------------------------------------------------------------------- metrics, closed forms
# f = p a^2 + q b^2 on odd symmetric grids (radii ra, rb; m, n points; steps ha, hb):
#   second differences are exact for quadratics  -> sc = |2p + 2q|
#   |Z[i,j+1] - Z[i,j]| / hb = |q| |b_j + b_j+1|, midpoints +-hb/2, +-3hb/2, ... -> mag = |q| rb
#   np.gradient(edge_order=2) is exact for quadratics -> grad = (2p a, 2q b); with q = 0,
#   mean |2p a| over a grid of m points = |p| ra (m + 1) / m

@pytest.mark.parametrize("p,q,ra,rb,m,n", [(1.5, -0.5, 1.0, 0.5, 7, 9), (0.3, 2.0, 2.0, 1.0, 5, 3),
                                           (-1.0, -1.0, 0.1, 0.1, 21, 21)])
def test_metrics_equal_closed_forms_on_quadratics(p, q, ra, rb, m, n):
    a, b = grid(ra, m), grid(rb, n)
    A, B = np.meshgrid(a, b, indexing="ij")
    met = flatness_metrics(p * A ** 2 + q * B ** 2, a, b)
    assert met["sc"] == pytest.approx(abs(2 * p + 2 * q), rel=1e-9)
    assert met["mag"] == pytest.approx(abs(q) * rb, rel=1e-9)
    assert met["ag"] == pytest.approx(np.mean(np.hypot(2 * p * A, 2 * q * B)), rel=1e-9)
    only_a = flatness_metrics(p * A ** 2, a, b)
    assert only_a["ag"] == pytest.approx(abs(p) * ra * (m + 1) / m, rel=1e-9)
    assert only_a["mag"] == pytest.approx(0.0, abs=1e-12)            # MAG looks along the rows only
    only_b = flatness_metrics(q * B ** 2, a, b)
    assert only_b["ag"] == pytest.approx(abs(q) * rb * (n + 1) / n, rel=1e-9)


def test_metrics_ignore_a_plane_and_reject_bad_grids():
    a, b = grid(1, 5), grid(1, 5)
    A, B = np.meshgrid(a, b, indexing="ij")
    met = flatness_metrics(3 + 0.5 * A - 2 * B, a, b)                # tilted plane: no curvature
    assert met["sc"] == pytest.approx(0, abs=1e-9)
    assert met["ag"] == pytest.approx(np.hypot(0.5, 2), rel=1e-9) and met["mag"] == pytest.approx(2)
    with pytest.raises(ValueError, match="evenly spaced"):
        flatness_metrics(np.zeros((3, 3)), [0, 1, 3], [0, 1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        flatness_metrics(np.zeros((2, 3)), [0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="shape"):
        flatness_metrics(np.zeros((3, 4)), [0, 1, 2], [0, 1, 2])


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))


def test_surface_of_a_quadratic_model_has_the_right_orientation_and_metrics():
    model, p, q = Quadratic(), 1.25, 0.4
    loss_fn = lambda m: p * (m.w[0] - 0.3) ** 2 + q * (m.w[1] + 0.2) ** 2
    d1, d2 = [torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    a, b = grid(1.0, 5), grid(2.0, 7)
    Z = surface(model, loss_fn, d1, d2, a, b, progress=False)
    A, B = np.meshgrid(a, b, indexing="ij")
    np.testing.assert_allclose(Z, p * A ** 2 + q * B ** 2, atol=1e-12)
    met = flatness_metrics(Z, a, b)
    assert met["sc"] == pytest.approx(2 * (p + q), rel=1e-9) and met["mag"] == pytest.approx(q * 2.0, rel=1e-9)
    assert model.w.tolist() == [0.3, -0.2]


def test_serpentine_moves_one_step_at_a_time():
    order = landscape.serpentine(4, 5)
    assert sorted(order) == [(i, j) for i in range(4) for j in range(5)]
    assert all(abs(i - k) + abs(j - l) == 1 for (i, j), (k, l) in zip(order, order[1:]))


# ----------------------------------------------------------------------------- the tiny model

@pytest.fixture(scope="module")
def tiny(tiny_path):
    import common
    tok = common.load_tokenizer(tiny_path)
    model = common.load_model(tiny_path)
    batches = landscape.eval_batches("gsm8k", tok, batches=1, batch_size=2, max_len=128)
    return model, landscape.SFTLoss(batches)


def test_scan_restores_weights_bit_exactly_and_visits_the_exact_points(tiny):
    model, loss_fn = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = random_directions(model, seed=0)
    a = b = grid(0.5, 3)
    Z = surface(model, loss_fn, d1, d2, a, b, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert Z[1, 1] == pytest.approx(loss_fn(model), abs=1e-5)          # centre = theta0 (up to walk drift)
    assert np.ptp(Z) > 1e-3                                             # the walk really moved the weights
    with torch.no_grad():                                               # corner (a=+0.5, b=-0.5) set directly
        for w, x, y in zip(landscape._params(model), d1, d2):
            w.add_(0.5 * x - 0.5 * y)
        corner = loss_fn(model)
        model.load_state_dict(before)
    assert Z[2, 0] == pytest.approx(corner, abs=1e-5)


def test_directions_are_seeded_and_filter_normalised(tiny):
    model, _ = tiny
    d1, d2 = random_directions(model, seed=3)
    e1, e2 = random_directions(model, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(d1 + d2, e1 + e2))
    assert not torch.equal(random_directions(model, seed=4)[0][0], d1[0])
    assert not torch.equal(d1[0], d2[0])
    raw, _ = random_directions(model, seed=3, norm="none")
    for (name, w), x, r in zip(model.named_parameters(), d1, raw):
        if w.dim() == 1:
            assert torch.count_nonzero(x) == 0, name                   # norms are not perturbed
            continue
        torch.testing.assert_close(x.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=1e-6)
        k = x.flatten(1)[0].norm() / r.flatten(1)[0].norm()             # a rescaling of the raw Gaussian
        torch.testing.assert_close(x.flatten(1)[0], k * r.flatten(1)[0])
    with pytest.raises(ValueError, match="norm"):
        random_directions(model, seed=0, norm="layer")


def test_surface_refuses_low_precision_weights_it_would_walk_off_the_grid():
    model = Quadratic().to(torch.bfloat16)
    d = [torch.tensor([1.0, 0.0], dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        surface(model, lambda m: m.w.sum(), d, d, grid(1.0, 3), grid(1.0, 3), progress=False)
    assert model.w.tolist() == [0.30078125, -0.2001953125]               # untouched (bf16 values)


def test_directions_save_and_load(tiny, tmp_path):
    model, _ = tiny
    d1, d2 = random_directions(model, seed=5)
    landscape.save_directions(tmp_path / "d.pt", model, d1, d2, seed=5, norm="filter")
    e1, e2, meta = landscape.load_directions(tmp_path / "d.pt", model)
    assert meta == {"seed": 5, "norm": "filter"}
    assert all(torch.equal(x, y) for x, y in zip(d1 + d2, e1 + e2))
    with pytest.raises(ValueError, match="different parameters"):
        landscape.load_directions(tmp_path / "d.pt", torch.nn.Linear(3, 2))


# ----------------------------------------------------------------------------- Hessian, closed form
# L(W) = mean_{n,o} (W x_n - y_n)_o^2 with W of shape (out, in): H = I_out (x) G, G = 2 X^T X / (N out),
# so lambda_max = max eig(G) and tr(H) = out tr(G) = 2 ||X||_F^2 / N.

def linear_mse(X, out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(X.shape[0], out, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(X.shape[1], out, bias=False).double()
    G = 2 * X.T @ X / (X.shape[0] * out)
    return model, lambda m: ((m(X) - Y) ** 2).mean(), G


def test_hessian_of_a_linear_mse_model_matches_its_closed_form():
    X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model, loss_fn, G = linear_mse(X)
    lam = hessian_top_eigenvalue(model, loss_fn, iters=200, tol=1e-12)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(G).max()), rel=1e-6)
    tr, se = hessian_trace(model, loss_fn, samples=400, seed=0)
    exact = 3 * float(torch.trace(G))
    assert se > 0 and abs(tr - exact) < 4 * se


def test_hutchinson_is_exact_when_the_hessian_is_diagonal():
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    X = q[:, :4] * torch.tensor([3.0, 2.0, 1.5, 0.5], dtype=torch.float64)   # orthogonal columns
    model, loss_fn, G = linear_mse(X)
    tr, se = hessian_trace(model, loss_fn, samples=3, seed=7)
    assert tr == pytest.approx(3 * float(torch.trace(G)), rel=1e-10) and se == pytest.approx(0, abs=1e-10)
    assert hessian_top_eigenvalue(model, loss_fn, iters=300, tol=1e-13) == pytest.approx(
        2 * 9.0 / (10 * 3), rel=1e-6)


# ----------------------------------------------------------------------------- CLI and --compare

def test_cli_writes_all_outputs_and_compare_writes_the_table(tiny, tiny_path, tmp_path):
    common_args = dict(model=tiny_path, data="gsm8k", steps=3, batches=1, batch_size=2, max_len=128)
    m_a = landscape.main(out=str(tmp_path / "a"), hessian=True, hessian_iters=1, hutchinson_samples=2,
                         directions=str(tmp_path / "dirs.pt"), **common_args)
    # the same directions re-saved through the API without seed/norm: --compare must still read b
    d1, d2, _ = landscape.load_directions(tmp_path / "dirs.pt", tiny[0])
    landscape.save_directions(tmp_path / "anon.pt", tiny[0], d1, d2)
    m_b = landscape.main(out=str(tmp_path / "b"), data_seed=1, directions=str(tmp_path / "anon.pt"),
                         **common_args)
    with np.load(tmp_path / "b" / "surface.npz") as z:                  # no object arrays
        assert z["seed"] == -1 and z["norm"] == "unknown"
    for run, m in (("a", m_a), ("b", m_b)):
        for f in ("surface.npz", "metrics.json", "args.json", "contour.png", "surface3d.png"):
            assert (tmp_path / run / f).stat().st_size > 0, (run, f)
        with np.load(tmp_path / run / "surface.npz") as z:
            assert z["Z"].shape == (3, 3)
            assert flatness_metrics(z["Z"], z["alphas"], z["betas"]) == {k: m[k] for k in ("sc", "ag", "mag")}
        assert json.loads((tmp_path / run / "metrics.json").read_text())["sc"] == m["sc"]
    assert np.isfinite(m_a["hessian_top_eigenvalue"]) and np.isfinite(m_a["hessian_trace"])
    assert json.loads((tmp_path / "b" / "args.json").read_text())["data_seed"] == 1

    landscape.main(compare=[str(tmp_path / "a"), str(tmp_path / "b")], labels=["first", "second"],
                   out=str(tmp_path / "cmp"))
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert table.splitlines()[0].startswith("| model | SC | AG | MAG | lambda_max | tr(H) |")
    assert f"| second | {100 * m_b['sc']:.2f} | {100 * m_b['ag']:.2f} | {100 * m_b['mag']:.2f} | - | - |" in table
    rows = json.loads((tmp_path / "cmp" / "table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["first", "second"] and rows[0]["mag"] == m_a["mag"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


# ----------------------------------------------------------------------------- two ranks (gloo)

def _two_rank_worker(rank, tmp):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    model, p, q = Quadratic(), 1.25, 0.4
    loss_fn = lambda m: p * (m.w[0] - 0.3) ** 2 + q * (m.w[1] + 0.2) ** 2
    d1, d2 = [torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    Z = surface(model, loss_fn, d1, d2, grid(1.0, 3), grid(2.0, 5), progress=False)
    X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lin, lin_loss, _ = linear_mse(X)
    tr, se = hessian_trace(lin, lin_loss, samples=5, seed=0)
    np.save(f"{tmp}/rank{rank}.npy", np.concatenate([Z.ravel(), [tr, se], model.w.detach().numpy()]))
    dist.destroy_process_group()


def test_two_ranks_split_the_grid_and_the_hutchinson_samples(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path),), nprocs=2)
    a, b = grid(1.0, 3), grid(2.0, 5)
    A, B = np.meshgrid(a, b, indexing="ij")
    X = torch.randn(12, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lin, lin_loss, _ = linear_mse(X)
    single = hessian_trace(lin, lin_loss, samples=5, seed=0)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_allclose(got[:15].reshape(3, 5), 1.25 * A ** 2 + 0.4 * B ** 2, atol=1e-12)
        np.testing.assert_allclose(got[15:17], single, rtol=1e-12)
        assert got[17:].tolist() == [0.3, -0.2]
