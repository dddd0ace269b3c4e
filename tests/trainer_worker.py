"""SAMTrainer on several ranks, and the by-hand SAM step the tests compare it with.

    torchrun --nproc_per_node 2 tests/trainer_worker.py OUT ddp      # CPU, gloo (test_trainer.py)
    FLATTUNE_TRAINER_FSDP2=1 torchrun --nproc_per_node 2 tests/trainer_worker.py OUT fsdp2   # GPUs
Rank 0 writes OUT/<mode>.json: the largest difference between the weights after one
SAMTrainer step (gradient accumulation 2, one example per rank and micro-batch) and one
SAM step computed by hand on the same four examples in one process (on the CPU).
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, LENGTH = 64, 8


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def examples(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def training_args(out, **overrides):
    from transformers import TrainingArguments
    kw = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
              max_steps=1, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0,
              max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
              remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy="sequential")
    kw.update(overrides)
    return TrainingArguments(**kw)


def _loss(model, batch):
    """Summed next-token cross-entropy of equal-length examples, and its token count."""
    ids = torch.stack([e["input_ids"] for e in batch])
    return model(input_ids=ids, labels=ids).loss * ids[:, 1:].numel(), ids[:, 1:].numel()


def _grads(model, micro_batches, tokens):
    model.zero_grad(set_to_none=True)
    for mb in micro_batches:
        loss, _ = _loss(model, mb)
        (loss / tokens).backward()
    return [p.grad.clone() for p in model.parameters()]


def sam_by_hand(model, steps, lr, rho, max_grad_norm=0.0, per_micro_batch=False, perturb=None):
    """SGD + SAM from first principles. steps: per optimizer step, its list of micro-batches. The
    loss of a step is the mean token loss over all of its micro-batches (what the Trainer's
    num_items_in_batch gives). per_micro_batch: perturb each micro-batch by its own gradient
    instead (the wrong way). perturb: which steps perturb (default all). Returns a new model."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    for k, micro_batches in enumerate(steps):
        tokens = sum(_loss(model, mb)[1] for mb in micro_batches)
        groups = [[mb] for mb in micro_batches] if per_micro_batch else [micro_batches]
        if perturb is not None and not perturb[k]:
            total = _grads(model, micro_batches, tokens)
        else:
            total = [torch.zeros_like(p) for p in params]
            for group in groups:
                g = _grads(model, group, tokens)
                norm = torch.sqrt(sum((x * x).sum() for x in g))
                w = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, x in zip(params, g):
                        p.add_(x, alpha=rho / (norm.item() + 1e-12))
                for t, x in zip(total, _grads(model, group, tokens)):
                    t.add_(x)
                with torch.no_grad():
                    for p, x in zip(params, w):
                        p.copy_(x)
        if max_grad_norm > 0:
            norm = torch.sqrt(sum((x * x).sum() for x in total))
            total = [x * min(1.0, max_grad_norm / (norm.item() + 1e-6)) for x in total]
        with torch.no_grad():
            for p, x in zip(params, total):
                p.add_(x, alpha=-lr)
    model.zero_grad(set_to_none=True)
    return model


def max_diff(a, b):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def main(out: Path, mode: str):
    from trainer import SAMTrainer
    model, data = tiny_model(), examples(4)
    start = copy.deepcopy(model)
    extra = dict(use_cpu=True, ddp_backend="gloo")
    if mode == "fsdp2":         # accelerate turns FSDP on only on GPUs
        extra = dict(use_cpu=False, ddp_backend="nccl", fsdp=True,
                     fsdp_config={"fsdp_version": 2, "reshard_after_forward": True})
    args = training_args(out / mode, per_device_train_batch_size=1, **extra)
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, rho=0.5)
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    trained = trainer.model
    if mode == "fsdp2":
        from torch.distributed.tensor import DTensor
        full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                for n, p in trained.named_parameters()}
    else:
        full = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trained).named_parameters()}
    if rank == 0:
        # two ranks x two micro-batches of one example: the step's window is all four examples
        reference = sam_by_hand(start, [[data[:2], data[2:]]], lr=0.1, rho=0.5)
        diff = max((full[n] - p.detach()).abs().max().item() for n, p in reference.named_parameters())
        moved = max((full[n] - p.detach()).abs().max().item() for n, p in start.named_parameters())
        logs = [h for h in trainer.state.log_history if "loss_perturbed" in h]
        (out / f"{mode}.json").write_text(json.dumps({"max_diff": diff, "moved": moved, "logs": logs}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
