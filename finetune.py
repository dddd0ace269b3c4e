"""Instruction fine-tuning with AdamW or SAM, one process or many (torchrun + FSDP2).

    python finetune.py                                   # smollm2-135m on offline gsm8k -> runs/finetune
    python finetune.py --model tiny --data gsm8k --limit 64 --batch-size 8 --max-len 256 --out runs/t
    python finetune.py --model M --data open-platypus --out runs/p --sam --rho 0.05 --epochs 1
    torchrun --nproc_per_node 16 finetune.py --sam --rho 2        # FSDP2; same defaults as above
    torchrun --nproc_per_node 8 --nnodes 2 --node_rank R --master_addr H finetune.py \\
        --model meta-llama/Llama-2-7b-hf --data alpaca --epochs 3 --lr 2e-5 --out runs/alpaca
    python finetune.py ... --resume                      # continue from OUT/checkpoint

One optimizer step sees --batch-size examples: micro-batches of --micro-batch-size on every rank,
accumulated. The loss is the mean over all target tokens of the step (all micro-batches, all
ranks), so one process and N ranks compute the same gradient. SAM does two forward/backward passes
per step (at w and at w+e): 1 SAM epoch costs what 2 AdamW epochs cost.

Writes into --out: the Hugging Face model (config, safetensors, tokenizer), args.json,
metrics.jsonl (one line per step), heldout.jsonl, final.json (written last: the run finished),
loss_curve.png, and checkpoint/ (removed at the end unless --keep-checkpoint).
"""
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import common
import data

TEMPLATES = data.TEMPLATES     # main() has a parameter named `data`
PRECISIONS = ("auto", "bf16", "fp32")

# flags that change the trajectory: a checkpoint only resumes a run with the same values
TRAJECTORY = ("model", "data", "sam", "rho", "adaptive", "sam_interval", "epochs", "lr", "batch_size",
              "micro_batch_size", "max_len", "warmup_ratio", "weight_decay", "seed", "rehearsal",
              "rehearsal_ratio", "max_steps", "limit", "template", "heldout", "grad_clip", "precision")


# ----------------------------------------------------------------------------- model

def _full(x) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def setup_model(name: str, rank: int, device, precision: str, checkpointing: bool):
    """fp32 master weights. Under torchrun (any world size): rank 0 reads the weights, the others
    build on the meta device, each decoder layer and then the root are sharded (FSDP2), and rank 0
    broadcasts the weights into the shards."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not dist.is_initialized():
        model = common.load_model(name, device=device)
    elif rank == 0:
        model = common.load_model(name)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(common.resolve_model(name)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    set_model_state_dict(model, full,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buf in model.buffers():        # non-persistent buffers (rotary tables) are not in the state dict
        dist.broadcast(buf, src=0)
    return model.train()


def resolve_precision(precision: str, device) -> str:
    """auto: bf16 on GPUs and on CPUs with bf16 matrix units (AMX / AVX512-BF16); fp32 elsewhere,
    where bf16 matmuls are emulated and run 10-100x slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    units = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return "bf16" if any(getattr(torch.cpu, f, lambda: False)() for f in units) else "fp32"


def autocast_ctx(precision: str, device):
    if precision == "fp32" or (dist.is_initialized() and device.type == "cuda"):   # FSDP2 policy casts
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def loss_sum(model, batch: dict, ctx) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of one micro-batch. The vocabulary
    projection runs only where a target is predicted (a boolean `logits_to_keep`): prompt positions
    cost no logits, which saves memory and time with a 49k vocabulary."""
    targets = batch["labels"][:, 1:]
    keep = targets != data.IGNORE                            # position t predicts token t + 1
    kw = {"logits_to_keep": F.pad(keep, (0, 1), value=False)} if _keeps_logits(model) else {}
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
    if logits.dim() == 3:                                    # every position came back
        logits = logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def _keeps_logits(model) -> bool:
    import inspect
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def n_targets(example: dict) -> int:
    return sum(l != data.IGNORE for l in example["labels"][1:])


@torch.no_grad()
def heldout_loss(model, examples: list, micro: int, pad_id: int, ctx, device) -> float | None:
    """Mean token loss on held-out examples (every rank runs every batch: FSDP forwards are collective)."""
    if not examples:
        return None
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    for j in range(0, len(order), micro):
        chunk = [examples[i] for i in order[j:j + micro]]
        batch = {k: v.to(device) for k, v in data.collate(chunk, pad_id).items()}
        total += float(loss_sum(model, batch, ctx))
        count += sum(n_targets(e) for e in chunk)
    model.train()
    return total / count


# ----------------------------------------------------------------------------- data

def build_data(name, template, max_len, limit, heldout, rehearsal, rehearsal_ratio, tokenizer, out):
    records = data.load_records(name)
    train, held = data.split_heldout(records, heldout)
    train = data.subsample(train, limit)
    if rehearsal:
        train = data.mix_rehearsal(train, data.load_records(rehearsal), rehearsal_ratio)
    if common.is_main():
        with common.atomic_path(Path(out) / "heldout.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    examples, stats = data.tokenize(train, tokenizer, max_len, template)
    held_ex, _ = data.tokenize(held, tokenizer, max_len, template)
    common.log(f"data: {name} {len(train)} train records (rehearsal {rehearsal or 'none'}), "
               f"{len(held)} held out; {stats['examples']} examples, {stats['truncated']} truncated to "
               f"{max_len} tokens, {stats['dropped']} dropped (no response token left)")
    return examples, held_ex, stats


def epoch_plan(examples, micro: int, per_step: int, world: int, seed: int, epoch: int) -> list:
    """Steps of one epoch: each a list of micro-batches (index lists); rank r takes [r::world].
    A short last step keeps a multiple of `world` micro-batches so every rank runs as many passes."""
    mbs = data.length_grouped_batches(examples, micro, seed, epoch)
    steps = [mbs[i:i + per_step] for i in range(0, len(mbs), per_step)]
    if steps and len(steps[-1]) % world:
        steps[-1] = steps[-1][:len(steps[-1]) - len(steps[-1]) % world]
    return [s for s in steps if s]


# ----------------------------------------------------------------------------- checkpoints

def _to_local(obj):
    """Nested state with DTensors replaced by this rank's shard (per-rank checkpoint files)."""
    if isinstance(obj, DTensor):
        return obj.to_local().detach().cpu().clone()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_local(v) for v in obj)
    return obj


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(out: Path, model, opt, sched, step: int, meta: dict, rank: int):
    """OUT/checkpoint/{rank<r>.pt, meta.json}: written to a temporary folder, then renamed."""
    tmp, final = out / ".checkpoint-tmp", out / "checkpoint"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"model": _to_local({k: p for k, p in model.named_parameters()}),
                "optimizer": _to_local(opt.state_dict()), "scheduler": sched.state_dict(), "rng": rng},
               tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
        old = out / ".checkpoint-old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_checkpoint(out: Path, model, opt, sched, rank: int, world: int, args: dict) -> dict:
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    if meta["world"] != world:
        raise ValueError(f"{out}/checkpoint was written by {meta['world']} ranks; resume with "
                         f"--nproc_per_node {meta['world']} (or start a new --out).")
    for k in TRAJECTORY:
        if meta["args"].get(k) != args[k]:
            raise ValueError(f"{out}/checkpoint was written with --{k.replace('_', '-')} "
                             f"{meta['args'].get(k)}, not {args[k]}; resume with the same flags or "
                             f"use a new --out.")
    state = torch.load(out / "checkpoint" / f"rank{rank}.pt", weights_only=False)
    with torch.no_grad():
        for k, p in model.named_parameters():
            (p.to_local() if isinstance(p, DTensor) else p).copy_(state["model"][k])
    opt.load_state_dict(state["optimizer"])
    _restore_dtensor_state(opt)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return meta


def _restore_dtensor_state(opt):
    """Optimizer state loads as plain tensors; FSDP2 parameters need it as DTensor shards again."""
    for o in {id(o): o for o in (opt, getattr(opt, "base_optimizer", opt))}.values():
        for p, st in o.state.items():
            if not isinstance(p, DTensor):
                continue
            for k, v in st.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                               run_check=False, shape=p.shape, stride=p.stride())


def save_final(out: Path, model, tokenizer):
    """The trained model as a plain HF folder in OUT (FSDP2: the full state dict gathered on rank 0)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not common.is_main():
            return
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(sd, assign=True)
        plain.tie_weights()
        plain.generation_config = model.generation_config
        model = plain
    # common.save_model swaps whole folders; OUT also holds logs, so move the files in one by one
    staging = out / ".model"
    common.save_model(model, tokenizer, staging)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()


def plot(out: Path, rows: list, final: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.tight_layout()
    with common.atomic_path(out / "loss_curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- training

def make_optimizer(model, sam: bool, rho: float, adaptive: bool, interval: int, lr: float,
                   weight_decay: float):
    # fused AdamW: one kernel, no parameter-sized temporaries (what the HF Trainer uses too)
    kw = dict(lr=lr, weight_decay=weight_decay, fused=True)
    if not sam:
        return torch.optim.AdamW(model.parameters(), **kw)
    from sam import SAM
    return SAM(model.parameters(), base_optimizer=torch.optim.AdamW, rho=rho, adaptive=adaptive,
               interval=interval, **kw)


def cosine_with_warmup(opt, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)    # SAM shares AdamW's param_groups


def accumulate(r, mine: list, step_targets: int) -> float:
    """Backward over this rank's micro-batches, scaled so the summed gradient is the step's token
    mean (FSDP2 averages over ranks, hence * world). Returns the step's mean loss over all ranks."""
    total = torch.zeros((), device=r.device)
    for i, mb in enumerate(mine):
        if dist.is_initialized():      # reduce-scatter once, after the last micro-batch
            r.net.set_requires_gradient_sync(i == len(mine) - 1)
        batch = {k: v.to(r.device) for k, v in data.collate([r.examples[j] for j in mb], r.pad_id).items()}
        loss = loss_sum(r.net, batch, r.ctx)
        (loss * r.world / step_targets).backward()
        total += loss.detach()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total) / step_targets


def clip(model, max_norm: float) -> float:
    if max_norm > 0:
        return _full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    return _full(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def train_step(r, step_mbs: list) -> dict:
    """One optimizer step on the micro-batches `step_mbs` (all ranks'; this rank takes [rank::world])."""
    mine, opt = step_mbs[r.rank::r.world], r.opt
    targets = sum(n_targets(r.examples[j]) for mb in step_mbs for j in mb)
    row = {"loss": accumulate(r, mine, targets)}
    if r.a["sam"] and opt.perturbs_this_step:          # with --sam-interval k, every k-th step
        opt.first_step(zero_grad=True)
        row["loss_perturbed"] = accumulate(r, mine, targets)
        row["grad_norm_perturbed"] = clip(r.net, r.a["grad_clip"])
        opt.second_step(zero_grad=True)
        row["grad_norm"] = _full(opt.last_grad_norm)
        row["perturbation_norm"] = _full(opt.last_perturbation_norm)
    else:
        row["grad_norm"] = clip(r.net, r.a["grad_clip"])
        opt.second_step(zero_grad=True) if r.a["sam"] else opt.step()
        opt.zero_grad(set_to_none=True)
    row["passes"] = 2 if "loss_perturbed" in row else 1
    row["micro_batch_passes"] = row["passes"] * len(step_mbs)
    row["lr"] = r.sched.get_last_lr()[0]
    r.sched.step()
    row["tokens"] = sum(len(r.examples[j]["input_ids"]) for mb in step_mbs for j in mb)
    return row


def train(r, start: int, total: int, spe: int, rows: list, summary: dict) -> dict:
    """Steps start..total-1; appends to metrics.jsonl, logs, checkpoints; stops early on --stop-after."""
    a, plan, plan_epoch = r.a, None, -1
    t0, elapsed0 = time.time(), rows[-1]["elapsed"] if rows else 0.0
    for step in range(start, total):
        if step // spe != plan_epoch:          # the order of an epoch depends only on (seed, epoch)
            plan_epoch = step // spe
            plan = epoch_plan(r.examples, a["micro_batch_size"], a["batch_size"] // a["micro_batch_size"],
                              r.world, a["seed"], plan_epoch)
        t = time.time()
        row = train_step(r, plan[step % spe])
        dt = time.time() - t
        row.update(step=step + 1, epoch=round((step + 1) / spe, 4), tokens_per_s=row["tokens"] / dt,
                   step_time=dt, elapsed=elapsed0 + time.time() - t0)
        rows.append(row)
        if common.is_main():
            with open(r.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if (step + 1) % a["log_every"] == 0 or step + 1 == total:
            _log_line(row, total, (time.time() - t0) / (step + 1 - start))
        stop = a["stop_after"] is not None and a["stop_after"] <= step + 1 < total
        if stop or (a["save_every"] and (step + 1) % a["save_every"] == 0 and step + 1 < total):
            save_checkpoint(r.out, r.net, r.opt, r.sched, step + 1,
                            {"world": r.world, "args": a, "summary": summary}, r.rank)
        if stop:
            common.log(f"stopped after step {step + 1} (checkpoint saved; rerun with --resume)")
            return {"stopped_at": step + 1}
    seconds = sum(x["step_time"] for x in rows)
    return {"final_loss": rows[-1]["loss"] if rows else None, "elapsed_s": rows[-1]["elapsed"] if rows else 0.0,
            "tokens_per_s": sum(x["tokens"] for x in rows) / max(1e-9, seconds)}


def _log_line(row: dict, total: int, sec_per_step: float):
    eta = sec_per_step * (total - row["step"])
    extra = (f" | loss@w+e {row['loss_perturbed']:.4f} | pnorm {row['perturbation_norm']:.3g}"
             if "loss_perturbed" in row else "")
    common.log(f"step {row['step']}/{total} | epoch {row['epoch']:.2f} | loss {row['loss']:.4f}{extra} | "
               f"gnorm {row['grad_norm']:.3g} | lr {row['lr']:.2e} | {row['tokens_per_s']:.0f} tok/s | "
               f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


def _read_metrics(out: Path, upto: int) -> list:
    """Rows of metrics.jsonl up to step `upto` (a resumed run rewrites the rest)."""
    path, rows = out / "metrics.jsonl", []
    if upto and path.exists():
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        rows = [x for x in rows if x["step"] <= upto]
    if common.is_main():
        common.write_text(path, "".join(json.dumps(x) + "\n" for x in rows))
    return rows


def main(model: str = "smollm2-135m", data: str = "gsm8k", out: str = "runs/finetune",
         sam: bool = False, rho: float = 2.0, adaptive: bool = False, sam_interval: int = 1,
         epochs: int = 2, lr: float = 5e-6, batch_size: int = 128, micro_batch_size: int = 4,
         max_len: int = 512, warmup_ratio: float = 0.03, weight_decay: float = 0.0, seed: int = 0,
         rehearsal: str | None = None, rehearsal_ratio: float = 0.1, max_steps: int | None = None,
         limit: int | None = None, resume: bool = False, template: str = "alpaca", heldout: int = 32,
         grad_clip: float = 1.0, precision: str = "auto", activation_checkpointing: bool = False,
         log_every: int = 1, save_every: int = 100, keep_checkpoint: bool = False,
         stop_after: int | None = None) -> dict:
    """Fine-tune and write OUT (see the module docstring). Returns final.json's content, or
    {"stopped_at": step} when stop_after interrupted the run."""
    a = dict(locals())
    owns_group = not dist.is_initialized()      # a caller's process group is left running
    rank, world, device = common.init_distributed()
    outp, per_step = Path(out), batch_size // micro_batch_size   # micro-batches a step, all ranks
    if batch_size % (micro_batch_size * world) or template not in TEMPLATES or precision not in PRECISIONS:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of --micro-batch-size "
                         f"{micro_batch_size} x {world} ranks, --template one of {TEMPLATES}, "
                         f"--precision one of {PRECISIONS}.")
    compute = resolve_precision(precision, device)
    torch.manual_seed(seed)
    random.seed(seed)
    outp.mkdir(parents=True, exist_ok=True)
    if common.is_main():
        (outp / "final.json").unlink(missing_ok=True)     # a run in progress is not a finished run
    tokenizer = common.load_tokenizer(model)
    examples, held_ex, stats = build_data(data, template, max_len, limit, heldout, rehearsal,
                                          rehearsal_ratio, tokenizer, outp)
    spe = len(epoch_plan(examples, micro_batch_size, per_step, world, seed, 0))
    total = min(epochs * spe, max_steps or 10**12)
    if total < 1:
        raise ValueError(f"{stats['examples']} examples make no full step of --batch-size {batch_size} "
                         f"on {world} ranks; lower --batch-size or add data.")
    net = setup_model(model, rank, device, compute, activation_checkpointing)
    opt = make_optimizer(net, sam, rho, adaptive, sam_interval, lr, weight_decay)
    sched = cosine_with_warmup(opt, max(1, math.ceil(warmup_ratio * total)), total)
    r = SimpleNamespace(net=net, opt=opt, sched=sched, examples=examples, rank=rank, world=world,
                        device=device, out=outp, a=a, ctx=autocast_ctx(compute, device),
                        pad_id=tokenizer.pad_token_id)
    common.log(f"{world} rank(s) on {device.type}, {compute} compute over fp32 weights, {total} steps "
               f"of {batch_size} examples ({per_step // world} micro-batches of {micro_batch_size} per rank)")
    start, summary = 0, {}
    if resume and (outp / "checkpoint" / "meta.json").exists():
        meta = load_checkpoint(outp, net, opt, sched, rank, world, a)
        start, summary = meta["step"], meta["summary"]
        common.log(f"resumed from {outp}/checkpoint at step {start}")
    else:
        summary["heldout_loss_start"] = heldout_loss(net, held_ex, micro_batch_size, r.pad_id, r.ctx, device)
    if common.is_main():                        # after a refused resume, args.json stays the old run's
        common.write_json(outp / "args.json", {**a, "world": world, "compute_precision": compute})
    rows = _read_metrics(outp, start)
    summary.update(train(r, start, total, spe, rows, summary))
    if "stopped_at" not in summary:
        summary["heldout_loss_end"] = heldout_loss(net, held_ex, micro_batch_size, r.pad_id, r.ctx, device)
        save_final(outp, net, tokenizer)
        summary = finish(r, rows, {**summary, "heldout_items": len(held_ex), "steps": total,
                                   "steps_per_epoch": spe, "data_stats": stats, "compute_precision": compute})
    if owns_group:
        common.cleanup_distributed()
    return summary


def finish(r, rows: list, summary: dict) -> dict:
    final = {**summary, "optimizer": "SAM" if r.a["sam"] else "AdamW", "world": r.world,
             "passes": sum(x["passes"] for x in rows),
             "micro_batch_passes": sum(x["micro_batch_passes"] for x in rows)}
    if common.is_main():
        plot(r.out, rows, final)
        common.write_json(r.out / "final.json", final)      # written last: the run is complete
        if not r.a["keep_checkpoint"]:
            shutil.rmtree(r.out / "checkpoint", ignore_errors=True)
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    common.log(f"done: {final['steps']} steps, {final['passes']} forward/backward passes over the batch "
               f"({final['micro_batch_passes']} micro-batch passes); held-out loss "
               f"{fmt(final['heldout_loss_start'])} -> {fmt(final['heldout_loss_end'])}; model in {r.out}")
    return final


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF folder | hub name")
    p.add_argument("--data", default="gsm8k",
                   help="dataset name (python data.py lists them), hub id, or .json/.jsonl file")
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--sam", action="store_true", help="SAM (sam.py) around AdamW")
    p.add_argument("--rho", type=float, default=2.0, help="SAM radius (the paper's 2; README: picking rho)")
    p.add_argument("--adaptive", action="store_true", help="ASAM: perturbation scaled by |w|")
    p.add_argument("--sam-interval", type=int, default=1, help="perturb every k-th step (1: every step)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step, all ranks")
    p.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward, per rank")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rehearsal", default=None, help="old data mixed into --data (per dataset)")
    p.add_argument("--rehearsal-ratio", type=float, default=0.1, help="old items = ratio x new items")
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (schedule fits it)")
    p.add_argument("--limit", type=int, default=None, help="use N training items (fixed subset)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    p.add_argument("--template", default="alpaca", choices=data.TEMPLATES)
    p.add_argument("--heldout", type=int, default=32, help="items held out for the in-domain loss")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="bf16 compute over fp32 master weights, or fp32 throughout; auto: bf16 on "
                        "GPUs and CPUs with AMX/AVX512-BF16, else fp32")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after the run")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps with a checkpoint, as if interrupted (time-boxed jobs)")
    try:
        main(**vars(p.parse_args()))
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))
