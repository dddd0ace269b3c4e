"""finetune.py's files on disk: the resumable checkpoint (per-rank shards) and the final model folder.

    OUT/checkpoint/rank<r>.pt   this rank's trainable parameters (FSDP2: its shards), optimizer state
                                (SAM: with its step counter), scheduler, RNG states
    OUT/checkpoint/meta.json    step, world size, the run's arguments, the summary so far
    OUT/{config.json, model.safetensors, tokenizer...}   the final model, a plain Hugging Face folder
    OUT/adapter/                with --lora: the adapter in peft's format (the folder holds the merge)
    OUT/step<k>/                with --save-model-at k: the model after step k, a plain HF folder (merged)

Each is written to a temporary name and renamed, so a crash leaves the previous one intact.
"""
import json
import os
import random
import shutil
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import common

# flags that change the trajectory: a checkpoint only resumes a run with the same values
TRAJECTORY = ("model", "data", "sam", "rho", "adaptive", "sam_interval", "epochs", "lr", "batch_size",
              "micro_batch_size", "max_len", "warmup_ratio", "weight_decay", "seed", "rehearsal",
              "rehearsal_ratio", "max_steps", "limit", "template", "heldout", "grad_clip", "precision",
              "lora", "lora_alpha", "lora_dropout", "lora_targets")


def _to_local(obj):
    """Nested state with DTensors replaced by this rank's shard, on the CPU."""
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


def save(out: Path, model, opt, sched, step: int, meta: dict):
    """OUT/checkpoint: every rank writes its file into a temporary folder that rank 0 renames."""
    rank, _ = common.rank_world()
    tmp, final = out / ".checkpoint-tmp", out / "checkpoint"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
    torch.save({"model": _to_local(trainable), "optimizer": _to_local(opt.state_dict()),
                "scheduler": sched.state_dict(), "rng": rng}, tmp / f"rank{rank}.pt")
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


def load(out: Path, model, opt, sched, args: dict) -> dict:
    """Restore what save() wrote; refuses a checkpoint of another world size or other trajectory flags."""
    rank, world = common.rank_world()
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    if meta["world"] != world:
        raise ValueError(f"{out}/checkpoint was written by {meta['world']} ranks; resume with "
                         f"--nproc_per_node {meta['world']} (or start a new --out).")
    for k in TRAJECTORY:
        if meta["args"].get(k) != args.get(k):
            raise ValueError(f"{out}/checkpoint was written with --{k.replace('_', '-')} "
                             f"{meta['args'].get(k)}, not {args.get(k)}; resume with the same flags or "
                             f"use a new --out.")
    state = torch.load(out / "checkpoint" / f"rank{rank}.pt", weights_only=False)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if p.requires_grad:
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
    """The trained model as a plain HF folder in OUT (FSDP2: the full state dict gathered on rank 0;
    a peft model: the adapter into OUT/adapter, then the merged weights into OUT)."""
    model = _plain(model, copy=False)             # the run is over: a peft model may be merged in place
    if model is None:
        return
    if hasattr(model, "merge_and_unload"):          # peft: keep the adapter, export the merge
        with common.atomic_path(out / "adapter") as tmp:
            model.save_pretrained(tmp)
        model = model.merge_and_unload()
    # common.save_model swaps whole folders; OUT also holds logs, so move the files in one by one
    staging = out / ".model"
    common.save_model(model, tokenizer, staging)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()


def save_model_at(folder: Path, model, tokenizer):
    """The model as it is now, mid-run, as a plain HF folder (--save-model-at): with LoRA the merge of a
    copy, so training goes on with its adapters untouched. A collective under FSDP2: every rank calls it."""
    model = _plain(model, copy=True)
    if model is None:
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    common.save_model(model, tokenizer, folder)


def _plain(model, copy: bool):
    """The model as one ordinary module on rank 0 (None on the other ranks). FSDP2: the full state dict
    gathered into a fresh model (with the same adapters under peft). One process: the model itself, or
    with copy=True a copy of a peft model, since merging would change the one being trained."""
    if not dist.is_initialized():
        return deepcopy(model) if copy and hasattr(model, "merge_and_unload") else model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not common.is_main():
        return None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
        if hasattr(model, "peft_config"):       # the same adapters, to load the gathered state into
            from peft import get_peft_model
            plain = get_peft_model(plain, model.peft_config["default"])
    plain.load_state_dict(sd, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain
