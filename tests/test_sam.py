"""SAM against first-principles computations on small models (CPU, torch kernel path)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import common
from sam import SAM


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(),
                                torch.nn.Linear(12, 3))
    return model.to(dtype)


def batch(n=16, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen).to(dtype), torch.randn(n, 3, generator=gen).to(dtype)


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def grads_at(model, weights, x, y):
    """The gradient of the loss at `weights`, taken on a separate copy of the model."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, w in zip(probe.parameters(), weights):
            p.copy_(w)
    probe.zero_grad(set_to_none=True)
    loss_fn(probe, x, y).backward()
    return [p.grad for p in probe.parameters()]


def sam_direction(grads, rho):
    norm = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    return [rho * g / norm for g in grads], norm


def reference_sgd_step(model, x, y, rho, lr, perturb=True):
    """One SAM (or plain) step with SGD, written out from the definition."""
    w = snapshot(model)
    g = grads_at(model, w, x, y)
    if perturb:
        e, _ = sam_direction(g, rho)
        g = grads_at(model, [wi + ei for wi, ei in zip(w, e)], x, y)
    with torch.no_grad():
        for p, wi, gi in zip(model.parameters(), w, g):
            p.copy_(wi - lr * gi)


def sam_step(model, opt, micro_batches, scaler=None, inf_in=None, clip=None):
    """The loop of sam.py's docstring: accumulate, perturb, accumulate again, clip, step."""
    def accumulate():
        for x, y in micro_batches:
            loss = loss_fn(model, x, y) / len(micro_batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
    accumulate()
    if opt.perturbs_this_step:
        if inf_in == "first":
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        opt.first_step(zero_grad=True, scaler=scaler)
        accumulate()
    if inf_in == "second":
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(opt.base_optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True, scaler=scaler)
    if scaler is not None:
        scaler.update()


def test_perturbation_has_norm_rho_along_the_global_gradient():
    model = make_model()
    model[1].weight.requires_grad_(False)           # frozen: no gradient, must stay put
    x, y = batch()
    groups = [{"params": [model[0].weight, model[3].weight], "weight_decay": 0.1},
              {"params": [model[0].bias, model[1].bias, model[3].bias, model[1].weight],
               "weight_decay": 0.0}]
    opt = SAM(groups, rho=2.0, lr=1e-3)
    w0 = snapshot(model)
    loss_fn(model, x, y).backward()
    g = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    e, gnorm = sam_direction([gi for gi in g if gi is not None], 2.0)
    opt.first_step()
    e = iter(e)
    moved = 0.0
    for p, w, gi in zip(model.parameters(), w0, g):
        if gi is None:
            assert torch.equal(p, w)
            continue
        step = p.detach().double() - w.double()
        torch.testing.assert_close(step, next(e).double(), atol=1e-6, rtol=0)
        moved += step.square().sum().item()
    assert math.sqrt(moved) == pytest.approx(2.0, rel=1e-5)     # one norm over both groups
    assert opt.last_grad_norm.item() == pytest.approx(gnorm, rel=1e-5)
    assert opt.last_perturbation_norm.item() == pytest.approx(2.0, rel=1e-5)


def test_a_group_with_its_own_rho_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="one radius"):
        SAM([{"params": list(model.parameters()), "rho": 1.0}], rho=2.0, lr=1e-3)


def test_base_optimizer_steps_with_the_gradient_at_the_perturbed_point():
    model, x, y = make_model(), *batch()
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, lr=0.1)
    sam_step(model, opt, [(x, y)])
    w0 = snapshot(reference)
    g1 = grads_at(reference, w0, x, y)
    e, _ = sam_direction(g1, 2.0)
    g2 = grads_at(reference, [w + ei for w, ei in zip(w0, e)], x, y)
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) > 1e-2   # SAM matters here
    for p, w, gi in zip(model.parameters(), w0, g2):
        torch.testing.assert_close(p.detach(), w - 0.1 * gi, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_exact_and_in_place(dtype):
    model = make_model(dtype=dtype)
    x, y = batch(dtype=dtype)
    params = list(model.parameters())
    pointers = [p.data_ptr() for p in params]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, lr=0.0)    # lr 0: only the restore acts
    w0 = snapshot(model)
    loss_fn(model, x, y).backward()
    e, _ = sam_direction([p.grad.float() for p in params], 2.0)
    opt.first_step(zero_grad=True)
    # subtracting e again would not give w back, so this test can tell an exact restore from that
    assert any(not torch.equal((p.detach() - ei.to(dtype)), w) for p, ei, w in zip(params, e, w0))
    loss_fn(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert list(model.parameters()) == params
    assert [p.data_ptr() for p in model.parameters()] == pointers


def test_adaptive_matches_the_asam_formula():
    model, x, y = make_model(), *batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.0)
    w0 = snapshot(model)
    loss_fn(model, x, y).backward()
    g = [p.grad.double() for p in model.parameters()]
    denom = math.sqrt(sum((w.double().abs() * gi).square().sum().item() for w, gi in zip(w0, g)))
    expected = [0.5 * w.double().square() * gi / denom for w, gi in zip(w0, g)]
    opt.first_step()
    for p, w, ei in zip(model.parameters(), w0, expected):
        torch.testing.assert_close(p.detach().double() - w.double(), ei, atol=1e-6, rtol=0)
    e_norm = math.sqrt(sum(ei.square().sum().item() for ei in expected))
    assert opt.last_perturbation_norm.item() == pytest.approx(e_norm, rel=1e-5)
    assert opt.last_grad_norm.item() == pytest.approx(
        math.sqrt(sum(gi.square().sum().item() for gi in g)), rel=1e-5)


def test_accumulating_four_micro_batches_equals_one_batch_four_times_larger():
    big, small = make_model(), make_model()
    opt_big = SAM(big.parameters(), torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9)
    opt_small = SAM(small.parameters(), torch.optim.SGD, rho=2.0, lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = batch(n=16, seed=step)
        sam_step(big, opt_big, [(x, y)])
        sam_step(small, opt_small, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_grad_scaler_step_equals_the_unscaled_step_with_clipping():
    plain, scaled = make_model(), make_model()
    opt_plain = SAM(plain.parameters(), rho=2.0, lr=1e-2, weight_decay=0.1)
    opt_scaled = SAM(scaled.parameters(), rho=2.0, lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for step in range(2):
        x, y = batch(seed=step)
        sam_step(plain, opt_plain, [(x, y)], clip=0.5)
        sam_step(scaled, opt_scaled, [(x, y)], scaler=scaler, clip=0.5)
        torch.testing.assert_close(opt_scaled.last_grad_norm, opt_plain.last_grad_norm)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


@pytest.mark.parametrize("inf_in", ["first", "second"])
def test_grad_scaler_skips_a_step_with_an_inf_and_leaves_the_weights(inf_in):
    model, x, y = make_model(), *batch()
    opt = SAM(model.parameters(), rho=2.0, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    w0 = snapshot(model)
    sam_step(model, opt, [(x, y)], scaler=scaler, inf_in=inf_in)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert len(opt.base_optimizer.state) == 0                  # AdamW never stepped
    assert scaler.get_scale() == 2.0 ** 11                      # backed off
    sam_step(model, opt, [(x, y)], scaler=scaler)               # and training goes on
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def run_steps(model, opt, scheduler, seeds):
    for seed in seeds:
        sam_step(model, opt, [batch(seed=seed)])
        scheduler.step()


def test_state_dict_round_trip_resumes_identically():
    def build(seed):
        model = make_model(seed)
        opt = SAM(model.parameters(), rho=2.0, interval=2, lr=1e-2, weight_decay=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt, scheduler = build(0)
    run_steps(model, opt, scheduler, range(3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scheduler.state_dict()))
    run_steps(model, opt, scheduler, range(3, 6))
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 7)  # scheduler drove it

    resumed, opt2, scheduler2 = build(seed=5)
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    assert saved[1]["sam"] == {"steps": 3, "variant": "sam"} and not opt2.perturbs_this_step
    run_steps(resumed, opt2, scheduler2, range(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    assert opt2.param_groups is opt2.base_optimizer.param_groups


def test_interval_perturbs_every_kth_step_and_steps_plainly_between():
    model = make_model()
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, interval=3, lr=0.1)
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    pattern = []
    for step in range(4):
        x, y = batch(seed=step)
        pattern.append(opt.perturbs_this_step)
        sam_step(model, opt, [(x, y)])
        reference_sgd_step(reference, x, y, rho=1.0, lr=0.1, perturb=pattern[-1])
        if step == 1:
            loss_fn(model, x, y).backward()
            with pytest.raises(RuntimeError, match="perturbs_this_step"):
                opt.first_step()
            opt.zero_grad()
            passes.pop()
    assert pattern == [True, False, False, True]
    assert len(passes) == 2 + 1 + 1 + 2
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_no_nan_and_params_without_grad_are_skipped(adaptive):
    model, x, _ = make_model(), *batch()
    unused = torch.nn.Parameter(torch.randn(4))
    opt = SAM([*model.parameters(), unused], torch.optim.SGD, rho=2.0, adaptive=adaptive, lr=0.1)
    w0 = snapshot(model)
    (0.0 * model(x).sum()).backward()
    opt.first_step()
    assert opt.last_grad_norm.item() == 0.0 and opt.last_perturbation_norm.item() == 0.0
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert unused.grad is None
    opt.second_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs, name", [
    ({"rho": 0.0}, "rho"), ({"rho": -1.0}, "rho"), ({"rho": float("nan")}, "rho"),
    ({"interval": 0}, "interval"), ({"interval": 1.5}, "interval"),
    ({"adaptive": "yes"}, "adaptive"), ({"base_optimizer": "adamw"}, "base_optimizer"),
])
def test_impossible_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SAM(make_model().parameters(), **kwargs)


def test_misuse_raises_clear_errors():
    model, x, y = make_model(), *batch()
    opt = SAM(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(model.parameters(), base_optimizer=torch.optim.AdamW(model.parameters()))
    scaled, scaler = make_model(), torch.amp.GradScaler("cpu")
    opt = SAM(scaled.parameters(), lr=1e-3)
    scaler.scale(loss_fn(scaled, x, y)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(loss_fn(scaled, x, y)).backward()
    with pytest.raises(RuntimeError, match="scaler"):
        opt.second_step()


def test_closure_form_two_passes_under_bf16_autocast_equals_explicit_steps():
    model = common.load_model("tiny")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))

    def loss_of(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(input_ids=ids, labels=ids).loss
    passes = []
    model.register_forward_hook(lambda *args: passes.append(1))
    opt, opt_twin = SAM(model.parameters(), lr=1e-3), SAM(twin.parameters(), lr=1e-3)
    for _ in range(2):
        loss_of(model).backward()

        def closure():
            loss = loss_of(model)
            loss.backward()
            return loss
        assert torch.isfinite(opt.step(closure))
        opt.zero_grad()
        loss_of(twin).backward()
        opt_twin.first_step(zero_grad=True)
        loss_of(twin).backward()
        opt_twin.second_step(zero_grad=True)
    assert len(passes) == 4                                     # exactly two per SAM step
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert opt.last_perturbation_norm.item() == pytest.approx(2.0, rel=1e-4)


@pytest.fixture
def one_rank(tmp_path):
    """A single-process gloo group: real DeviceMeshes, DTensors and FSDP wrappers without spawning."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_shardings_are_all_reduced_in_parameter_order(one_rank, monkeypatch):
    # eight distinct meshes: a set of them iterates in hash order (DeviceMesh hashes strings and a
    # thread id, so it differs between processes); ranks must all reduce in one agreed order
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    params = []
    for i in range(8):
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=(f"dim{i}",))
        p = torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.full((4,), float(i + 1)), mesh, [Shard(0)])
        params.append(p)
    reduced, real = [], one_rank.all_reduce

    def spy(tensor, *args, **kwargs):
        reduced.append(tensor[0, 0].item())         # the bucket's sum of g^2: 4 (i + 1)^2
        return real(tensor, *args, **kwargs)
    monkeypatch.setattr(one_rank, "all_reduce", spy)
    opt = SAM(params, torch.optim.SGD, rho=1.0, lr=0.0)
    opt.first_step()
    assert reduced == [4.0 * (i + 1) ** 2 for i in range(8)]
    assert opt.last_grad_norm.item() == pytest.approx(math.sqrt(sum(4 * (i + 1) ** 2 for i in range(8))))


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_parameters_are_refused_naming_fully_shard(one_rank, use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    wrapped = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        SAM(wrapped.parameters(), lr=1e-3)
    opt = SAM([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="FSDP1"):
        opt.add_param_group({"params": wrapped.parameters()})


def test_a_scaler_given_only_to_second_step_is_refused():
    model, x, y = make_model(), *batch()
    opt, scaler = SAM(model.parameters(), lr=1e-3), torch.amp.GradScaler("cpu")
    scaler.scale(loss_fn(model, x, y)).backward()
    opt.first_step(zero_grad=True)
    scaler.scale(loss_fn(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="scaler= to first_step too"):
        opt.second_step(scaler=scaler)
