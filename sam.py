"""SAM (sharpness-aware minimization, Foret et al. 2021) and its cheap variants, exact from a laptop
to FSDP2.

One SAM step, two forward/backward passes:
  1. g = grad L(w), accumulated over all micro-batches of the step;
  2. e = rho * g / ||g||, the norm over ALL trainable parameters of the whole model (sharded ones
     included); w <- w + e, keeping an exact copy of w;
  3. g' = grad L(w + e) over the same micro-batches; w <- the copy, bit for bit;
  4. the base optimizer (AdamW by default, with its weight decay) steps with g'.
`rho` goes one way: SAM forms scale = rho / (||g|| + eps) once, as a 0-dim tensor on the device,
and kernels.perturb_ loads it (no host sync). `interval=k` perturbs every k-th step and takes plain
base-optimizer steps (one pass) in between.

`variant=` (the docstrings of _gradient_perturb, _msam_perturb and _looksam_gradient cite each paper):
  "sam"      Foret et al. 2021, above. Two passes a step.
  "asam"     Kwon et al. 2021: e = rho * w^2 g / || |w| g ||. Two passes. (`adaptive=True` = this.)
  "samon"    Mueller et al. 2023 (SAM-ON): SAM on the normalisation parameters only (`perturb_only=`
             those, e.g. normalization_parameters(model)); every parameter steps with g'. Two passes.
  "looksam"  Liu et al. 2022: the SAM gradient every k = `interval` steps, keeping the part of it
             orthogonal to g; in between g + alpha ||g|| / ||g_v|| g_v. 1 + 1/k passes a step.
  "msam"     Becker et al. 2024 (Momentum-SAM): e = -rho m / ||m|| from AdamW's first moment m,
             taken BEFORE the step's one pass; the gradient at w + e drives the step. One pass.

The loop, every variant (accumulate `n_micro` micro-batches; clip the gradient the base uses):

    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, variant="sam", lr=5e-6)
    for batches in loader:                          # one optimizer step = n_micro micro-batches
        if opt.perturbs_before_pass:                # msam: w <- w - rho m / ||m||
            opt.first_step()
        for b in batches:
            (model(**b).loss / len(batches)).backward()
        if opt.perturbs_this_step:                  # two-pass steps
            opt.first_step(zero_grad=True)          # w <- w + e, from the accumulated gradient
            for b in batches:                       # same micro-batches, at w + e
                (model(**b).loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # optional, on g'
        opt.second_step(zero_grad=True)             # restore w exactly, base step
        scheduler.step()                            # schedulers work on the SAM object

fp16 with a GradScaler (bf16 autocast needs none of this): pass the scaler to both steps and call
`scaler.update()` after `second_step` as usual; call `scaler.unscale_(opt.base_optimizer)` before
clipping. A non-finite gradient in either pass skips the step, leaves the weights exactly as they
were, and the scaler backs off. Under FSDP2 this holds on every rank even when only one rank's
gradient shard is non-finite: the first pass's flag comes from the all-reduced norm, and SAM
all-reduces the second pass's found-inf flag over the sharded mesh dimensions itself.
tests/test_fp16_ranks.py injects an inf into one rank's shard in each pass, on 2 ranks. LookSAM
refuses a GradScaler (a skipped step would leave g_v from an overflowed gradient).

The closure form of the common PyTorch SAM wrapper also works (first pass done by the caller; not
for msam, whose perturbation comes before that pass):
    loss_fn(model(x), y).backward(); opt.step(closure); opt.zero_grad()

After first_step: `opt.last_grad_norm` (||g||, global, after unscaling; None for msam) and
`opt.last_perturbation_norm` (||e||, global) are 0-dim tensors on the device; reading them with
`.item()` is the only host sync. `opt.steps` counts optimizer steps.

Distributed: with FSDP2 (`fully_shard`, parameters are DTensors) the kernels work on the local
shards and every squared norm or dot product is all-reduced over the mesh dimensions the
parameters are sharded on, so every rank uses the same global norm. Replicated parameters (DDP,
whose gradients are already averaged) are not summed across ranks. The weights are restored in
place (`copy_`), never by assigning `p.data`. FSDP1 (FlatParameter) is refused: its flat per-rank
shards would give a per-rank norm. The perturbation runs through `kernels/`: Triton on CUDA,
torch._foreach elsewhere; FLATTUNE_KERNELS=triton|torch|auto forces a path.

Checkpoints: `opt.state_dict()` is the base optimizer's state dict (LookSAM's g_v in each
parameter's state as "looksam_gv", msam's m is AdamW's own) plus {"sam": {"steps", "variant"}}.
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
VARIANTS = ("sam", "asam", "looksam", "msam", "samon")


def normalization_parameters(module: torch.nn.Module) -> list:
    """The trainable parameters of every normalisation layer (LayerNorm, RMSNorm, BatchNorm...):
    SAM-ON's perturbed set; for a Llama model the RMSNorm weights."""
    return [p for m in module.modules() if "norm" in type(m).__name__.lower()
            for p in m.parameters(recurse=False) if p.requires_grad]


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


def _global_sum(params, local_sums):
    """sum over `params` of local_sums(indices) (an fp32 [k] tensor per sharding), summed over the
    ranks that hold other shards of the same parameters: one all-reduce per sharding, in parameter
    order (a set's order follows hashes that differ between processes, and ranks reducing in
    different orders hang)."""
    keys = {}
    for i, p in enumerate(params):
        keys.setdefault(_shard_key(p), []).append(i)
    local = {k: local_sums(idx) for k, idx in keys.items()}
    device = next(iter(local.values())).device
    total = sum(v.to(device) for k, v in local.items() if k is None) if None in local else 0
    for shard in [k for k in local if k is not None]:
        stacked = local[shard].reshape(1, -1)
        for d in shard[1]:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=shard[0].get_group(d))
        total = total + stacked[0].to(device)
    return total


def _dots(xs, ys):
    """fp32 [sum x.y] over parallel lists (LookSAM's projections)."""
    return torch.stack([torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(xs, ys)]
                       ).sum().reshape(1)


class SAM(torch.optim.Optimizer):
    """SAM and its variants around a base optimizer; `param_groups` and `state` are the base's."""

    def __init__(self, params, base_optimizer=torch.optim.AdamW, rho: float = 2.0,
                 variant: str = "sam", interval: int = 1, looksam_alpha: float = 0.7,
                 perturb_only=None, adaptive: bool = False, **base_kwargs):
        _check_rho(rho)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False (an alias of variant='asam'), got {adaptive!r}.")
        if variant not in VARIANTS or (adaptive and variant not in ("sam", "asam")):
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)} (adaptive=True means "
                             f"'asam'), got variant={variant!r} with adaptive={adaptive}.")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1 \
                or (variant == "msam" and interval != 1):
            raise ValueError(f"interval must be an integer >= 1 (1 = perturb every step; msam "
                             f"perturbs every step without a second pass, so only 1), got {interval!r}.")
        if not (isinstance(looksam_alpha, (int, float)) and math.isfinite(looksam_alpha) and looksam_alpha >= 0):
            raise ValueError(f"looksam_alpha must be a finite number >= 0, got {looksam_alpha!r}.")
        if isinstance(base_optimizer, torch.optim.Optimizer) or not callable(base_optimizer):
            raise ValueError("base_optimizer must be an optimizer class such as torch.optim.AdamW "
                             f"(SAM builds it on the same parameters), got {base_optimizer!r}.")
        super().__init__(params, dict(rho=rho, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.rho, self.variant, self.interval = float(rho), "asam" if adaptive else variant, interval
        self.looksam_alpha = float(looksam_alpha)
        self.perturb_only = None if perturb_only is None else list(perturb_only)
        if (variant == "samon") != (self.perturb_only is not None) or self.perturb_only == []:
            raise ValueError("perturb_only= is SAM-ON's set of normalisation parameters: pass a non-empty "
                             "list with variant='samon' (sam.normalization_parameters(model); LoRA freezes "
                             "them, so SAM-ON cannot run on adapters alone) and only then.")
        self.steps = 0
        self.last_grad_norm = None
        self.last_perturbation_norm = None
        self._perturbed = None          # (local params, backups) between first and second step
        self._first_finite = None       # device bool: was the first gradient finite?
        self._scaler = None             # the GradScaler first_step was given
        self._backups = {}              # param -> exact-copy buffer, reused every step
        self._pending_gv = {}           # LookSAM: g kept for params the base has no state for yet

    def add_param_group(self, param_group):
        base = self.__dict__.get("base_optimizer")
        group = dict(param_group)
        params = group["params"]
        if not isinstance(params, set):         # a set: the base class raises its own error
            group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
            _check_not_fsdp1(group["params"])
        if "rho" in group or "adaptive" in group:
            raise ValueError("a parameter group with its own rho or adaptive: SAM takes one radius and "
                             "one variant for the whole model; pass them to SAM(...).")
        if base is None:                # during __init__: the groups are handed to the base later
            return super().add_param_group(group)
        base.add_param_group(group)     # the lists are shared, so the group lands in both

    @property
    def perturbs_this_step(self) -> bool:
        """Whether the coming step perturbs after the first pass and needs a second pass."""
        return self.variant != "msam" and self.steps % self.interval == 0

    @property
    def perturbs_before_pass(self) -> bool:
        """Whether first_step() comes before the step's (only) pass: Momentum-SAM."""
        return self.variant == "msam"

    # ------------------------------------------------------------------------- the two steps

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler=None):
        """w <- w + e, keeping an exact copy of w: from the current (accumulated) gradients, or for
        msam from AdamW's first moment, before the pass.

        scaler: the GradScaler of an fp16 run; the gradients are unscaled first (pass it to
        second_step too). zero_grad: clear the gradients for the second pass (set to None).
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice without second_step(); the weights "
                               "are still perturbed.")
        if not self.perturbs_this_step and not self.perturbs_before_pass:
            raise RuntimeError(f"step {self.steps} does not perturb (interval={self.interval}); "
                               "check opt.perturbs_this_step and call only second_step().")
        if self.variant == "looksam" and scaler is not None and scaler.is_enabled():
            raise ValueError("LookSAM does not take a GradScaler: a skipped fp16 step would leave its "
                             "reused gradient component from an overflowed pass; use bf16 or another variant.")
        if self.variant == "msam":
            self._msam_perturb()
        else:
            self._gradient_perturb(scaler)
        if zero_grad:
            self.zero_grad()

    def _gradient_perturb(self, scaler):
        """SAM (Foret et al. 2021, eq. 2 with p = 2): e = rho g / ||g||; ASAM (Kwon et al. 2021,
        Algorithm 1 with the elementwise operator T_w = |w|): e = rho T_w^2 g / ||T_w g||; SAM-ON
        (Mueller et al. 2023): SAM's e on the normalisation parameters alone, the norm over their
        gradient only, the others unperturbed."""
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self)       # records first-pass infs, so scaler.update() backs off
        self._scaler = scaler
        params = [p for p in self._params() if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("SAM does not support sparse gradients.")
        if not params:
            self._perturbed, self._first_finite = ([], []), None
            return
        ws, gs = [_local(p) for p in params], [_local(p.grad) for p in params]
        if self.variant == "asam":
            s = _global_sum(params, lambda i: kernels.asam_sums([gs[j] for j in i], [ws[j] for j in i]))
            grad_sq, scale = s[0], self.rho / (s[1].sqrt() + EPS)
            self.last_perturbation_norm = scale * s[2].sqrt()
        else:
            on = self._perturbed_indices(params)         # SAM-ON: the norm layers; else all
            sq = lambda xs: kernels.sum_squares(xs).to(gs[0].device).reshape(1)
            s = _global_sum(params, lambda i: sq([gs[j] for j in i]) if self.perturb_only is None
                            else torch.cat([sq([gs[j] for j in i]), sq([gs[j] for j in i if j in on])]))
            grad_sq, scale = s[0], self.rho / (s[-1].sqrt() + EPS)
            self.last_perturbation_norm = scale * s[-1].sqrt()
            keep = sorted(on)
            if self.variant == "looksam":
                self._keep_gradient([params[j] for j in keep], [gs[j] for j in keep])
            params, ws, gs = [params[j] for j in keep], [ws[j] for j in keep], [gs[j] for j in keep]
        self.last_grad_norm = grad_sq.sqrt()
        self._first_finite = torch.isfinite(s).all()
        if scaler is not None and scaler.is_enabled():
            # the sums are global, so every rank records the same found-inf for scaler.update()
            _set_found_inf(scaler, self, ~self._first_finite)
        backups = [self._backup(p, w) for p, w in zip(params, ws)]
        kernels.perturb_(ws, gs, backups, scale, adaptive=self.variant == "asam")
        self._perturbed = (ws, backups)

    def _msam_perturb(self):
        """Momentum-SAM (Becker et al. 2024, Algorithm 1 'perturb for next iteration', for AdamW as
        their AdamW_MSAM): w~ = w - rho m / ||m||, m = AdamW's first moment (exp_avg), before the
        step's one pass. Before the first step m is 0: no perturbation."""
        params = [p for p in self._params() if "exp_avg" in self.state.get(p, {})]
        if params and not all(isinstance(self.state[p]["exp_avg"], torch.Tensor) for p in params):
            params = []
        if not params:
            if any(len(self.state.get(p, {})) for p in self._params()):
                raise ValueError("variant='msam' needs an Adam-family base optimizer (it perturbs along "
                                 "its first moment, state 'exp_avg'); use torch.optim.AdamW.")
            self.last_perturbation_norm = None
            self._perturbed, self._first_finite, self._scaler = ([], []), None, None
            return
        ws, ms = [_local(p) for p in params], [_local(self.state[p]["exp_avg"]) for p in params]
        m_sq = _global_sum(params, lambda i: kernels.sum_squares([ms[j] for j in i]).reshape(1))[0]
        scale = -self.rho / (m_sq.sqrt() + EPS)
        self.last_perturbation_norm = -scale * m_sq.sqrt()
        backups = [self._backup(p, w) for p, w in zip(params, ws)]
        kernels.perturb_(ws, ms, backups, scale)
        self._perturbed, self._first_finite, self._scaler = (ws, backups), None, None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler=None):
        """Restore w exactly and let the base optimizer step with the gradient taken at w + e.

        On a non-perturbing step (interval > 1) this is a plain base-optimizer step (LookSAM adds
        its reused component first). With a GradScaler it calls scaler.step(base_optimizer),
        skipped if either gradient was not finite; call scaler.update() afterwards.
        """
        two_pass = self.perturbs_this_step
        if self._perturbed is None and (two_pass or self.perturbs_before_pass):
            raise RuntimeError("second_step() without first_step() on a perturbing step; call "
                               "first_step() after the first backward pass (before it for msam; see "
                               "opt.perturbs_this_step and opt.perturbs_before_pass).")
        if self.variant == "looksam" and scaler is not None and scaler.is_enabled():
            raise ValueError("LookSAM does not take a GradScaler: a skipped fp16 step would leave its "
                             "reused gradient component from an overflowed pass; use bf16 or another variant.")
        if two_pass and self._scaler is not None and scaler is None:
            raise RuntimeError("first_step() got a GradScaler but second_step() did not; pass "
                               "scaler= to both, or the base optimizer would step on scaled gradients.")
        if two_pass and self._scaler is None and scaler is not None and scaler.is_enabled():
            raise RuntimeError("second_step() got a GradScaler but first_step() did not, so the "
                               "perturbation used scaled gradients and scaler.update() would find no "
                               "inf checks; pass scaler= to first_step too.")
        if self.variant == "looksam":
            self._looksam_gradient(two_pass)
        if self._perturbed is not None:
            kernels.restore_(*self._perturbed)
        first_finite, self._perturbed, self._first_finite = self._first_finite, None, None
        if scaler is not None and scaler.is_enabled():
            self._agree_on_found_inf(scaler)
            # scaler.step syncs with the host to read its inf flags; this reads ours at that point
            if first_finite is None or bool(first_finite):
                scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        for p, buf in self._pending_gv.items():   # LookSAM's g_v joins the base's state, now that
            self.state[p]["looksam_gv"] = buf       # AdamW has set up its own (it checks len(state))
        self._pending_gv = {}
        self.steps += 1
        self._opt_called = True         # what an LR scheduler checks to know the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """The closure form: the caller has done the first backward; `closure` redoes it at w + e."""
        if closure is None:
            raise ValueError("SAM.step() needs a closure that recomputes the loss and calls backward; "
                             "or call first_step() and second_step() yourself.")
        if self.perturbs_before_pass:
            raise ValueError("variant='msam' perturbs before the step's pass, which the closure form "
                             "cannot place; call first_step() before the pass and second_step() after.")
        loss = None
        if self.perturbs_this_step:
            self.first_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
        self.second_step()
        return loss

    # ------------------------------------------------------------------------- LookSAM

    def _keep_gradient(self, params, gs):
        """LookSAM's SAM step: keep g (in the buffer that will hold g_v) until g_s is known."""
        for p, g in zip(params, gs):
            _local(self._gv(p)).copy_(g)

    def _looksam_gradient(self, two_pass: bool):
        """LookSAM (Liu et al. 2022, Algorithm 1): on a SAM step (every k-th), g_s = grad at w + e
        and g_v = g_s - ||g_s|| cos(theta) g / ||g|| = g_s - (g.g_s / ||g||^2) g is kept; in
        between, the base steps with g_s = g + alpha ||g|| / ||g_v|| g_v. A zero g_v (g_s parallel
        to g, as when w + e == w: the same dot product gives c = 1 exactly) adds nothing instead of
        dividing by zero."""
        params = [p for p in self._params() if p.grad is not None and
                  (p in self._pending_gv or "looksam_gv" in self.state.get(p, {}))]
        if not params:
            return
        gs, gvs = [_local(p.grad) for p in params], [_local(self._gv(p)) for p in params]
        if two_pass:                    # gvs hold g; p.grad holds g_s
            d = _global_sum(params, lambda i: torch.cat([_dots([gvs[j] for j in i], [gs[j] for j in i]),
                                                         _dots([gvs[j] for j in i], [gvs[j] for j in i])]))
            c = torch.where(d[1] > 0, d[0] / d[1].clamp_min(1e-30), torch.zeros_like(d[0]))
            torch._foreach_mul_(gvs, -c)
            torch._foreach_add_(gvs, gs)            # g_v = g_s - c g
            return
        s = _global_sum(params, lambda i: torch.stack([kernels.sum_squares([gs[j] for j in i]),
                                                       kernels.sum_squares([gvs[j] for j in i])]))
        coef = torch.where(s[1] > 0, self.looksam_alpha * s[0].sqrt() / s[1].clamp_min(1e-30).sqrt(),
                           torch.zeros_like(s[1]))
        torch._foreach_addcmul_(gs, gvs, [coef] * len(gs))

    def _gv(self, p):
        if "looksam_gv" in self.state.get(p, {}):
            return self.state[p]["looksam_gv"]
        if p not in self._pending_gv:
            self._pending_gv[p] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return self._pending_gv[p]

    # ------------------------------------------------------------------------- checkpoints

    def state_dict(self):
        sd = self.base_optimizer.state_dict()
        sd["sam"] = {"steps": self.steps, "variant": self.variant}
        return sd

    def load_state_dict(self, state_dict):
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(); the "
                               "weights are still perturbed.")
        state_dict = dict(state_dict)
        sam = state_dict.pop("sam", {})
        if sam.get("variant", self.variant) != self.variant:
            raise ValueError(f"this optimizer state was written by SAM variant {sam['variant']!r}, "
                             f"not {self.variant!r}; resume with the same variant.")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups    # load_state_dict made new lists
        self.state = self.base_optimizer.state
        self.steps = int(sam.get("steps", 0))
        self._pending_gv = {}

    # ------------------------------------------------------------------------- internals

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _perturbed_indices(self, params) -> set:
        if self.perturb_only is None:
            return set(range(len(params)))
        only = {id(p) for p in self.perturb_only}
        return {j for j, p in enumerate(params) if id(p) in only}

    def _agree_on_found_inf(self, scaler):
        """Unscale the second gradient (unless the caller did, to clip) and make the scaler's
        found-inf flag for the base optimizer the max over the ranks that hold other shards of the
        same parameters, so every rank skips or every rank steps (one all-reduce of one number)."""
        shards = dict.fromkeys(k for p in self._params()
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
