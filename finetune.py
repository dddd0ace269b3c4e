"""Instruction fine-tuning with AdamW or SAM, one process or many (torchrun + FSDP2).

    python finetune.py                                   # smollm2-135m on offline gsm8k -> runs/finetune
    python finetune.py --model tiny --data gsm8k --limit 64 --batch-size 8 --max-len 256 --out runs/t
    python finetune.py --model M --data open-platypus --out runs/p --sam --rho 0.05 --epochs 1
    python finetune.py --lora 16 --sam --rho 0.05        # LoRA adapters only (peft), merged at the end
    python finetune.py --sam --sam-variant looksam --sam-interval 5   # SAM's gradient every 5th step, reused
    python finetune.py ... --eval-every 4 --general-text results/general_text.jsonl   # trajectory.jsonl
    torchrun --nproc_per_node 16 finetune.py --sam --rho 2        # FSDP2; same defaults as above
    torchrun --nproc_per_node 8 --nnodes 2 --node_rank R --master_addr H finetune.py \\
        --model meta-llama/Llama-2-7b-hf --data alpaca --epochs 3 --lr 2e-5 --out runs/alpaca
    python finetune.py ... --resume                      # continue from OUT/checkpoint
    python finetune.py --config my.yaml --lr 1e-5 --report-to tensorboard   # a config file, flags on top

One optimizer step sees --batch-size examples: micro-batches of --micro-batch-size on every rank,
accumulated. The loss is the mean over all target tokens of the step (all micro-batches, all
ranks), so one process and N ranks compute the same gradient. SAM does two forward/backward passes
per step (at w and at w+e): 1 SAM epoch costs what 2 AdamW epochs cost. --sam-variant chooses a
cheaper one (looksam: 1 + 1/k passes, msam: one pass at w+e; docs/finetune.md).

Writes into --out: the Hugging Face model (config, safetensors, tokenizer; with --lora the merged
model, and the adapter in adapter/), args.json, metrics.jsonl (one line per step), heldout.jsonl,
trajectory.jsonl (with --eval-every: probe.py's points at step 0, every K steps and the end),
final.json (written last: the run finished), README.md (the model card: how the model was made;
also in each step<k>/), tensorboard/ and wandb/ (with --report-to), loss_curve.png, step<k>/ (with
--save-model-at k: the model after step k, a HF folder), and checkpoint/ (checkpoint.py; removed at
the end unless --keep-checkpoint).
"""
import dataclasses
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import checkpoint
import common
import data
import probe
import runconfig
import tracking
from sam import SAM, VARIANTS, normalization_parameters

PRECISIONS = ("auto", "bf16", "fp32")
TEMPLATES = data.TEMPLATES          # Args has a field named `data`
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def opt(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    model: str = opt("smollm2-135m", "tiny | smollm2-135m | HF folder | hub name")
    data: str = opt("gsm8k", "dataset name (python data.py lists them), hub id, or .json/.jsonl file")
    out: str = opt("runs/finetune", "output folder")
    sam: bool = opt(False, "SAM (sam.py) around AdamW")
    rho: float = opt(0.02, "SAM radius, fitted to SmolLM2-135M: 0.02 raises its loss by about 0.1-0.5 nats "
                     "at w+e (the study's value); the paper's 2 suits Llama-2-7B and makes SmolLM2 learn "
                     "nothing (docs/finetune.md: choosing rho)")
    sam_variant: str | None = opt(None, "with --sam: sam (default), asam, looksam (SAM gradient every "
                                  "--sam-interval steps, reused between), msam (Momentum-SAM, one pass), "
                                  "samon (only the norm layers); docs/finetune.md", choices=VARIANTS)
    adaptive: bool = opt(False, "ASAM: perturbation scaled by |w| (the same as --sam-variant asam)")
    sam_interval: int = opt(1, "perturb every k-th step (1: every step); LookSAM's k")
    looksam_alpha: float = opt(0.7, "LookSAM: weight of the reused gradient component (Liu et al.: 0.7)")
    lora: int = opt(0, "LoRA rank R (0: full fine-tuning); only the adapters train")
    lora_alpha: float = opt(16.0, "LoRA scale numerator (the update is alpha / R * B A)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt(LLAMA_TARGETS, "comma-separated module names that get adapters")
    epochs: int = opt(2, "passes over the training data")
    lr: float = opt(5e-6, "peak learning rate")
    batch_size: int = opt(128, "examples per optimizer step, all ranks")
    micro_batch_size: int = opt(4, "examples per forward, per rank")
    max_len: int = opt(512, "tokens per example (longer ones are cut)")
    warmup_ratio: float = opt(0.03, "share of the steps with linear warmup (then cosine to 0)")
    warmup_steps: int | None = opt(None, "linear warmup steps (overrides --warmup-ratio)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    seed: int = opt(0, "seed of the data order and the held-out split's complement")
    rehearsal: str | None = opt(None, "old data mixed into --data (per dataset)")
    rehearsal_ratio: float = opt(0.1, "old items = ratio x new items")
    max_steps: int | None = opt(None, "cap on optimizer steps (the schedule fits it)")
    limit: int | None = opt(None, "use N training items (fixed subset)")
    template: str = opt("alpaca", "prompt format", choices=TEMPLATES)
    heldout: int = opt(32, "items held out for the in-domain loss")
    grad_clip: float = opt(1.0, "max gradient norm (0: off); with SAM it clips the second gradient")
    precision: str = opt("auto", "bf16 compute over fp32 master weights, or fp32 throughout; auto: bf16 "
                         "on GPUs and CPUs with AMX/AVX512-BF16, else fp32", choices=PRECISIONS)
    activation_checkpointing: bool = opt(False, "recompute activations in the backward pass")
    eval_every: int = opt(0, "probe every K steps into trajectory.jsonl (0: off; needs --general-text)")
    general_text: str | None = opt(None, "general_text.jsonl for the probes (python data.py --general-text)")
    probe_cache: str | None = opt(None, "folder keeping the start model's probe for later runs of a study")
    log_every: int = opt(1, "log line every N steps")
    save_every: int = opt(100, "checkpoint every N steps (0: never)")
    keep_checkpoint: bool = opt(False, "keep OUT/checkpoint after the run")
    stop_after: int | None = opt(None, "stop after N steps with a checkpoint, as if interrupted")
    save_model_at: tuple[int, ...] = opt((), "also write the model after these steps as HF folders OUT/step<k>/")
    resume: bool = opt(False, "continue from OUT/checkpoint if present")
    report_to: str = opt("none", "trackers, comma-separated: none | tensorboard (OUT/tensorboard) | wandb (OUT/wandb)")


def parse_args(argv=None) -> Args:
    """argparse over Args' fields: --flag-name, the field's type and default, store_true for bools;
    `--config FILE` (YAML/JSON, args.json too: runconfig.py) gives defaults that flags override."""
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        flag, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type is bool:
            p.add_argument(flag, action="store_true", **kw)
            continue
        kind = f.type
        if isinstance(kind, types.UnionType):                  # int | None -> int
            kind = next(t for t in kind.__args__ if t is not type(None))
        if typing.get_origin(kind) is tuple:                   # tuple[int, ...] -> --flag 2 4 6
            kind, kw["nargs"] = typing.get_args(kind)[0], "+"
        p.add_argument(flag, type=kind, default=f.default, **kw)
    return Args(**vars(runconfig.parse(p, argv, recorded=("world", "compute_precision"))))


# ----------------------------------------------------------------------------- main

def main(args: Args) -> dict:
    """Fine-tune and write OUT (see the module docstring). Returns final.json's content, or
    {"stopped_at": step} when --stop-after interrupted the run."""
    # setup: processes, checks, seeds
    owns_group = not dist.is_initialized()      # a caller's process group is left running
    rank, world, device = common.init_distributed()
    check(args, world)
    precision = probe.resolve_precision(args.precision, device)     # one policy, probe.py's
    ctx = probe.autocast_ctx(precision, device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if common.is_main():
        (out / "final.json").unlink(missing_ok=True)     # a run in progress is not a finished run
    trackers = tracking.Trackers(args.report_to, out, dataclasses.asdict(args))    # --report-to
    checkpoint.check_shared(out, bool(args.save_every or args.stop_after or args.resume))

    # data: tokenized training examples, held-out examples, the step plan
    tokenizer = common.load_tokenizer(args.model)
    examples, held, stats = build_data(args, tokenizer, out)
    per_step = args.batch_size // args.micro_batch_size        # micro-batches a step, all ranks
    spe = len(epoch_plan(examples, args.micro_batch_size, per_step, world, args.seed, 0))
    total = min(args.epochs * spe, args.max_steps or 10**12)
    if total < 1:
        raise ValueError(f"{stats['examples']} examples make no full step of --batch-size {args.batch_size} "
                         f"on {world} ranks; lower --batch-size or add data.")
    if any(not 1 <= k <= total for k in args.save_model_at):
        raise ValueError(f"--save-model-at {' '.join(map(str, args.save_model_at))}: this run has steps 1 to "
                         f"{total}; give steps in that range.")

    # model: fp32 master weights, sharded under torchrun, LoRA adapters if asked
    model = setup_model(args, rank, device, precision)
    params = [p for p in model.parameters() if p.requires_grad]

    # optimizer: AdamW, or SAM (a variant) around AdamW (fused: one kernel, no parameter-sized temporaries)
    optimizer = build_optimizer(args, model, params)
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    sched = cosine_with_warmup(optimizer, min(total, max(1, warmup)), total)
    take_step = optimizer.second_step if args.sam else optimizer.step     # SAM restores w, then AdamW
    common.log(f"{world} rank(s) on {device.type}, {precision} compute over fp32 weights, {total} steps of "
               f"{args.batch_size} examples ({per_step // world} micro-batches of {args.micro_batch_size} "
               f"per rank), {sum(p.numel() for p in params):,} trainable parameters")

    start, summary = 0, {}
    if args.resume and checkpoint.find(out):
        meta = checkpoint.load(out, model, optimizer, sched, dataclasses.asdict(args))
        start, summary = meta["step"], meta["summary"]
        common.log(f"resumed from {out}/checkpoint at step {start} (written by {meta['world']} rank(s))")
    if common.is_main():                        # after a refused resume, args.json stays the old run's
        common.write_json(out / "args.json", {**dataclasses.asdict(args), "world": world,
                                              "compute_precision": precision})
    rows = truncate_log(out / "metrics.jsonl", start)
    probes = Probes(args, model, tokenizer, held, ctx, device, out, start) if args.eval_every else None
    if start == 0:      # the held-out loss at the start: the probe's, when it runs (one pass, not two)
        if probes:
            first = probes.take(0, 0.0)
            trackers.log_probe(first)
            summary["heldout_loss_start"] = first["heldout_loss"]
        else:
            summary["heldout_loss_start"] = probe.heldout_loss(model, held, args.micro_batch_size,
                                                               tokenizer.pad_token_id, ctx, device)
    command = tracking.command_line("finetune.py", dataclasses.asdict(args), dataclasses.asdict(Args()), world)

    def card(k, end=None):      # README.md of the model after step k: how it was made
        return tracking.finetune_card(out, dataclasses.asdict(args), k, total, command,
                                      summary.get("heldout_loss_start"), end,
                                      {"compute": f"{precision} over fp32 weights, {world} rank(s)"})
    bar = tracking.Progress(total, initial=start, desc="fine-tuning")    # a bar on a terminal only

    # the loop: one optimizer step = every micro-batch of the step, once (AdamW, msam) or twice (SAM)
    plan, plan_epoch, t0 = None, -1, time.time()
    elapsed0 = rows[-1]["elapsed"] if rows else 0.0
    for step in range(start, total):
        if step // spe != plan_epoch:          # an epoch's order depends only on (seed, epoch)
            plan_epoch = step // spe
            plan = epoch_plan(examples, args.micro_batch_size, per_step, world, args.seed, plan_epoch)
        step_mbs = plan[step % spe]            # all ranks' micro-batches; this rank takes [rank::world]
        batches = [data.collate([examples[j] for j in mb], tokenizer.pad_token_id) for mb in step_mbs[rank::world]]
        targets = sum(n_targets(examples[j]) for mb in step_mbs for j in mb)
        t = time.time()

        if args.sam and optimizer.perturbs_before_pass:    # Momentum-SAM: w <- w - rho m / ||m||
            optimizer.first_step()
        row = {"loss": forward_backward(model, batches, targets, ctx, device, world)}    # g at w (msam: w+e)
        if args.sam and optimizer.perturbs_this_step:      # LookSAM and --sam-interval k: every k-th step
            optimizer.first_step(zero_grad=True)           # w <- w + rho g / ||g||, w kept exactly
            row["loss_perturbed"] = forward_backward(model, batches, targets, ctx, device, world)  # g' at w+e
        grad_norm = clip(params, args.grad_clip)           # of the gradient AdamW steps with
        take_step()                                        # SAM: w restored (LookSAM: g_v added), AdamW
        optimizer.zero_grad(set_to_none=True)
        row.update(step_norms(optimizer, row, grad_norm), lr=sched.get_last_lr()[0])
        sched.step()

        dt = time.time() - t
        row["passes"] = 2 if "loss_perturbed" in row else 1
        row["micro_batch_passes"] = row["passes"] * len(step_mbs)
        row["tokens"] = sum(len(examples[j]["input_ids"]) for mb in step_mbs for j in mb)
        row.update(step=step + 1, epoch=round((step + 1) / spe, 4), tokens_per_s=row["tokens"] / dt,
                   step_time=dt, elapsed=elapsed0 + sum(r["step_time"] for r in rows[start:]) + dt)
        rows.append(row)
        if common.is_main():
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if (step + 1) % args.log_every == 0 or step + 1 == total:
            log_line(row, total, (time.time() - t0) / (step + 1 - start))
        trackers.log_step(row)
        bar.update(step + 1, loss=row["loss"])
        checkpoint.check_finite(step + 1, row)             # a diverged step is never saved
        if probes and ((step + 1) % args.eval_every == 0 or step + 1 == total):
            last_point = probes.take(step + 1, row["elapsed"])
            trackers.log_probe(last_point)
        if step + 1 in args.save_model_at:                 # e.g. the model at a matched held-out loss
            checkpoint.save_model_at(out / f"step{step + 1}", model, tokenizer)
            if common.is_main():
                common.write_text(out / f"step{step + 1}" / "README.md", card(step + 1))
        stop = args.stop_after is not None and args.stop_after <= step + 1 < total
        if stop or (args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total):
            checkpoint.save(out, model, optimizer, sched, step + 1,
                            {"world": world, "args": dataclasses.asdict(args), "summary": summary})
        if stop:
            common.log(f"stopped after step {step + 1} (checkpoint saved; rerun with --resume)")
            bar.close()
            trackers.close()
            if owns_group:
                common.cleanup_distributed()
            return {"stopped_at": step + 1}

    # save: the model folder, final.json last
    bar.close()
    seconds = sum(r["step_time"] for r in rows)
    summary.update(final_loss=rows[-1]["loss"], elapsed_s=rows[-1]["elapsed"],
                   tokens_per_s=sum(r["tokens"] for r in rows) / max(1e-9, seconds),
                   heldout_loss_end=last_point["heldout_loss"] if probes else probe.heldout_loss(
                       model, held, args.micro_batch_size, tokenizer.pad_token_id, ctx, device))
    checkpoint.save_final(out, model, tokenizer)
    final = {**summary, "heldout_items": len(held), "steps": total, "steps_per_epoch": spe,
             "data_stats": stats, "compute_precision": precision, "optimizer": "SAM" if args.sam else "AdamW",
             "sam_variant": optimizer.variant if args.sam else None,
             "lora": args.lora, "trainable_params": sum(p.numel() for p in params), "world": world,
             "passes": sum(r["passes"] for r in rows), "micro_batch_passes": sum(r["micro_batch_passes"] for r in rows)}
    if common.is_main():
        try:
            plot(out, rows, final)
        except ImportError:             # a bare GPU image without matplotlib: the logs hold it all
            common.log("matplotlib is not installed: loss_curve.png skipped")
        common.write_text(out / "README.md", card(total, summary["heldout_loss_end"]))   # the model card
        common.write_json(out / "final.json", final)      # written last: the run is complete
        if not args.keep_checkpoint:
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    common.log(f"done: {total} steps, {final['passes']} forward/backward passes over the batch "
               f"({final['micro_batch_passes']} micro-batch passes); held-out loss "
               f"{fmt(final['heldout_loss_start'])} -> {fmt(final['heldout_loss_end'])}; model in {out}")
    trackers.close()
    if owns_group:
        common.cleanup_distributed()
    return final


# ----------------------------------------------------------------------------- setup

def check(args: Args, world: int):
    """Flags that cannot work together, caught before anything is loaded."""
    if args.batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} ranks.")
    if args.template not in data.TEMPLATES or args.precision not in PRECISIONS:
        raise ValueError(f"--template must be one of {data.TEMPLATES} and --precision one of {PRECISIONS}.")
    if args.eval_every < 0 or (args.eval_every and not args.general_text):
        raise ValueError("--eval-every K needs K >= 0 and --general-text PATH (write one with "
                         "`python data.py --general-text PATH`).")
    if args.lora < 0:
        raise ValueError(f"--lora {args.lora}: the LoRA rank must be >= 1 (or 0 for full fine-tuning).")
    if (args.sam_variant or args.adaptive) and not args.sam:
        raise ValueError("--sam-variant and --adaptive choose a SAM variant; add --sam (without it the run is AdamW).")
    if args.adaptive and args.sam_variant not in (None, "asam"):
        raise ValueError(f"--adaptive is --sam-variant asam; drop it or --sam-variant {args.sam_variant}.")
    if args.sam and args.sam_variant == "samon" and args.lora:
        raise ValueError("--sam-variant samon perturbs the norm layers, which --lora freezes; drop --lora "
                         "or choose another variant.")


def build_data(args: Args, tokenizer, out: Path):
    records = data.load_records(args.data)
    train, held = data.split_heldout(records, args.heldout)
    train = data.subsample(train, args.limit)
    if args.rehearsal:
        train = data.mix_rehearsal(train, data.load_records(args.rehearsal), args.rehearsal_ratio)
    if common.is_main():
        common.write_text(out / "heldout.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    examples, stats = data.tokenize(train, tokenizer, args.max_len, args.template)
    held_ex, _ = data.tokenize(held, tokenizer, args.max_len, args.template)
    common.log(f"data: {args.data} {len(train)} train records (rehearsal {args.rehearsal or 'none'}), "
               f"{len(held)} held out; {stats['examples']} examples, {stats['truncated']} truncated to "
               f"{args.max_len} tokens, {stats['dropped']} dropped (no response token left)")
    return examples, held_ex, stats


def epoch_plan(examples, micro: int, per_step: int, world: int, seed: int, epoch: int) -> list:
    """Steps of one epoch: each a list of micro-batches (index lists); rank r takes [r::world].
    A short last step keeps a multiple of `world` micro-batches so every rank runs as many passes."""
    mbs = data.length_grouped_batches(examples, micro, seed, epoch)
    steps = [mbs[i:i + per_step] for i in range(0, len(mbs), per_step)]
    if steps and len(steps[-1]) % world:
        steps[-1] = steps[-1][:len(steps[-1]) - len(steps[-1]) % world]
    return [s for s in steps if s]


def setup_model(args: Args, rank: int, device, precision: str):
    """fp32 master weights. Under torchrun (any world size): rank 0 reads the weights, the others
    build on the meta device, each decoder layer and then the root are sharded (FSDP2), and rank 0
    broadcasts the weights into the shards. With --lora, peft wraps the model (one process)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not dist.is_initialized():
        model = common.load_model(args.model, device=device)
    elif rank == 0:
        model = common.load_model(args.model)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(common.resolve_model(args.model)))
    if args.lora:
        model = add_lora(model, args)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.lora:
            model.enable_input_require_grads()      # the frozen embeddings would cut the graph
    if not dist.is_initialized():
        return model.train()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full = model.state_dict() if rank == 0 else {}
    # GPU: FSDP2 computes in bf16 and reduces gradients in fp32; CPU (gloo): autocast instead
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy()
    for layer in common.decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buf in model.buffers():        # non-persistent buffers (rotary tables) are not in the state dict
        dist.broadcast(buf, src=0)
    return model.train()


def add_lora(model, args: Args):
    """peft LoRA adapters on --lora-targets; everything else frozen. Adapters' A is random, B zero,
    so the wrapped model starts exactly at the base model."""
    from peft import LoraConfig, get_peft_model
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise ValueError(f"--lora-targets {args.lora_targets}: {model.__class__.__name__} has no module "
                         f"named {missing or '(none given)'}; name linear layers it has, e.g. {LLAMA_TARGETS}.")
    config = LoraConfig(r=args.lora, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build_optimizer(args: Args, model, params):
    """fused AdamW, or sam.SAM around it with the chosen variant (sam.py's docstring has them all)."""
    kw = dict(lr=args.lr, weight_decay=args.weight_decay, fused=True)
    if not args.sam:
        return torch.optim.AdamW(params, **kw)
    variant = "asam" if args.adaptive else args.sam_variant or "sam"
    only = normalization_parameters(model) if variant == "samon" else None
    return SAM(params, torch.optim.AdamW, rho=args.rho, variant=variant, interval=args.sam_interval,
               looksam_alpha=args.looksam_alpha, perturb_only=only, **kw)


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)    # SAM shares AdamW's param_groups


# ----------------------------------------------------------------------------- one pass

def loss_sum(model, batch: dict, ctx) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of one micro-batch (logits only where
    a target is predicted: common.target_logits)."""
    return common.token_loss(common.target_logits(model, batch, ctx), batch["labels"])


def forward_backward(model, batches: list, step_targets: int, ctx, device, world: int) -> float:
    """Backward over this rank's micro-batches, scaled so the summed gradient is the step's token
    mean (FSDP2 averages over ranks, hence * world). Returns the step's mean loss over all ranks."""
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if dist.is_initialized():      # reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        loss = loss_sum(model, {k: v.to(device) for k, v in batch.items()}, ctx)
        (loss * world / step_targets).backward()
        total += loss.detach()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total) / step_targets


def n_targets(example: dict) -> int:
    return sum(l != data.IGNORE for l in example["labels"][1:])


def scalar(x) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def step_norms(optimizer, row: dict, grad_norm: float) -> dict:
    """grad_norm = ||g|| at w, grad_norm_perturbed = ||g'|| at w + e, perturbation_norm = ||e||
    (global, before clipping). Momentum-SAM's one gradient is at w + e: its grad_norm is that one."""
    if "loss_perturbed" in row:
        return {"grad_norm": scalar(optimizer.last_grad_norm), "grad_norm_perturbed": grad_norm,
                "perturbation_norm": scalar(optimizer.last_perturbation_norm)}
    if getattr(optimizer, "perturbs_before_pass", False):
        e = optimizer.last_perturbation_norm
        return {"grad_norm": grad_norm, "perturbation_norm": 0.0 if e is None else scalar(e)}
    return {"grad_norm": grad_norm}


def clip(params, max_norm: float) -> float:
    """The gradient norm before clipping (global across shards); clips to max_norm when > 0."""
    if max_norm > 0:
        return scalar(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return scalar(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


# ----------------------------------------------------------------------------- probes and logs

class Probes:
    """probe.py's point (held-out loss, general-text NLL, KL to the start model, displacement) at
    chosen steps, appended to OUT/trajectory.jsonl. The start model's reference log-probs and w0 come
    from the weights at step 0; a resumed run rebuilds the start model once to get them again."""

    def __init__(self, args, model, tokenizer, held, ctx, device, out: Path, start: int):
        self.args, self.model, self.held, self.ctx, self.device = args, model, held, ctx, device
        self.pad, self.path = tokenizer.pad_token_id, out / "trajectory.jsonl"
        self.text = probe.GeneralText(data.load_general_text(args.general_text), tokenizer, args.micro_batch_size)
        self.lora = bool(args.lora)     # displacement of the merged weights, from the adapters alone
        self.cache, self.cached = start_cache(args, held, probe.resolve_precision(args.precision, device)), None
        if self.cache is not None and self.cache.exists():    # an earlier run measured this start already
            self.cached = torch.load(self.cache, weights_only=True)
            self.ref = self.cached["ref"]
            w0 = None if self.lora else probe.snapshot(model.parameters())
        elif start == 0 or self.lora:
            with model.disable_adapter() if self.lora else nullcontext():     # the base: the start model
                self.ref = probe.reference(model, self.text, ctx, device)
            w0 = None if self.lora else probe.snapshot(model.parameters())
        else:
            start_model = setup_model(args, common.rank_world()[0], device,
                                      probe.resolve_precision(args.precision, device))
            self.ref = probe.reference(start_model, self.text, ctx, device)
            w0 = probe.snapshot(start_model.parameters())
            del start_model
        self.w0, self.params = w0, list(model.parameters())
        truncate_log(self.path, start)

    def take(self, step: int, elapsed: float):
        t = time.time()
        if step == 0 and self.cached is not None:    # the start model's point, measured by an earlier run
            row = {"step": 0, "elapsed": elapsed, **self.cached["point"], "displacement": 0.0}
        else:
            row = {"step": step, "elapsed": elapsed, **probe.point(
                self.model, text=self.text, ref=self.ref, held=self.held, micro=self.args.micro_batch_size,
                pad_id=self.pad, ctx=self.ctx, device=self.device, params=self.params, start=self.w0)}
        if step == 0 and self.cache is not None and self.cached is None and common.is_main():
            point = {k: v for k, v in row.items() if k not in ("step", "elapsed", "displacement")}
            with common.atomic_path(self.cache) as tmp:
                torch.save({"ref": self.ref, "point": point}, tmp)
        if self.lora:
            row["displacement"] = probe.lora_displacement(self.model)
        row["probe_s"] = time.time() - t
        if common.is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        common.log(f"probe at step {step} | held-out {row['heldout_loss']:.4f} | general NLL "
                   f"{row['general_nll']:.4f} | KL {row['kl_to_start']:.4f} | moved {row['displacement']:.3g} "
                   f"| {row['probe_s']:.1f}s")
        return row


def start_cache(args, held, precision: str) -> Path | None:
    """--probe-cache DIR: where the start model's probe (its top-k reference and its point) is kept, so
    the runs of a study that start from one model measure it once. The file name hashes everything the
    numbers depend on: the model's weights file (path, size, time), the general text, the held-out
    tokens, the micro-batch, the precision and the torch version. One process only (under torchrun
    each rank holds its own shard of the work)."""
    if not args.probe_cache or dist.is_initialized():
        return None
    folder = Path(common.resolve_model(args.model))
    weights = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")) \
        if folder.is_dir() else [args.model]
    key = json.dumps([weights, Path(args.general_text).read_text(), [e["input_ids"] for e in held],
                      [e["labels"] for e in held], args.micro_batch_size, precision,
                      bool(args.lora), torch.__version__])
    return Path(args.probe_cache) / f"start-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def truncate_log(path: Path, upto: int) -> list:
    """Cut a JSONL log back to its rows up to step `upto` and return them: a resumed run rewrites
    the rest, a new run starts empty (rank 0 writes the file)."""
    rows = [r for r in common.read_jsonl(path) if r["step"] <= upto] if upto and path.exists() else []
    if common.is_main():
        common.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def log_line(row: dict, total: int, sec_per_step: float):
    eta = sec_per_step * (total - row["step"])
    extra = f" | loss@w+e {row['loss_perturbed']:.4f}" if "loss_perturbed" in row else ""
    extra += f" | pnorm {row['perturbation_norm']:.3g}" if "perturbation_norm" in row else ""
    common.log(f"step {row['step']}/{total} | epoch {row['epoch']:.2f} | loss {row['loss']:.4f}{extra} | "
               f"gnorm {row['grad_norm']:.3g} | lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s | "
               f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


def plot(out: Path, rows: list, final: dict):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss at w")
    sam_rows = [r for r in rows if "loss_perturbed" in r]
    if sam_rows:
        ax.plot([r["step"] for r in sam_rows], [r["loss_perturbed"] for r in sam_rows],
                label="train loss at w+e (SAM)")
    if final.get("heldout_loss_start") is not None:
        ax.scatter([0, steps[-1] if steps else 0], [final["heldout_loss_start"], final["heldout_loss_end"]],
                   color="k", zorder=3, label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    common.save_png(fig, out / "loss_curve.png", dpi=120)


def cli(argv=None):
    """The command line: main() with the failures a user must act on as one sentence on stderr."""
    args = parse_args(argv)
    checkpoint.stop_on_sigterm()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:         # also a divergence or a full disk
        common.die(str(e))
    except checkpoint.EXPLAINED as e:                    # a full disk in the logs, a lost rank, SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # torchrun's SIGTERM must not cut the sentence
        if (why := checkpoint.explain(e, args.out)) is None:
            raise
        print(f"error: {why}", file=sys.stderr, flush=True)     # from whichever rank saw it
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
