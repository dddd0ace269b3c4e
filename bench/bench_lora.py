"""LoRA + SAM against LoRA + AdamW: step time and peak memory, side by side in one run.

    python bench/bench_lora.py                    # SmolLM2-135M, LoRA r=16 on q,k,v,o,gate,up,down
    python bench/bench_lora.py --trainer          # also SAMTrainer against the Trainer (same LoRA)
    python bench/bench_lora.py --quick            # smoke test: tiny model, 1 timed step

Each side runs in its own process on the same seeded batch of GSM8K chats (fp32 weights, peft
LoraConfig r=16, alpha 32, no dropout), so its memory is its own:
  peak RSS      the process's high-water mark (ru_maxrss), model loading included;
  step peak     the highest resident set seen during the timed steps (a thread reads
                /proc/self/statm every 2 ms; torch has no CPU allocator statistics), minus the
                resident set just before them: the memory the steps themselves add.
Step time: AdamW and SAM steps taken in turn in one more process (same model, same batches),
so a change of the machine's load hits both alike; medians over the timed steps after one
warm-up step each, as wall time and as the process's CPU time, and the median of the per-round
SAM/AdamW ratios. One torch thread by default: on a shared machine, threads that wait at
OpenMP barriers for a descheduled sibling spin, which inflates both clocks (seen here: the same
AdamW step took 4.7 or 24 CPU-seconds with 2 threads); with one thread the CPU time is the
work. `--threads N` for a machine of one's own. `--trainer` adds the
Trainer and SAMTrainer, each in its own process (so only as steady as the machine's load). A SAM step is two forward/backward passes
plus the perturbation, so its ideal ratio to AdamW is just under 2x; SAM's own state is one
backup copy of the trainable (adapter) weights.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Highest resident set while the block runs, sampled by a thread (torch ops release the GIL)."""

    def __enter__(self):
        self.peak, self.start, self._stop = rss_bytes(), rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def lora_model(name: str, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model
    import common
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(common.load_model(name), config).train()


def batches(name: str, batch: int, seq: int, n: int) -> list[dict]:
    """n micro-batches of GSM8K chats, padded/cut to exactly `seq` tokens (every step the same work)."""
    import torch
    import common
    import data
    tok = common.load_tokenizer(name)
    records = data.load_records("gsm8k", limit=batch * n, seed=0)
    examples, _ = data.tokenize(records, tok, seq, template="chatml")
    out = []
    for i in range(n):
        ids = torch.full((batch, seq), tok.pad_token_id)
        labels = torch.full((batch, seq), data.IGNORE)
        for row, ex in enumerate(examples[i * batch:(i + 1) * batch]):
            ids[row, :len(ex["input_ids"])] = torch.as_tensor(ex["input_ids"])
            labels[row, :len(ex["labels"])] = torch.as_tensor(ex["labels"])
        out.append({"input_ids": ids, "labels": labels, "attention_mask": (ids != tok.pad_token_id).long()})
    return out


def make_step(kind: str, model, rho: float):
    """One optimizer step of the plain loop in sam.py's docstring (one micro-batch), or of AdamW."""
    import torch
    from sam import SAM
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(b):
            model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    opt = SAM(params, torch.optim.AdamW, rho=rho, lr=1e-4)

    def step(b):
        model(**b).loss.backward()
        opt.first_step(zero_grad=True)
        model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.second_step(zero_grad=True)
    return step


def timed(step, b) -> tuple[float, float]:
    t = (time.perf_counter(), time.process_time())
    step(b)
    return time.perf_counter() - t[0], time.process_time() - t[1]


def run_interleaved(model, micro: list[dict], rounds: int, rho: float) -> dict:
    """AdamW and SAM steps taken in turn in one process, so a change of load hits both alike;
    the ratio is the median of the per-round ratios (after one warm-up step each)."""
    steps = {kind: make_step(kind, model, rho) for kind in ("adamw", "sam")}
    times = {"adamw": [], "sam": []}
    for r in range(rounds + 1):
        for kind in ("adamw", "sam"):
            times[kind].append(timed(steps[kind], micro[r % len(micro)]))
    times = {k: v[1:] for k, v in times.items()}
    ratio = [(s[0] / a[0], s[1] / a[1]) for a, s in zip(times["adamw"], times["sam"])]
    return {"times": times, "ratio_wall": statistics.median(w for w, _ in ratio),
            "ratio_cpu": statistics.median(c for _, c in ratio)}


def run_trainer(kind: str, model, micro: list[dict], steps: int, rho: float, out: str) -> list[float]:
    """The Hugging Face Trainer (AdamW) or SAMTrainer on the same micro-batches, one per step."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from trainer import SAMTrainer
    rows = [{k: v[r] for k, v in b.items()} for b in micro for r in range(len(b["input_ids"]))]
    times, clock = [], {}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock["t"] = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - clock["t"][0], time.process_time() - clock["t"][1]))

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=len(micro[0]["input_ids"]),
                             max_steps=steps + 1, learning_rate=1e-4, optim="adamw_torch", max_grad_norm=1.0,
                             lr_scheduler_type="constant", use_cpu=not torch.cuda.is_available(),
                             report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6,
                             remove_unused_columns=False, train_sampling_strategy="sequential")
    extra = {"rho": rho} if kind == "trainer-sam" else {}
    cls = SAMTrainer if kind == "trainer-sam" else Trainer
    cls(model=model, args=args, train_dataset=rows, callbacks=[Clock()], **extra).train()
    return times[1:]


def worker(kind: str, a) -> dict:
    """'time': both sides interleaved; 'adamw' / 'sam': one side alone, for its memory (one warm-up
    and one step); 'trainer-adamw' / 'trainer-sam': the Trainer or SAMTrainer."""
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = lora_model(a.model, a.rank)
    micro = batches(a.model, a.batch, a.seq, a.steps + 1)
    out = {"kind": kind, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "total": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
    with PeakRSS() as mem:
        if kind == "time":
            out.update(run_interleaved(model, micro, a.steps, a.rho))
        elif kind.startswith("trainer"):
            out["times"] = run_trainer(kind, model, micro, a.steps, a.rho, a.out)
        else:
            step = make_step(kind, model, a.rho)
            out["times"] = [timed(step, b) for b in micro[:2]][1:]
    out.update(load=os.getloadavg()[0], step_peak_mb=(mem.peak - mem.start) / 2**20,
               peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)
    return out


def median(times, i):
    return statistics.median(t[i] for t in times)


def main(a):
    kinds = ["time", "adamw", "sam"] + (["trainer-adamw", "trainer-sam"] if a.trainer else [])
    r = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--worker", kind, "--model", a.model, "--rank", str(a.rank),
               "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--rho", str(a.rho),
               "--threads", str(a.threads), "--out", a.out]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        r[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        steps = r[kind]["times"] if kind != "time" else r[kind]["times"]["adamw"] + r[kind]["times"]["sam"]
        print(f"{kind:>14}: steps (wall/CPU s) {', '.join(f'{w:.2f}/{c:.2f}' for w, c in steps)}; "
              f"load {r[kind]['load']:.1f}", flush=True)
    t = r["time"]
    print(f"\n{a.model}, LoRA r={a.rank} on {','.join(x.split('_')[0] for x in TARGETS)}: {t['trainable']:,} "
          f"trainable of {t['total']:,} parameters; micro-batch {a.batch} x {a.seq} tokens, fp32, {t['threads']} "
          f"threads; {a.steps} timed steps a side, interleaved (medians)\n")
    print("| side | step wall (s) | step CPU (s) | vs AdamW (wall / CPU) | peak RSS (GB) | step peak (MB) |")
    print("|---|---|---|---|---|---|")
    for kind in ("adamw", "sam"):
        ratio = "1.00x" if kind == "adamw" else f"{t['ratio_wall']:.2f}x / {t['ratio_cpu']:.2f}x"
        print(f"| LoRA + {'AdamW' if kind == 'adamw' else 'SAM'} | {median(t['times'][kind], 0):.2f} | "
              f"{median(t['times'][kind], 1):.2f} | {ratio} | {r[kind]['peak_rss_gb']:.2f} | "
              f"{r[kind]['step_peak_mb']:.0f} |")
    if a.trainer:   # separate processes, so only as steady as the machine's load
        base = r["trainer-adamw"]["times"]
        for kind in ("trainer-adamw", "trainer-sam"):
            x = r[kind]["times"]
            print(f"| {'Trainer' if kind == 'trainer-adamw' else 'SAMTrainer'} (LoRA) | {median(x, 0):.2f} | "
                  f"{median(x, 1):.2f} | {median(x, 0) / median(base, 0):.2f}x / {median(x, 1) / median(base, 1):.2f}x"
                  f" | {r[kind]['peak_rss_gb']:.2f} | {r[kind]['step_peak_mb']:.0f} |")
    extra = r["sam"]["step_peak_mb"] - r["adamw"]["step_peak_mb"]
    print(f"\nSAM's step peak is {extra:+.0f} MB over AdamW's; its backup of the adapter weights is "
          f"{t['trainable'] * 4 / 2**20:.1f} MB.")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (padded or cut)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (1: steadiest on a shared machine)")
    p.add_argument("--trainer", action="store_true", help="also SAMTrainer vs the Trainer")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 timed step (smoke test)")
    p.add_argument("--out", default="/tmp/bench_lora", help="the Trainer's scratch output_dir")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.model, a.steps = "tiny", 1
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
    else:
        main(a)
