"""SAM (sharpness-aware minimization, Foret et al. 2021) that stays exact from a laptop to FSDP2.

One SAM step, two forward/backward passes:
  1. g = grad L(w), accumulated over all micro-batches of the step;
  2. e = rho * g / ||g||, the norm over ALL trainable parameters of the whole model (sharded ones
     included); w <- w + e, keeping an exact copy of w;
  3. g' = grad L(w + e) over the same micro-batches; w <- the copy, bit for bit;
  4. the base optimizer (AdamW by default, with its weight decay) steps with g'.
`adaptive=True` is ASAM: e = rho * w^2 * g / || |w| * g ||. `interval=k` perturbs every k-th step
and takes plain base-optimizer steps (one pass) in between.

Plain loop (accumulate `n_micro` micro-batches; two passes per step; clip the SECOND gradient):

    opt = SAM(model.parameters(), torch.optim.AdamW, rho=2.0, lr=5e-6, weight_decay=0.0)
    for batches in loader:                          # one optimizer step = n_micro micro-batches
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        if opt.perturbs_this_step:                  # always True with interval=1
            opt.first_step(zero_grad=True)          # w <- w + e, from the accumulated gradient
            for b in batches:                       # same micro-batches, at w + e
                (model(**b).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, on g'
        opt.second_step(zero_grad=True)             # restore w exactly, base step with g'
        scheduler.step()                            # schedulers work on the SAM object

fp16 with a GradScaler (bf16 autocast needs none of this): pass the scaler to both steps and call
`scaler.update()` after `second_step` as usual. A non-finite gradient in either pass skips the
step, leaves the weights exactly as they were, and the scaler backs off. Under FSDP2 this holds on
every rank even when only one rank's gradient shard is non-finite: the first pass's flag comes from
the all-reduced norm, and SAM all-reduces the second pass's found-inf flag over the sharded mesh
dimensions itself (torch >= 2.5 also does so inside DTensor's unscale; SAM does not rely on it).
tests/test_fp16_ranks.py injects an inf into one rank's shard in each pass, on 2 ranks.

        for b in batches:
            scaler.scale(model(**b).loss / len(batches)).backward()
        if opt.perturbs_this_step:
            opt.first_step(zero_grad=True, scaler=scaler)   # unscales g (scaler.unscale_(opt))
            for b in batches:
                scaler.scale(model(**b).loss / len(batches)).backward()
        scaler.unscale_(opt.base_optimizer)                 # only when clipping
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.second_step(zero_grad=True, scaler=scaler)      # scaler.step(opt.base_optimizer)
        scaler.update()

The closure form of the common PyTorch SAM wrapper also works (first pass done by the caller):
    loss_fn(model(x), y).backward(); opt.step(closure); opt.zero_grad()
where `closure` recomputes the loss and calls backward; SAM calls it only on perturbing steps,
after zeroing the first gradient, and returns its loss (None on plain steps).

After first_step: `opt.last_grad_norm` (||g||, global, after unscaling) and
`opt.last_perturbation_norm` (||e||, global) are 0-dim tensors on the device; reading them with
`.item()` is the only host sync. `opt.steps` counts optimizer steps (saved in state_dict).

Distributed: with FSDP2 (`fully_shard`, parameters are DTensors) the kernels work on the local
shards and the squared norm is all-reduced over the mesh dimensions the parameters are sharded on,
so every rank uses the same global norm and the gathered e has norm rho. Replicated parameters
(DDP, whose gradients are already averaged) are not summed across ranks. The weights are restored
in place (`copy_`), never by assigning `p.data`. FSDP1 (FullyShardedDataParallel, FlatParameter)
is refused: its flat per-rank shards would give a per-rank norm. The perturbation runs through
`kernels/`: Triton on CUDA, torch._foreach elsewhere; FLATTUNE_KERNELS=triton|torch|auto forces a
path.

Checkpoints: `opt.state_dict()` is the base optimizer's state dict plus {"sam": {"steps": n}}.
torch.distributed.checkpoint's get/set_optimizer_state_dict must be given `opt.base_optimizer`
(it calls `step()` without a closure); save `opt.steps` next to it.
"""
import math

import torch
import torch.distributed as dist

import kernels

try:
    from torch.distributed.tensor import DTensor
except ImportError:     # very old torch: no DTensor, so no FSDP2 either
    DTensor = None

try:
    from torch.amp.grad_scaler import OptState as _OptState
except ImportError:     # older layout: scaler.step() unscales, as before
    _OptState = None

EPS = 1e-12


def _set_found_inf(scaler, optimizer, found: torch.Tensor):
    """Raise the GradScaler's found-inf flags recorded for `optimizer` to `found` (a bool tensor),
    which scaler.step() reads to skip and scaler.update() to back off."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None or id(optimizer) not in states:
        return
    for v in states[id(optimizer)]["found_inf_per_device"].values():
        v.copy_(torch.maximum(v, found.to(v.device, v.dtype)))


def _check_rho(rho):
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0 \
            or not math.isfinite(rho):
        raise ValueError(f"rho must be a positive finite number (the paper uses 2.0), got {rho!r}.")


def _local(t):
    """The tensor the kernels work on: the local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _check_not_fsdp1(params):
    """FSDP1 hands the optimizer flat per-rank shards that SAM cannot tell apart from whole tensors."""
    for p in params:
        if getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False):
            raise ValueError("SAM got a parameter sharded by FSDP1 (FullyShardedDataParallel / "
                             "FlatParameter), whose gradient holds only this rank's flat shard, so "
                             "the perturbation norm would be per-rank instead of global; shard the "
                             "model with FSDP2 (torch.distributed.fsdp.fully_shard) instead.")


def _shard_key(p):
    """(mesh, sharded mesh dims) for a sharded DTensor; None when every rank holds the whole tensor."""
    if DTensor is None or not isinstance(p, DTensor):
        return None
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else None


class SAM(torch.optim.Optimizer):
    """SAM around a base optimizer; `param_groups` and `state` are the base optimizer's."""

    def __init__(self, params, base_optimizer=torch.optim.AdamW, rho: float = 2.0,
                 adaptive: bool = False, interval: int = 1, **base_kwargs):
        _check_rho(rho)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}.")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = perturb every step), "
                             f"got {interval!r}.")
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError("base_optimizer must be an optimizer class such as torch.optim.AdamW "
                             f"(SAM builds it on the same parameters), got {base_optimizer!r}.")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.interval = interval
        self.steps = 0
        self.last_grad_norm = None
        self.last_perturbation_norm = None
        self._perturbed = None          # [(local params, backups)] between first and second step
        self._first_finite = None       # device bool: was the first gradient finite?
        self._scaler = None             # the GradScaler first_step was given
        self._backups = {}              # param -> exact-copy buffer, reused every step

    def add_param_group(self, param_group):
        base = self.__dict__.get("base_optimizer")
        group = dict(param_group)
        params = group["params"]
        if not isinstance(params, set):         # a set: the base class raises its own error
            group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            _check_not_fsdp1(group["params"])
        if "rho" in group:
            _check_rho(group["rho"])
        if base is None:                # during __init__: the groups are handed to the base later
            return super().add_param_group(group)
        group.setdefault("rho", self.defaults["rho"])
        group.setdefault("adaptive", self.defaults["adaptive"])
        base.add_param_group(group)     # the lists are shared, so the group lands in both

    @property
    def perturbs_this_step(self) -> bool:
        """Whether the coming step is a SAM step (two passes) or, with interval > 1, a plain one."""
        return self.steps % self.interval == 0

    # ------------------------------------------------------------------------- the two steps

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler=None):
        """w <- w + e from the current (accumulated) gradients, keeping an exact copy of w.

        scaler: the GradScaler of an fp16 run; the gradients are unscaled first (pass it to
        second_step too). zero_grad: clear the gradients for the second pass (set to None).
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice without second_step(); the weights "
                               "are still perturbed.")
        if not self.perturbs_this_step:
            raise RuntimeError(f"step {self.steps} does not perturb (interval={self.interval}); "
                               "check opt.perturbs_this_step and call only second_step().")
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self)       # records first-pass infs, so scaler.update() backs off
        self._scaler = scaler
        buckets = self._buckets()
        sums = self._global_sums(buckets)           # bucket -> [g^2, norm^2 terms, e^2 / s^2]
        device = next(iter(sums.values())).device if sums else None
        if device is None:
            self._perturbed, self._first_finite = [], None
            return
        total = torch.stack([v for v in sums.values()]).sum(dim=0)
        # ||e||^2 = sum over buckets of s^2 * (||g||^2, or ||w^2 g||^2 for ASAM), s per bucket's rho
        e_sq = sum((rho / (total[1].sqrt() + EPS)).square() * sums[(k, rho, ad)][2]
                   for (k, rho, ad) in sums)
        self.last_grad_norm = total[0].sqrt()
        self.last_perturbation_norm = e_sq.sqrt()
        self._first_finite = torch.isfinite(total[0]) & torch.isfinite(total[1])
        if scaler is not None and scaler.is_enabled():
            # the sums are global, so every rank records the same found-inf for scaler.update()
            _set_found_inf(scaler, self, ~self._first_finite)
        self._perturbed = []
        for (key, rho, adaptive), (params, ws, gs) in buckets.items():
            backups = [self._backup(p, w) for p, w in zip(params, ws)]
            kernels.perturb_(ws, gs, backups, rho / (total[1].sqrt() + EPS), adaptive)
            self._perturbed.append((ws, backups))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler=None):
        """Restore w exactly and let the base optimizer step with the gradient taken at w + e.

        On a non-perturbing step (interval > 1) this is a plain base-optimizer step. With a
        GradScaler it calls scaler.step(base_optimizer), skipped if either gradient was not finite;
        call scaler.update() afterwards.
        """
        if self._perturbed is None and self.perturbs_this_step:
            raise RuntimeError("second_step() without first_step() on a perturbing step; call "
                               "first_step() after the first backward pass (see opt.perturbs_this_step).")
        if self._perturbed is not None and self._scaler is not None and scaler is None:
            raise RuntimeError("first_step() got a GradScaler but second_step() did not; pass "
                               "scaler= to both, or the base optimizer would step on scaled gradients.")
        if self._perturbed is not None and self._scaler is None and scaler is not None \
                and scaler.is_enabled():
            raise RuntimeError("second_step() got a GradScaler but first_step() did not, so the "
                               "perturbation used scaled gradients and scaler.update() would find no "
                               "inf checks; pass scaler= to first_step too.")
        for ws, backups in self._perturbed or []:
            kernels.restore_(ws, backups)
        first_finite, self._perturbed, self._first_finite = self._first_finite, None, None
        if scaler is not None and scaler.is_enabled():
            self._agree_on_found_inf(scaler)
            # scaler.step syncs with the host to read its inf flags; this reads ours at that point
            if first_finite is None or bool(first_finite):
                scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self.steps += 1
        self._opt_called = True         # what an LR scheduler checks to know the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """The closure form: the caller has done the first backward; `closure` redoes it at w + e."""
        if closure is None:
            raise ValueError("SAM.step() needs a closure that recomputes the loss and calls backward; "
                             "or call first_step() and second_step() yourself.")
        loss = None
        if self.perturbs_this_step:
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self):
        sd = self.base_optimizer.state_dict()
        sd["sam"] = {"steps": self.steps}
        return sd

    def load_state_dict(self, state_dict):
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(); the "
                               "weights are still perturbed.")
        state_dict = dict(state_dict)
        sam = state_dict.pop("sam", {})
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups    # load_state_dict made new lists
        self.state = self.base_optimizer.state
        self.steps = int(sam.get("steps", 0))

    # ------------------------------------------------------------------------- internals

    def _buckets(self):
        """{(shard key, rho, adaptive): (params, local params, local grads)} for params with grads."""
        buckets = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients.")
                key = (_shard_key(p), float(group["rho"]), bool(group["adaptive"]))
                params, ws, gs = buckets.setdefault(key, ([], [], []))
                params.append(p)
                ws.append(_local(p))
                gs.append(_local(p.grad))
        return buckets

    def _global_sums(self, buckets):
        """Per bucket [sum g^2, sum of the perturbation norm's squares, ||e||^2 / s^2], summed over
        the ranks that hold other shards of the same parameters (one all-reduce per sharding)."""
        local = {}
        for key, (_, ws, gs) in buckets.items():
            if key[2]:
                local[key] = kernels.asam_sums(gs, ws)
            else:
                local[key] = kernels.sum_squares(gs).reshape(1).expand(3)
        if not local:
            return {}
        device = next(iter(local.values())).device
        local = {k: v.to(device) for k, v in local.items()}
        # parameter order, the same on every rank: a set's order follows hashes that differ
        # between processes (DeviceMesh hashes strings), and ranks reducing in different orders hang
        for shard in dict.fromkeys(k[0] for k in local if k[0] is not None):
            mesh, dims = shard
            keys = [k for k in local if k[0] == shard]
            stacked = torch.stack([local[k] for k in keys])
            for d in dims:
                dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
            for k, v in zip(keys, stacked.to(device)):
                local[k] = v
        return local

    def _agree_on_found_inf(self, scaler):
        """Unscale the second gradient (unless the caller did, to clip) and make the scaler's
        found-inf flag for the base optimizer the max over the ranks that hold other shards of the
        same parameters, so every rank skips or every rank steps (one all-reduce of one number)."""
        shards = dict.fromkeys(k for group in self.param_groups for p in group["params"]
                               if p.grad is not None and (k := _shard_key(p)) is not None)
        states = getattr(scaler, "_per_optimizer_states", None)
        if not shards or states is None or not dist.is_initialized():
            return
        if _OptState is not None and states[id(self.base_optimizer)]["stage"] is _OptState.READY:
            scaler.unscale_(self.base_optimizer)
        flags = states[id(self.base_optimizer)]["found_inf_per_device"]
        if not flags:
            return
        found = torch.stack([v.to(next(iter(flags.values())).device).float().reshape(())
                             for v in flags.values()]).amax()
        for mesh, dims in shards:
            for d in dims:
                dist.all_reduce(found, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        _set_found_inf(scaler, self.base_optimizer, found > 0)

    def _backup(self, p, w):
        b = self._backups.get(p)
        if b is None or b.shape != w.shape or b.dtype != w.dtype or b.device != w.device:
            b = self._backups[p] = torch.empty_like(w, memory_format=torch.contiguous_format)
        return b
