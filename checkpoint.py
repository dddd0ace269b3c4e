"""finetune.py's files on disk: the resumable checkpoint, the final model folder, and what a run does
when something fails (a rank dies, the loss diverges, the disk fills).

    OUT/checkpoint/             torch.distributed.checkpoint (DCP): the trainable parameters, the
                                optimizer's whole state_dict (SAM and its variants: their extra state
                                too), the scheduler, each rank's RNG; loads under any number of ranks
    OUT/checkpoint/meta.json    step (the data position), world size, the run's arguments, the summary
                                so far; written last, so a folder without it is incomplete
    OUT/{config.json, model.safetensors, tokenizer...}   the final model, a plain Hugging Face folder
    OUT/adapter/                with --lora: the adapter in peft's format (the folder holds the merge)
    OUT/step<k>/                with --save-model-at k: the model after step k, a plain HF folder (merged)

A save writes OUT/.checkpoint-tmp, then renames checkpoint -> .checkpoint-old and .checkpoint-tmp ->
checkpoint. Killed at any instant, one of the three folders holds a complete checkpoint (meta.json
present); find() takes the newest complete one and load() puts it back in place first.
docs/finetune.md "When things fail" says what each failure does and how to resume.
"""
import contextlib
import errno
import io
import math
import os
import random
import re
import shutil
import signal
import sys
import warnings
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

import common

# flags that change the trajectory: a checkpoint only resumes a run with the same values
TRAJECTORY = ("model", "data", "sam", "rho", "adaptive", "sam_interval", "epochs", "lr", "batch_size",
              "micro_batch_size", "max_len", "warmup_ratio", "weight_decay", "seed", "rehearsal",
              "rehearsal_ratio", "max_steps", "limit", "template", "heldout", "grad_clip", "precision",
              "lora", "lora_alpha", "lora_dropout", "lora_targets", "sam_variant", "looksam_alpha", "warmup_steps")
FOLDERS = ("checkpoint", ".checkpoint-old", ".checkpoint-tmp")     # where a complete one can be


class Diverged(ValueError):
    """A non-finite loss or gradient: the run stops before anything of that step is saved."""


class Stopped(RuntimeError):
    """SIGTERM: torchrun stopping the surviving ranks after one died, or a scheduler's preemption."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _flag(x: float) -> torch.Tensor:
    """A one-number tensor where the process group can reduce it (NCCL: on this rank's GPU)."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.tensor([x], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")


# ----------------------------------------------------------------------------- save

def _blob(obj) -> torch.Tensor:
    """Non-tensor state (param groups, scheduler, RNG) as bytes in a uint8 tensor: DCP stores it as is
    and the loader knows its size from the checkpoint's metadata."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unblob(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), weights_only=False)


def _state(model, opt, rank: int, sched=None) -> dict:
    """What DCP saves, by parameter name: trainable parameters and the optimizer's tensors (FSDP2:
    DTensor shards, stored with their global shapes, so any world size reads them back), and the rest
    of opt.state_dict() (SAM's counter, a variant's extra entries), the scheduler and RNG as blobs."""
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    sd = opt.state_dict()
    order = [n for g in _order(model, opt) for n in g]                    # state_dict's integer ids
    tensors = {order[i]: {k: v for k, v in s.items() if torch.is_tensor(v)} for i, s in sd["state"].items()}
    rest = {"groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]],
            "other": {order[i]: {k: v for k, v in s.items() if not torch.is_tensor(v)} for i, s in sd["state"].items()},
            "extra": {k: v for k, v in sd.items() if k not in ("state", "param_groups")}}
    state = {"model": {n: p for p, n in names.items()}, "optim": tensors, "blobs": {"optim": _blob(rest)}}
    if sched is not None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        state["blobs"].update(scheduler=_blob(sched.state_dict()), **{f"rng{rank}": _blob(rng)})
    return state


def _order(model, opt) -> list:
    """Parameter names of each param group, in the optimizer's order."""
    names = {p: n for n, p in model.named_parameters()}
    return [[names[p] for p in g["params"]] for g in opt.param_groups]


def save(out: Path, model, opt, sched, step: int, meta: dict):
    """OUT/checkpoint at `step`, written to .checkpoint-tmp and swapped in (a collective: every rank)."""
    rank, world = common.rank_world()
    tmp = out / ".checkpoint-tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    state = _state(model, opt, rank, sched)
    full = False
    try:
        with _quiet():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not dist.is_initialized())
        if rank == 0:
            common.write_json(tmp / "meta.json", {**meta, "step": step, "world": world})
    except (CheckpointException, OSError, common.DiskFull) as e:
        if not _is_enospc(e):
            raise
        full = True
    if _any(full):                                  # every rank learns it, wherever the disk filled
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # never a half-written folder beside a good one
        # the previous checkpoint stays until the new one is complete: the new one needs its whole size
        raise common.DiskFull(out, _nbytes(state), "a checkpoint")
    if rank == 0:
        _swap(out)
    _barrier()


@contextlib.contextmanager
def _quiet():
    """DCP warns that one process means a single-process save, which is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _any(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = _flag(float(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _swap(out: Path):
    """.checkpoint-tmp (complete) becomes checkpoint. Each rename is atomic, and at every instant
    checkpoint, .checkpoint-old or .checkpoint-tmp holds a complete checkpoint."""
    tmp, final, old = out / ".checkpoint-tmp", out / "checkpoint", out / ".checkpoint-old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _is_enospc(e) -> bool:
    if isinstance(e, CheckpointException):       # DCP gathers every rank's write error
        return any(_is_enospc(exc) for exc, _ in e.failures.values())
    return isinstance(e, common.DiskFull) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)


def _nbytes(obj) -> int:
    """Bytes of all tensors in `obj`, DTensors at their global size (what all ranks write together)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


# ----------------------------------------------------------------------------- resume

def _meta(folder: Path):
    try:
        return common.read_json(folder / "meta.json")
    except (OSError, ValueError):
        return None


def find(out: Path):
    """The newest complete checkpoint folder in OUT (None if there is none)."""
    found = [(m["step"], f) for f in FOLDERS if (m := _meta(Path(out) / f)) is not None]
    return Path(out) / max(found)[1] if found else None


def load(out: Path, model, opt, sched, args: dict) -> dict:
    """Restore the newest complete checkpoint, written by any number of ranks; refuses other
    trajectory flags. A collective under torchrun. Returns its meta.json."""
    rank, world = common.rank_world()
    if rank == 0:
        _recover(out)
    _barrier()
    folder = out / "checkpoint"
    meta = common.read_json(folder / "meta.json")
    for k in TRAJECTORY:
        if meta["args"].get(k) != args.get(k):
            raise ValueError(f"{folder} was written with --{k.replace('_', '-')} "
                             f"{meta['args'].get(k)}, not {args.get(k)}; resume with the same flags or "
                             f"use a new --out.")
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    live = _state(model, opt, rank)["model"]
    rng = f"rng{rank}" if f"blobs.rng{rank}" in saved else "rng0"   # a new rank takes rank 0's
    into = {n: p.detach() for n, p in live.items()}          # DCP loads into these in place
    state = {"model": dict(into),
             "optim": {n: {k[len(f"optim.{n}."):]: _target(md, p) for k, md in saved.items()
                           if k.startswith(f"optim.{n}.") and "." not in k[len(f"optim.{n}."):]}
                       for n, p in live.items()},
             "blobs": {k: torch.empty(saved[f"blobs.{k}"].size, dtype=torch.uint8)
                       for k in ("optim", "scheduler", rng)}}
    state["optim"] = {n: s for n, s in state["optim"].items() if s}
    with _quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=not dist.is_initialized())
    with torch.no_grad():                       # anything DCP replaced instead is copied back
        for n, p in live.items():
            if state["model"][n] is not into[n]:
                p.copy_(state["model"][n])
    rest = _unblob(state["blobs"]["optim"])
    order = _order(model, opt)          # this optimizer's integer ids, by parameter name
    ids = {n: i for i, n in enumerate(n for g in order for n in g)}
    opt.load_state_dict({"state": {ids[n]: {**rest["other"].get(n, {}), **s} for n, s in state["optim"].items()},
                         "param_groups": [{**g, "params": [ids[n] for n in names]}
                                          for g, names in zip(rest["groups"], order)],
                         **rest["extra"]})
    sched.load_state_dict(_unblob(state["blobs"]["scheduler"]))
    r = _unblob(state["blobs"][rng])
    torch.set_rng_state(r["torch"])
    random.setstate(r["python"])
    if r["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(r["cuda"])
    return meta


def _recover(out: Path):
    """Make OUT/checkpoint the newest complete checkpoint after a save killed mid-swap, and remove
    an older or incomplete one left beside it."""
    found = find(out)
    if found is not None and found.name != "checkpoint":
        if found.name == ".checkpoint-old":
            shutil.rmtree(out / ".checkpoint-tmp", ignore_errors=True)
            os.replace(found, out / ".checkpoint-tmp")
        _swap(out)
    for leftover in FOLDERS[1:]:
        shutil.rmtree(out / leftover, ignore_errors=True)


def _target(md, p):
    """An empty tensor for DCP to load one optimizer entry into: sharded like the parameter when it has
    the parameter's global shape (exp_avg, exp_avg_sq), else whole on every rank (step)."""
    if isinstance(p, DTensor) and tuple(md.size) == tuple(p.shape):
        return torch.zeros_like(p, dtype=md.properties.dtype)
    return torch.zeros(md.size, dtype=md.properties.dtype, device=p.device)


# ----------------------------------------------------------------------------- failures

def check_finite(step: int, row: dict, scaler=None):
    """Stop the run at a non-finite loss or gradient norm (before this step is saved anywhere), in one
    sentence naming the step, the loss and the learning rate. An enabled fp16 GradScaler already skips
    such steps and lowers its scale, so then only the loss is its business too and nothing is checked."""
    if scaler is not None and scaler.is_enabled():
        return
    bad = [k for k in ("loss", "loss_perturbed", "grad_norm", "grad_norm_perturbed", "perturbation_norm")
           if k in row and not math.isfinite(row[k])]
    if bad:
        raise Diverged(f"step {step} diverged: loss {row['loss']:.4g}, learning rate {row['lr']:.3g} "
                       f"({', '.join(bad)} not finite); the last checkpoint is the last good one: lower "
                       f"--lr or lengthen the warmup, then rerun (--resume continues from that checkpoint).")


def check_shared(out: Path, needed: bool):
    """Refuse, before any work, a multi-node run whose --out is not one folder that every rank sees:
    checkpoints are written by all ranks and read back by all ranks (after a resume, by other ones)."""
    if not dist.is_initialized() or not needed:
        return
    token = _flag(float(int.from_bytes(os.urandom(6), "little")))   # the seeded RNGs stay untouched
    dist.broadcast(token, src=0)
    probe_file = Path(out) / f".shared-{int(token.item())}"
    if dist.get_rank() == 0:
        probe_file.write_text("")
    dist.barrier()
    sees = _flag(float(probe_file.exists()))
    dist.all_reduce(sees, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        probe_file.unlink()
    if not sees.item():
        raise ValueError(f"--out {out} is not one folder shared by all ranks (some ranks cannot see rank "
                         f"0's files there), but checkpoints are written and read by every rank; put "
                         f"--out on a filesystem all nodes mount (NFS, Lustre, ...), or run without "
                         f"checkpoints (--save-every 0, no --stop-after or --resume).")


def stop_on_sigterm():
    """SIGTERM raises Stopped, so the command line can say what happened and how to resume (torchrun
    sends it to every other rank within its --monitor-interval, 0.1 s, when one rank dies)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)    # once: the exit that follows is not interrupted
        if sys.exc_info()[0] is None:   # else an error is being handled (the lost rank): let it speak
            raise Stopped("SIGTERM")
    signal.signal(signal.SIGTERM, handler)


EXPLAINED = (OSError, RuntimeError, CheckpointException)     # what explain() may have a sentence for


def explain(e: BaseException, out) -> str | None:
    """One sentence for a failure the user must act on (a full disk, a lost rank, SIGTERM), else None."""
    if isinstance(e, CheckpointException):      # DCP wraps what interrupted a save (SIGTERM, a lost rank)
        e = next(iter(e.failures.values()))[0]
    out = Path(out)
    last = find(out)
    where = f"{last} (step {_meta(last)['step']})" if last else "no checkpoint yet"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        folder = Path(e.filename).parent if e.filename else out
        need = max(2**20, 2 * common._du(last)) if last else 2**20
        return str(common.DiskFull(folder, need, "the logs (and later a checkpoint)")) + f" Last checkpoint: {where}."
    rank = dist.get_rank() if dist.is_initialized() else 0
    resume = f"the last checkpoint is {where}: rerun the same command with --resume, on any number of ranks."
    if isinstance(e, Stopped):
        return (f"rank {rank} was stopped by SIGTERM, which torchrun sends to every rank when another one "
                f"fails or dies (killed, out of memory; its summary below names which) and a scheduler "
                f"sends at preemption; {resume}")
    lost = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and re.search(   # gloo: plain RuntimeError
        r"gloo|nccl|connection|timed out|timeout", str(e), re.IGNORECASE))
    if lost and dist.is_initialized():
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0][:120] or e.__class__.__name__
        return (f"rank {rank} lost contact with another rank ({first}): a rank died (killed, out of memory, "
                f"node lost) and torchrun stops the job; {resume}")
    return None


def save_final(out: Path, model, tokenizer):
    """The trained model as a plain HF folder in OUT (FSDP2: the full state dict gathered on rank 0;
    a peft model: the adapter into OUT/adapter, then the merged weights into OUT)."""
    model = _plain(model, copy=False)             # the run is over: a peft model may be merged in place
    if model is None:
        return
    try:
        if hasattr(model, "merge_and_unload"):      # peft: keep the adapter, export the merge
            with common.atomic_path(out / "adapter") as tmp:
                model.save_pretrained(tmp)
            model = model.merge_and_unload()
        # common.save_model swaps whole folders; OUT also holds logs, so move the files in one by one
        staging = out / ".model"
        common.save_model(model, tokenizer, staging)
    except common.DiskFull:                         # nothing of the model is in OUT yet
        raise common.DiskFull(out, _nbytes(model.state_dict()), "the final model") from None
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
