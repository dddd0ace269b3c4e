"""SAMTrainer / SAMMixin (trainer.py) inside the real Hugging Face Trainer and TRL's SFTTrainer.

Every step is compared with SAM computed by hand (tests/trainer_worker.py: SGD, so the update is
exactly -lr x the gradient at w + e) on a 1-layer Llama built here."""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_worker import examples, max_diff, sam_by_hand, tiny_model, training_args
from trainer import SAMTrainer

ROOT = Path(__file__).resolve().parent.parent
LR, RHO = 0.1, 0.5


def train(tmp_path, data, model=None, **kw):
    """One SAMTrainer run from the seeded tiny model; returns (trainer, the start model)."""
    sam_kw = {k: kw.pop(k) for k in ("rho", "adaptive", "sam_interval", "sam_variant") if k in kw}
    model = model or tiny_model()
    start = copy.deepcopy(model)
    trainer = SAMTrainer(model=model, args=training_args(tmp_path, **kw), train_dataset=data,
                         rho=sam_kw.pop("rho", RHO), **sam_kw)
    trainer.train()
    return trainer, start


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])    # 0.5 < ||g'|| ~ 0.9: clipped
def test_accumulated_step_is_sam_by_hand(tmp_path, max_grad_norm):
    data = examples(4)
    trainer, start = train(tmp_path, data, max_grad_norm=max_grad_norm)   # 2 micro-batches of 2
    exact = sam_by_hand(start, [[data[:2], data[2:]]], LR, RHO, max_grad_norm)
    wrong = sam_by_hand(start, [[data[:2], data[2:]]], LR, RHO, max_grad_norm, per_micro_batch=True)
    assert max_diff(trainer.model, start) > 1e-3                          # it moved
    assert max_diff(trainer.model, exact) < 1e-6
    assert max_diff(exact, wrong) > 100 * max(max_diff(trainer.model, exact), 1e-8)

    log = trainer.state.log_history[0]
    ids = torch.stack([e["input_ids"] for e in data])
    loss = start(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(start.parameters()))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(start.parameters(), grads):
            p.add_(g, alpha=RHO / norm.item())
    perturbed = start(input_ids=ids, labels=ids).loss
    norm_perturbed = torch.sqrt(sum((g * g).sum() for g in torch.autograd.grad(perturbed, list(start.parameters()))))
    assert log["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert log["loss_perturbed"] == pytest.approx(perturbed.item(), rel=1e-5)
    assert log["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert log["perturbation_norm"] == pytest.approx(RHO, rel=1e-5)
    assert log["grad_norm_perturbed"] == pytest.approx(norm_perturbed.item(), rel=1e-5)   # the Trainer's


def test_short_last_window_of_an_epoch(tmp_path):
    data = examples(6)          # micro-batches of 2, accumulation 2: windows of 2 and then 1
    trainer, start = train(tmp_path, data, max_steps=-1, num_train_epochs=1)
    assert trainer.state.global_step == 2
    exact = sam_by_hand(start, [[data[0:2], data[2:4]], [data[4:6]]], LR, RHO)
    assert max_diff(trainer.model, exact) < 1e-6


def test_interval_takes_plain_steps_between(tmp_path):
    data, model = examples(12), tiny_model()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    trainer, start = train(tmp_path, data, model=model, max_steps=3, sam_interval=2)
    assert len(forwards) == 4 + 2 + 4                   # two passes, one pass, two passes
    steps = [[data[0:2], data[2:4]], [data[4:6], data[6:8]], [data[8:10], data[10:12]]]
    assert max_diff(trainer.model, sam_by_hand(start, steps, LR, RHO, perturb=[True, False, True])) < 1e-6
    assert max_diff(trainer.model, sam_by_hand(start, steps, LR, RHO)) > 1e-4
    assert len([h for h in trainer.state.log_history if "loss_perturbed" in h]) == 2


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    data = examples(12)         # 3 steps with sam_interval=2: SAM, plain, SAM
    whole, _ = train(tmp_path / "whole", data, max_steps=3, sam_interval=2, save_strategy="steps", save_steps=1)
    resumed = SAMTrainer(model=tiny_model(seed=5), args=training_args(tmp_path / "whole", max_steps=3),
                         train_dataset=data, rho=RHO, sam_interval=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-1"))
    assert resumed.sam.steps == 3
    assert max_diff(resumed.model, whole.model) < 1e-7


def _fp16_trainer(tmp_path, data, max_grad_norm, inf_at=None):
    """A SAMTrainer with fp16 as accelerate sets it up on CUDA (GradScaler, fp16 autocast), here on
    CPU, where accelerate leaves fp16 off. inf_at: the backward call (1-based) made infinite."""
    model, calls = tiny_model(), []

    def hook(grad):
        calls.append(1)
        return grad + float("inf") if len(calls) == inf_at else grad
    model.model.embed_tokens.weight.register_hook(hook)
    start = copy.deepcopy(model)
    trainer = SAMTrainer(model=model, train_dataset=data, rho=RHO, args=training_args(
        tmp_path, fp16=True, max_grad_norm=max_grad_norm, lr_scheduler_type="linear", max_steps=2))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    trainer.accelerator.native_amp = True
    return trainer, start


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6])     # unscaled by SAM / by accelerate's clipping
def test_fp16_grad_scaler_step_is_the_fp32_step(tmp_path, max_grad_norm):
    data = examples(8)
    trainer, start = _fp16_trainer(tmp_path, data, max_grad_norm)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 10
    reference, _ = train(tmp_path / "fp32", data, max_grad_norm=max_grad_norm, lr_scheduler_type="linear",
                         max_steps=2)
    assert max_diff(trainer.model, start) > 1e-3
    assert max_diff(trainer.model, reference.model) < 1e-4        # fp16 autocast rounding only
    for fp16, fp32 in zip(trainer.state.log_history[:2], reference.state.log_history[:2]):
        for key in ("loss", "loss_perturbed", "grad_norm", "grad_norm_perturbed"):    # all unscaled
            assert fp16[key] == pytest.approx(fp32[key], rel=1e-3)


@pytest.mark.parametrize("inf_at", [1, 3])       # backward calls 1-2: first pass; 3-4: pass at w + e
@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6])
def test_fp16_inf_in_either_pass_skips_the_step(tmp_path, inf_at, max_grad_norm):
    data = examples(4)
    trainer, start = _fp16_trainer(tmp_path, data, max_grad_norm, inf_at=inf_at)
    trainer.args.max_steps = 1
    trainer.train()
    assert max_diff(trainer.model, start) == 0.0                 # w restored bit for bit, no step
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 9     # backed off
    assert trainer.lr_scheduler.last_epoch == 0                   # the scheduler did not advance


@pytest.mark.parametrize("rho", [0, -1.0, float("nan"), "0.05", True])
def test_bad_rho_is_refused_before_anything_runs(rho):
    with pytest.raises(ValueError, match="rho must be a positive finite number"):
        SAMTrainer(model=None, rho=rho)


def test_bad_interval_and_foreign_optimizer(tmp_path):
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        SAMTrainer(model=None, sam_interval=0)
    model = tiny_model()
    trainer = SAMTrainer(model=model, args=training_args(tmp_path), train_dataset=examples(4),
                         optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        trainer.train()


def test_wraps_the_optimizer_training_arguments_select(tmp_path):
    trainer, _ = train(tmp_path, examples(4), optim="adamw_torch", weight_decay=0.1)
    base = trainer.sam.base_optimizer
    assert type(base) is torch.optim.AdamW
    assert sorted(g["weight_decay"] for g in base.param_groups) == [0.0, 0.1]   # the Trainer's groups
    assert trainer.optimizer.state_dict()["sam"] == {"steps": 1, "variant": "sam"}


def test_sft_mixin_trains_the_tiny_model(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    import sft_sam
    out = tmp_path / "sft"
    args = sft_sam.parse(["--out", str(out), "--steps", "4", "--examples", "4", "--batch-size", "1",
                          "--grad-accum", "2", "--max-length", "64", "--lr", "3e-3"])
    trainer = sft_sam.main(args)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("loss_perturbed" in h and "grad_norm_perturbed" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05
    assert all(h["loss_perturbed"] > h["loss"] for h in logs)   # w + e is uphill
    # 4 steps of 1 x 2 chats = two epochs of the 4: TRL's token count sees the first pass only
    assert logs[-1]["num_tokens"] == 2 * sum(len(x) for x in trainer.train_dataset["input_ids"])
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
    assert json.loads((out / "log_history.json").read_text())[-1]["step"] == 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_sam_by_hand(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(ROOT / "tests" / "trainer_worker.py"),
           str(tmp_path), "ddp"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "ddp.json").read_text())
    assert result["moved"] > 1e-3 and result["max_diff"] < 1e-6
    assert result["logs"][0]["loss_perturbed"] > result["logs"][0]["loss"]


@pytest.mark.parametrize("variant", ["asam", "looksam", "msam", "samon"])
def test_each_variant_is_sams_loop_by_hand(tmp_path, variant):
    """SAMTrainer with sam_variant=V takes the steps of sam.py's loop run by hand on the same
    micro-batches (sam.py's variants are checked against their papers in test_sam_variants.py)."""
    from sam import SAM, normalization_parameters
    data, model = examples(12), tiny_model()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    kw = dict(rho=0.05, sam_variant=variant, sam_interval=2 if variant == "looksam" else 1)
    trainer, start = train(tmp_path, data, model=model, max_steps=3, optim="adamw_torch", learning_rate=1e-2, **kw)
    assert len(forwards) == {"looksam": 4 + 2 + 4, "msam": 2 * 3}.get(variant, 4 * 3)
    by_hand = copy.deepcopy(start)
    only = normalization_parameters(by_hand) if variant == "samon" else None
    opt = SAM(by_hand.parameters(), torch.optim.AdamW, rho=0.05, variant=variant, lr=1e-2, weight_decay=0.0,
              interval=kw["sam_interval"], perturb_only=only)

    def accumulate(window):
        for mb in window:
            ids = torch.stack([e["input_ids"] for e in mb])
            (by_hand(input_ids=ids, labels=ids).loss / len(window)).backward()
    for s in range(3):
        window = [data[4 * s:4 * s + 2], data[4 * s + 2:4 * s + 4]]
        if opt.perturbs_before_pass:
            opt.first_step()
        accumulate(window)
        if opt.perturbs_this_step:
            opt.first_step(zero_grad=True)
            accumulate(window)
        opt.second_step(zero_grad=True)
    assert max_diff(trainer.model, start) > 1e-3
    assert max_diff(trainer.model, by_hand) < 1e-6
