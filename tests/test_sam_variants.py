"""The SAM variants (sam.py `variant=`) against step-by-step computations written from their papers."""
import copy
import math

import pytest
import torch

from sam import SAM, VARIANTS, normalization_parameters
from test_sam import batch, grads_at, loss_fn, make_model, snapshot


def step(model, opt, x, y):
    """The loop of sam.py's docstring for any variant; returns the passes it took."""
    passes = 1
    if opt.perturbs_before_pass:
        opt.first_step()
    loss_fn(model, x, y).backward()
    if opt.perturbs_this_step:
        opt.first_step(zero_grad=True)
        loss_fn(model, x, y).backward()
        passes = 2
    opt.second_step(zero_grad=True)
    return passes


def build(variant, model, base=torch.optim.SGD, rho=0.5, interval=1, **kw):
    only = normalization_parameters(model) if variant == "samon" else None
    return SAM(model.parameters(), base, rho=rho, variant=variant, interval=interval, perturb_only=only, **kw)


def unit(vs, rho):
    norm = math.sqrt(sum(v.double().square().sum().item() for v in vs))
    return [rho * v.double() / norm for v in vs]


def test_samon_perturbs_only_the_norm_layer_and_steps_every_parameter_with_g_prime():
    model, (x, y) = make_model(), batch()
    reference = copy.deepcopy(model)
    opt = build("samon", model, lr=0.1)
    norm_ids = {id(p) for p in model[1].parameters()}
    assert {id(p) for p in normalization_parameters(model)} == norm_ids     # the LayerNorm's two
    w = snapshot(reference)
    g = grads_at(reference, w, x, y)
    on = [i for i, p in enumerate(model.parameters()) if id(p) in norm_ids]
    e = dict(zip(on, unit([g[i] for i in on], 0.5)))          # rho g_N / ||g_N||, N: norm layers
    g2 = grads_at(reference, [wi + e[i].float() if i in e else wi for i, wi in enumerate(w)], x, y)
    assert step(model, opt, x, y) == 2
    assert opt.last_perturbation_norm.item() == pytest.approx(0.5, rel=1e-5)
    assert opt.last_grad_norm.item() == pytest.approx(math.sqrt(sum(gi.square().sum().item() for gi in g)), rel=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(g, g2)) > 1e-3       # the perturbation matters
    for p, wi, gi in zip(model.parameters(), w, g2):
        torch.testing.assert_close(p.detach(), wi - 0.1 * gi, atol=1e-6, rtol=0)


def test_looksam_reuses_the_orthogonal_component_between_sam_steps():
    model, reference = make_model(), make_model()
    alpha, rho, lr, k = 0.7, 0.5, 0.1, 2
    opt = build("looksam", model, rho=rho, interval=k, looksam_alpha=alpha, lr=lr)
    passes, gv = [], None
    for t in range(5):
        x, y = batch(seed=t)
        passes.append(step(model, opt, x, y))
        # by hand, Liu et al. 2022 Algorithm 1, in float64 dot products
        w = snapshot(reference)
        g = [gi.double() for gi in grads_at(reference, w, x, y)]
        if t % k == 0:
            e = unit(g, rho)
            gs = [gi.double() for gi in grads_at(reference, [wi + ei.float() for wi, ei in zip(w, e)], x, y)]
            c = sum((a * b).sum() for a, b in zip(g, gs)) / sum(a.square().sum() for a in g)
            gv = [b - c * a for a, b in zip(g, gs)]
            assert abs(sum((a * b).sum() for a, b in zip(gv, g)).item()) < 1e-9     # orthogonal to g
        else:
            gnorm = math.sqrt(sum(a.square().sum().item() for a in g))
            vnorm = math.sqrt(sum(a.square().sum().item() for a in gv))
            gs = [a + alpha * gnorm / vnorm * b for a, b in zip(g, gv)]
        with torch.no_grad():
            for p, wi, gi in zip(reference.parameters(), w, gs):
                p.copy_(wi - lr * gi.float())
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    assert passes == [2, 1, 2, 1, 2]
    assert all("looksam_gv" in opt.state[p] for p in model.parameters())      # in state_dict


def adamw_by_hand(w, g, m, v, t, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's update, written out (Loshchilov & Hutter 2019, Algorithm 2)."""
    m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
    v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
    w = [wi * (1 - lr * wd) - lr / (1 - b1 ** t) * mi / ((vi / (1 - b2 ** t)).sqrt() + eps)
         for wi, mi, vi in zip(w, m, v)]
    return w, m, v


def test_msam_takes_its_one_gradient_at_w_minus_rho_m_over_norm_m():
    model, reference = make_model(), make_model()
    rho, lr, wd = 0.3, 1e-2, 0.1
    opt = build("msam", model, base=torch.optim.AdamW, rho=rho, lr=lr, weight_decay=wd)
    w = [p.detach().double() for p in reference.parameters()]
    m = [torch.zeros_like(wi) for wi in w]
    v = [torch.zeros_like(wi) for wi in w]
    for t in range(1, 4):
        x, y = batch(seed=t)
        assert step(model, opt, x, y) == 1
        # Becker et al. 2024, Algorithm 1 with AdamW's first moment: w~ = w - rho m / ||m|| (m = 0: w)
        e = [torch.zeros_like(mi) for mi in m] if t == 1 else [-ei for ei in unit(m, rho)]
        g = [gi.double() for gi in grads_at(reference, [(wi + ei).float() for wi, ei in zip(w, e)], x, y)]
        if t > 1:
            assert opt.last_perturbation_norm.item() == pytest.approx(rho, rel=1e-5)
        w, m, v = adamw_by_hand(w, g, m, v, t, lr, wd)
        for a, b in zip(model.parameters(), w):
            torch.testing.assert_close(a.detach().double(), b, atol=1e-6, rtol=0)
    plain = make_model()
    adam = torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=wd)
    for t in range(1, 4):
        loss_fn(plain, *batch(seed=t)).backward()
        adam.step()
        adam.zero_grad()
    assert max((a - b).abs().max().item() for a, b in zip(plain.parameters(), model.parameters())) > 1e-5


def no_zero_weights(seed=0):
    """make_model with every weight away from 0, so that w + e == w for a tiny e (0 + e != 0)."""
    model = make_model(seed)
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.0)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_radius_too_small_to_move_w_gives_adamws_step_exactly(variant):
    model, plain = no_zero_weights(), no_zero_weights()
    opt = build(variant, model, base=torch.optim.AdamW, rho=1e-30, interval=2 if variant == "looksam" else 1,
                lr=1e-2, weight_decay=0.1)
    adam = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1)
    moved = []
    for t in range(4):
        x, y = batch(seed=t)
        w = snapshot(model)
        if opt.perturbs_before_pass:
            opt.first_step()
            moved.append(not all(torch.equal(p, wi) for p, wi in zip(model.parameters(), w)))
        loss_fn(model, x, y).backward()
        if opt.perturbs_this_step:
            opt.first_step(zero_grad=True)
            moved.append(not all(torch.equal(p, wi) for p, wi in zip(model.parameters(), w)))
            loss_fn(model, x, y).backward()
        opt.second_step(zero_grad=True)
        loss_fn(plain, x, y).backward()
        adam.step()
        adam.zero_grad()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters())), t
    assert moved and not any(moved)                      # the premise: w + e == w in fp32
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), no_zero_weights().parameters()))


@pytest.mark.parametrize("variant", ["looksam", "msam"])
def test_state_dict_resume_equals_uninterrupted(variant):
    def build_run(seed):
        model = make_model(seed)
        return model, build(variant, model, base=torch.optim.AdamW, rho=0.3, interval=3 if variant == "looksam" else 1,
                            lr=1e-2)
    model, opt = build_run(0)
    for t in range(4):
        step(model, opt, *batch(seed=t))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for t in range(4, 8):
        step(model, opt, *batch(seed=t))
    resumed, opt2 = build_run(5)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for t in range(4, 8):
        step(resumed, opt2, *batch(seed=t))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    with pytest.raises(ValueError, match="same variant"):
        build("sam", make_model(), base=torch.optim.AdamW, lr=1e-2).load_state_dict(saved[1])


def test_variant_misuse_is_one_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="variant must be one of"):
        SAM(model.parameters(), variant="gsam", lr=0.1)
    with pytest.raises(ValueError, match="perturb_only"):
        SAM(model.parameters(), variant="samon", lr=0.1)
    with pytest.raises(ValueError, match="perturb_only"):
        SAM(model.parameters(), variant="samon", perturb_only=[], lr=0.1)
    with pytest.raises(ValueError, match="interval"):
        SAM(model.parameters(), variant="msam", interval=2, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, variant="msam", lr=0.1, momentum=0.9)
    opt.first_step()                                     # no state yet: nothing to perturb along
    loss_fn(model, *batch()).backward()
    opt.second_step(zero_grad=True)
    with pytest.raises(ValueError, match="Adam-family"):
        opt.first_step()
    with pytest.raises(ValueError, match="closure"):
        build("msam", make_model(), base=torch.optim.AdamW, lr=0.1).step(lambda: None)
    looksam = build("looksam", model, lr=0.1)
    loss_fn(model, *batch()).backward()
    with pytest.raises(ValueError, match="GradScaler"):
        looksam.first_step(scaler=torch.amp.GradScaler("cpu"))
    assert SAM(model.parameters(), adaptive=True, lr=0.1).variant == "asam"
