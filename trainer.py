"""SAM inside the Hugging Face Trainer and TRL's SFTTrainer, exactly as sam.py defines it.

    from trainer import SAMTrainer, SAMMixin
    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, rho=0.05)
    trainer.train()

    from trl import SFTTrainer
    class SAMSFTTrainer(SAMMixin, SFTTrainer):      # any Trainer subclass: the mixin goes first
        pass

    torchrun --nproc_per_node 8 my_train.py         # DDP, as with any Trainer script
    python examples/sft_sam.py --model tiny         # SFTTrainer + SAM on a chat set, offline

Arguments: `rho` (radius, > 0), `sam_variant` ("sam", "asam", "looksam", "msam", "samon": sam.py's
docstring and docs/finetune.md describe them; SAM-ON perturbs the model's normalisation layers),
`adaptive` (= "asam"), `sam_interval` (perturb every k-th optimizer step, plain steps in between;
LookSAM's k), `looksam_alpha`. The base optimizer is whatever `TrainingArguments.optim` (or
`optimizer_cls_and_kwargs`) selects, built with the Trainer's own parameter groups and kwargs
(weight decay off for biases and norms) and wrapped in `sam.SAM`.

One optimizer step of the Trainer with gradient_accumulation_steps = n:
  1. the Trainer runs forward/backward on its n micro-batches (DDP syncs only on the last);
     this class keeps references to those micro-batches;
  2. at the last micro-batch (a short last window of an epoch included), still inside
     `training_step`: `first_step` (w <- w + e from the gradient accumulated over all n), then
     forward/backward again over the SAME n micro-batches at w + e, scaled as the first pass
     (the Trainer's `num_items_in_batch` or 1/n), DDP syncing on the last;
  3. the Trainer clips that second gradient (`max_grad_norm`) and calls `optimizer.step()`,
     which is `second_step`: w restored bit for bit, the base optimizer steps with g'; then the
     LR scheduler steps as usual.
Momentum-SAM perturbs at the window's first micro-batch, before its forward (one pass a step).
LookSAM refuses fp16 (sam.py says why).
fp16: the Trainer's GradScaler goes to both SAM steps; accelerate's unscale for clipping lands on
the base optimizer, and a non-finite gradient in either pass skips the step (the scheduler does
not advance, as in the Trainer) and backs the scale off. bf16 autocast needs nothing special.

Logs, the names finetune.py's metrics.jsonl uses: `loss` (at w), `loss_perturbed` (at w + e,
averaged like `loss` over the SAM steps since the last log), `loss_rise` (loss_perturbed - loss), and
when the latest step took two passes `grad_norm` = ||g|| at w (global, after unscaling),
`grad_norm_perturbed` = ||g'|| before clipping (the Trainer's own grad_norm, renamed) and
`perturbation_norm`. They reach the trackers of `TrainingArguments(report_to=...)` (TensorBoard, W&B;
"tensorboard,wandb" is split at the commas).
TRL's own training metrics (token count, token accuracy, entropy) describe the first pass only.

Refused with one sentence each (docs/trainer.md says why): DeepSpeed, FSDP1, optimizers the
Trainer builds as factories or per layer, an `optimizers=` tuple without a `sam.SAM`, and for now
a sharded model (FSDP2 through accelerate: accelerate shards only on GPUs, so it is not verified).
"""
import contextlib
import os

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer

from sam import SAM, normalization_parameters

_NOT_WRAPPABLE = ("params", "model", "optimizer_dict")     # kwargs of optimizers the Trainer builds specially


class _SAMStep(AcceleratedOptimizer):
    """What the Trainer holds as `self.optimizer`: SAM's second step behind accelerate's interface.

    It wraps the base optimizer as accelerate would, so that accelerate's fp16 unscale before
    clipping lands on the base optimizer (where `SAM.second_step`'s `scaler.step(base)` looks for
    it, the first pass having been unscaled on the SAM object), and it is marked prepared, so
    accelerate does not wrap it again: accelerate's wrapper lets the GradScaler skip `step()`
    on an overflow, which would leave the weights at w + e.
    """
    _is_accelerate_prepared = True

    def __init__(self, sam: SAM, scaler):
        super().__init__(sam.base_optimizer, device_placement=False, scaler=None)
        self.sam = sam
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SAMTrainer's optimizer takes no closure; the second pass runs in training_step.")
        if not self.gradient_state.sync_gradients:
            return
        if self.scaler is None:
            self.sam.second_step()
            self._is_overflow = False
            return
        before = self.scaler.get_scale()
        self.sam.second_step(scaler=self.scaler)
        self.scaler.update()
        # the scale backs off exactly when either pass found an inf, which is when the step was skipped
        self._is_overflow = self.scaler.get_scale() < before

    def state_dict(self):
        return self.sam.state_dict()           # the base optimizer's state plus {"sam": {"steps": n}}

    def load_state_dict(self, state_dict):
        self.sam.load_state_dict(state_dict)


def _bind_sam(base_cls, **sam_kwargs):
    """A SAM class around `base_cls` with SAM's arguments bound, for the Trainer to build like any
    optimizer class (its name keeps the base's, which the Trainer checks for bitsandbytes)."""
    def __init__(self, params, **base_kwargs):
        SAM.__init__(self, params, base_cls, **sam_kwargs, **base_kwargs)
    name = f"SAM[{base_cls.__module__}.{base_cls.__qualname__}]"
    return type(name, (SAM,), {"__init__": __init__, "__module__": __name__})


class SAMMixin:
    """Turns a transformers.Trainer subclass into a SAM trainer: `class X(SAMMixin, SFTTrainer)`."""

    def __init__(self, *args, rho: float = 0.05, sam_variant: str = "sam", adaptive: bool = False,
                 sam_interval: int = 1, looksam_alpha: float = 0.7, **kwargs):
        # SAM's own checks, so a bad value fails here, before any model is touched
        probe = [torch.zeros(1, requires_grad=True)]
        self.sam_kwargs = dict(rho=rho, variant=sam_variant, adaptive=adaptive, interval=sam_interval,
                               looksam_alpha=looksam_alpha)
        SAM(probe, torch.optim.SGD, **self.sam_kwargs, perturb_only=probe if sam_variant == "samon" else None,
            lr=0.0)
        self.sam = None                 # the sam.SAM object, built by create_optimizer
        self._sam_window = []           # this optimizer step's micro-batches, for the second pass
        self._sam_loss_sum = None       # loss at w + e, summed over SAM steps since the last log
        self._sam_steps = 0
        self._sam_norms = None          # (||g||, ||e||) of the latest step if it took two passes
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:           # report_to="tensorboard,wandb" as finetune.py --report-to takes it
            targs.report_to = [n.strip() for r in targs.report_to for n in r.split(",") if n.strip() != "none"]
        super().__init__(*args, **kwargs)
        self._sam_check_launcher()

    def _sam_check_launcher(self):
        if self.sam_kwargs["variant"] == "looksam" and self.args.fp16:
            raise ValueError("SAMTrainer's LookSAM does not take fp16: a step the GradScaler skips would leave "
                             "its reused gradient component from an overflowed pass; use bf16=True.")
        if self.is_deepspeed_enabled:
            raise ValueError("SAMTrainer does not run under DeepSpeed: its engine owns backward and the "
                             "optimizer step, so the second pass at w + e cannot be placed; launch with "
                             "torchrun (DDP) instead.")
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("SAMTrainer does not run under FSDP1: it hands the optimizer flat per-rank "
                             "shards, so SAM's gradient norm would be per-rank; use DDP (torchrun).")
        sharded = self.is_fsdp_enabled or getattr(self, "is_distributed_loading_by_transformers", False)
        if sharded and os.environ.get("FLATTUNE_TRAINER_FSDP2") != "1":
            raise ValueError("SAMTrainer is not verified on a sharded model (FSDP2 through accelerate, or "
                             "sharded at load time): accelerate shards only on GPUs and no GPU run has checked "
                             "it against SAM by hand yet; use DDP, or finetune.py for sharded SAM (set "
                             "FLATTUNE_TRAINER_FSDP2=1 to run that check: docs/trainer.md).")

    # ------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model=None):
        if isinstance(self.optimizer, _SAMStep):
            return self.optimizer
        if self.optimizer is not None and not isinstance(self.optimizer, SAM):
            raise ValueError(f"SAMTrainer got optimizers=({type(self.optimizer).__name__}, ...); pass "
                             "optimizer_cls_and_kwargs=(cls, kwargs) or TrainingArguments.optim and it builds "
                             "SAM around that optimizer (or pass a sam.SAM).")
        if self.optimizer is None:
            given = self.optimizer_cls_and_kwargs
            cls, kwargs = given or self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) \
                    or any(k in kwargs for k in _NOT_WRAPPABLE):
                raise ValueError(f"SAMTrainer cannot wrap optim={self.args.optim!r}: the Trainer builds it as a "
                                 "factory or per layer, not as one optimizer over parameter groups; choose a "
                                 "plain optimizer such as adamw_torch, adamw_torch_fused or sgd.")
            # the Trainer builds SAM exactly as it would build the base optimizer (same groups, same kwargs)
            model = self.model if model is None else model
            only = normalization_parameters(model) if self.sam_kwargs["variant"] == "samon" else None
            self.optimizer_cls_and_kwargs = (_bind_sam(cls, **self.sam_kwargs, perturb_only=only), kwargs)
            try:
                super().create_optimizer(model)
            finally:
                self.optimizer_cls_and_kwargs = given
        self.sam = self.optimizer
        self.optimizer = _SAMStep(self.sam, self.accelerator.scaler)
        return self.optimizer

    # ------------------------------------------------------------------------- the two passes

    def train(self, *args, **kwargs):
        self._sam_window = []           # a window cut short by a stopped run is not resumed
        return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._sam_window and self.sam.perturbs_before_pass:    # Momentum-SAM, before the pass
            self.sam.first_step()
        self._sam_window.append(dict(inputs))     # a copy: compute_loss may pop or add keys
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:   # not the last micro-batch of this optimizer step
            return loss
        window, self._sam_window = self._sam_window, []
        self._sam_norms = None
        if not self.sam.perturbs_this_step:       # sam_interval > 1, LookSAM between, msam: one pass
            return loss
        self.sam.first_step(zero_grad=True, scaler=self.optimizer.scaler)
        kept = self._sam_save_metrics()
        sync_each = self.accelerator.gradient_state.plugin_kwargs.get("sync_each_batch", False)
        perturbed = torch.zeros((), device=loss.device)
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            with contextlib.nullcontext() if last or sync_each else self.accelerator.no_sync(model):
                perturbed += super().training_step(model, dict(batch), num_items_in_batch).float()
        self._sam_restore_metrics(kept)
        self._sam_loss_sum = perturbed if self._sam_loss_sum is None else self._sam_loss_sum + perturbed
        self._sam_steps += 1
        self._sam_norms = (self.sam.last_grad_norm, self.sam.last_perturbation_norm)
        return loss

    def _sam_save_metrics(self):
        """TRL's SFTTrainer counts tokens and token accuracy inside compute_loss; keep the first
        pass's values so the second pass does not count the same data twice."""
        metrics = getattr(self, "_metrics", None)
        train = metrics.get("train") if isinstance(metrics, dict) else None
        saved = {k: list(v) for k, v in train.items()} if isinstance(train, dict) else None
        return saved, getattr(self, "_total_train_tokens", None)

    def _sam_restore_metrics(self, kept):
        saved, tokens = kept
        if saved is not None:
            self._metrics["train"].clear()
            self._metrics["train"].update(saved)
        if tokens is not None:
            self._total_train_tokens = tokens

    # ------------------------------------------------------------------------- logging

    def log(self, logs, start_time=None):
        if "loss" in logs and self._sam_steps:     # a training log (same on every rank: a collective follows)
            mean = self.accelerator.gather(self._sam_loss_sum.reshape(1)).mean() / self._sam_steps
            logs["loss_perturbed"] = mean.item()
            logs["loss_rise"] = logs["loss_perturbed"] - logs["loss"]     # L(w + e) - L(w), this log window
            self._sam_loss_sum, self._sam_steps = None, 0
        if "loss" in logs and self._sam_norms is not None:    # the Trainer's grad_norm is then ||g'||
            if "grad_norm" in logs:
                logs["grad_norm_perturbed"] = logs["grad_norm"]
            logs["grad_norm"], logs["perturbation_norm"] = (x.item() for x in self._sam_norms)
        super().log(logs, start_time)


class SAMTrainer(SAMMixin, Trainer):
    """transformers.Trainer with SAM: `SAMTrainer(model=..., args=..., train_dataset=..., rho=0.05)`."""
