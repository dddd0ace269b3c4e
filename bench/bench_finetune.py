"""finetune.py against the Hugging Face Trainer, side by side on one machine, one model, one batch.

    python bench/bench_finetune.py                # SmolLM2-135M, 96 GSM8K items, bf16 autocast
    python bench/bench_finetune.py --precision fp32   # CPUs without AMX / AVX512-BF16 (emulated bf16)
    python bench/bench_finetune.py --quick        # smoke test: tiny model, 16 items, 2 steps each

Setting (the issue's calibration): micro-batch 4 x accumulation 2 (8 examples a step), max length
256, 96 GSM8K items in the Alpaca prompt, fp32 master weights with bf16 autocast, one epoch
(12 steps), AdamW. Each run is its own process, so its peak resident memory is its own.
Reported: non-padding tokens per second over the training steps (setup excluded), share of padded
tokens, peak RSS; and SAM's mean step time over AdamW's (first step excluded: warm-up).
Targets: finetune.py AdamW >= 1.0x the Trainer's tokens/s with lower peak RSS; SAM/AdamW <= 2.05x.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2     # Linux: KiB


def run_trainer(model: str, items: int, max_len: int, precision: str, out: str, max_steps: int) -> dict:
    """The Trainer on the same tokenized examples (its default random sampler: no length grouping)."""
    import torch
    from transformers import Trainer, TrainingArguments
    import common
    import data
    tok = common.load_tokenizer(model)
    examples, _ = data.tokenize(data.load_records("gsm8k", limit=items), tok, max_len)
    seen = {"real": 0, "padded": 0}

    def collate(feats):
        batch = data.collate(feats, tok.pad_token_id)
        seen["real"] += int(batch["attention_mask"].sum())
        seen["padded"] += batch["attention_mask"].numel()
        return batch

    net = common.load_model(model).train()
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                              learning_rate=5e-6, num_train_epochs=1, max_steps=max_steps or -1,
                              lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0,
                              max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=not torch.cuda.is_available(),
                              save_strategy="no", report_to=[], logging_steps=1, seed=0,
                              dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=net, args=targs, train_dataset=examples, data_collator=collate)
    t = time.time()
    trainer.train()
    seconds = time.time() - t
    return {"tokens_per_s": seen["real"] / seconds, "padding": 1 - seen["real"] / seen["padded"],
            "peak_rss_gb": peak_rss_gb(), "seconds": seconds}


def run_finetune(model: str, items: int, max_len: int, precision: str, out: str, max_steps: int,
                 sam: bool) -> dict:
    import finetune
    import data
    final = finetune.main(finetune.Args(model=model, data="gsm8k", out=out, limit=items, heldout=0, epochs=1,
                                        batch_size=8, micro_batch_size=4, max_len=max_len, precision=precision,
                                        max_steps=max_steps or None, sam=sam, rho=0.05, save_every=0, log_every=4))
    import common
    rows = common.read_jsonl(Path(out) / "metrics.jsonl")
    times = [r["step_time"] for r in rows[1:]] or [rows[0]["step_time"]]
    examples, _ = data.tokenize(data.load_records("gsm8k", limit=items), common.load_tokenizer(model), max_len)
    plan = finetune.epoch_plan(examples, 4, 2, 1, 0, 0)
    return {"tokens_per_s": final["tokens_per_s"], "peak_rss_gb": peak_rss_gb(),
            "padding": data.padding_fraction(examples, [mb for step in plan for mb in step]),
            "step_time": sum(times) / len(times), "seconds": sum(r["step_time"] for r in rows)}


def worker(kind: str, a) -> dict:
    with tempfile.TemporaryDirectory() as out:
        if kind == "trainer":
            return run_trainer(a.model, a.items, a.max_len, a.precision, out, a.max_steps)
        return run_finetune(a.model, a.items, a.max_len, a.precision, out, a.max_steps, kind == "sam")


def main(model: str, items: int, max_len: int, precision: str, max_steps: int):
    results = {}
    for kind in ("trainer", "adamw", "sam"):
        cmd = [sys.executable, __file__, "--worker", kind, "--model", model, "--items", str(items),
               "--max-len", str(max_len), "--precision", precision, "--max-steps", str(max_steps)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{kind:8s} {json.dumps({k: round(v, 3) for k, v in results[kind].items()})}", flush=True)
    t, f, s = results["trainer"], results["adamw"], results["sam"]
    print(f"\n{model}, {items} GSM8K items, micro 4 x accum 2, max len {max_len}, {precision} compute")
    print("| | HF Trainer | finetune.py AdamW | ratio |")
    print("|---|---|---|---|")
    print(f"| non-padding tokens/s | {t['tokens_per_s']:.1f} | {f['tokens_per_s']:.1f} | "
          f"{f['tokens_per_s'] / t['tokens_per_s']:.2f}x (target >= 1.0) |")
    print(f"| padding share | {t['padding']:.1%} | {f['padding']:.1%} | |")
    print(f"| peak RSS (GB) | {t['peak_rss_gb']:.2f} | {f['peak_rss_gb']:.2f} | "
          f"{f['peak_rss_gb'] / t['peak_rss_gb']:.2f}x (target < 1.0) |")
    print(f"\nSAM step {s['step_time']:.2f} s / AdamW step {f['step_time']:.2f} s = "
          f"{s['step_time'] / f['step_time']:.2f}x (target <= 2.05)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--items", type=int, default=96)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--max-steps", type=int, default=0, help="0: one full epoch")
    p.add_argument("--quick", action="store_true", help="tiny model, 16 items, 2 steps: a smoke test")
    p.add_argument("--worker", default=None, choices=("trainer", "adamw", "sam"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.model, a.items, a.max_len, a.precision, a.max_steps = "tiny", 16, 256, "fp32", 2
    if a.worker:
        print(json.dumps(worker(a.worker, a)), flush=True)
    else:
        main(a.model, a.items, a.max_len, a.precision, a.max_steps)
