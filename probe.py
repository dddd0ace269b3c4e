"""Cheap forgetting probes, a few seconds a point: what finetune.py --eval-every logs along training.

    python data.py --general-text results/general_text.jsonl --model smollm2-135m     # once per study
    python probe.py runs/adamw --start results/stage1 --general-text results/general_text.jsonl \\
        --heldout runs/adamw/heldout.jsonl --out runs/adamw/point.json

A point is {"heldout_loss", "general_nll", "general_nll_passages", "kl_to_start", "kl_passages",
"displacement"}:
  heldout_loss   mean next-token loss on the held-out items of the new task (learning);
  general_nll    mean over passages of each passage's mean per-token loss on fixed general text
                 (data.general_text: LAMBADA prose), the old knowledge (forgetting = its rise);
  kl_to_start    the same average of per-token KL(start || current). The start model's distribution
                 is kept as its top-TOPK log-probabilities per token plus one bucket for the rest, so
                 this is the KL between those coarsened distributions: a lower bound of the full KL
                 that is tight when the start model's mass sits in its top 32 tokens (it does on
                 prose), at 2 MB for 10k tokens instead of 2 GB of full 49k-vocabulary rows;
  displacement   ||w - w0|| / ||w0|| over the trainable parameters (global across FSDP shards).
Per-passage values are kept so that a change is paired per passage and its SE is over passages.
"""
import contextlib
import math

import torch
import torch.distributed as dist

import common
import data
from sam import _local      # a DTensor's local shard, as sam.py's kernels see it

TOPK = 32


class GeneralText:
    """Passages tokenized once, in micro-batches; every token after the first is a target."""

    def __init__(self, records: list[dict], tokenizer, micro: int = 8):
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        examples = []
        for r in records:
            ids = bos + tokenizer(r["text"], add_special_tokens=False)["input_ids"]
            examples.append({"input_ids": ids, "labels": [common.IGNORE] + ids[1:]})
        self.n = len(examples)
        order = sorted(range(self.n), key=lambda i: len(examples[i]["input_ids"]))   # little padding
        self.batches = [(order[j:j + micro], data.collate([examples[i] for i in order[j:j + micro]],
                                                            tokenizer.pad_token_id))
                        for j in range(0, self.n, micro)]


def _target_logprobs(model, batch, ctx, device):
    """log-softmax rows at the target positions of a batch ([N, V], fp32) and each row's passage slot."""
    batch = {k: v.to(device) for k, v in batch.items()}
    keep = batch["labels"][:, 1:] != common.IGNORE
    logits = common.target_logits(model, batch, ctx)
    if logits.dim() == 3:
        logits = logits[:, :-1][keep]
    return logits.float().log_softmax(-1), batch["labels"][:, 1:][keep], keep.nonzero()[:, 0]


def resolve_precision(precision: str, device) -> str:
    """The one precision policy (finetune.py and probe.py): auto is bf16 on GPUs and on CPUs with
    bf16 matrix units (AMX / AVX512-BF16); fp32 elsewhere, where bf16 matmuls are emulated and run
    10-100x slower than fp32. Weights stay fp32 either way."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    units = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return "bf16" if any(getattr(torch.cpu, f, lambda: False)() for f in units) else "fp32"


def autocast_ctx(precision: str, device):
    """bf16 autocast over fp32 weights; none for fp32, or under FSDP2 on GPUs (its policy casts)."""
    if precision == "fp32" or (dist.is_initialized() and device.type == "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def reference(model, text: GeneralText, ctx, device) -> list:
    """The start model's top-TOPK log-probabilities at every target token, per batch (on the CPU)."""
    model.eval()
    ref = []
    for _, batch in text.batches:
        lp, _, _ = _target_logprobs(model, batch, ctx, device)
        top = lp.topk(TOPK, dim=-1)
        ref.append((top.values.cpu(), top.indices.to(torch.int32).cpu()))
    _reshard(model)
    model.train()
    return ref


@torch.no_grad()
def general(model, text: GeneralText, ref, ctx, device) -> tuple[list, list]:
    """Per passage (file order): mean per-token NLL, and mean per-token coarsened KL(start || now)."""
    model.eval()
    nll, kl = [0.0] * text.n, [0.0] * text.n
    for (idx, batch), (ref_lp, ref_ix) in zip(text.batches, ref):
        lp, targets, rows = _target_logprobs(model, batch, ctx, device)
        tok_nll = -lp.gather(1, targets[:, None])[:, 0]
        ref_lp, ref_ix = ref_lp.to(device), ref_ix.to(device).long()
        now = lp.gather(1, ref_ix)                                   # current log-probs of start's top-k
        p_ref = ref_lp.exp()
        rest_ref = (1 - p_ref.sum(-1)).clamp_min(0)
        rest_now = (1 - now.exp().sum(-1)).clamp_min(1e-30)
        tok_kl = (p_ref * (ref_lp - now)).sum(-1) + torch.where(
            rest_ref > 0, rest_ref * (rest_ref.clamp_min(1e-30).log() - rest_now.log()), 0.0)
        counts = torch.bincount(rows, minlength=len(idx)).double()
        per_nll = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, tok_nll.double())
        per_kl = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, tok_kl.double())
        for b, i in enumerate(idx):
            nll[i], kl[i] = float(per_nll[b] / counts[b]), float(per_kl[b] / counts[b])
    _reshard(model)
    model.train()
    return nll, kl


@torch.no_grad()
def heldout_loss(model, examples: list, micro: int, pad_id: int, ctx, device) -> float | None:
    """Mean token loss on held-out examples (every rank runs every batch: FSDP forwards are collective)."""
    if not examples:
        return None
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total, count = 0.0, 0
    for j in range(0, len(order), micro):
        batch = {k: v.to(device) for k, v in data.collate([examples[i] for i in order[j:j + micro]],
                                                           pad_id).items()}
        keep = batch["labels"][:, 1:] != common.IGNORE
        total += float(common.token_loss(common.target_logits(model, batch, ctx), batch["labels"]))
        count += int(keep.sum())
    _reshard(model)
    model.train()
    return total / count


def _reshard(model):
    """FSDP2's root module keeps its weights gathered after a forward; shard them again, so that
    model.parameters() are the DTensor shards once more."""
    if hasattr(model, "reshard"):
        model.reshard()


def _unique(tensors):
    """Each storage once: FSDP2 lists a tied embedding / output matrix as two parameters."""
    seen, out = set(), []
    for t in tensors:
        if t.data_ptr() not in seen or t.numel() == 0:
            seen.add(t.data_ptr())
            out.append(t)
    return out


@torch.no_grad()
def snapshot(params) -> list:
    """A copy of this rank's part of the parameters: w0 for displacement()."""
    return [w.detach().clone() for w in _unique([_local(p) for p in params])]


@torch.no_grad()
def displacement(params, start: list) -> float:
    """||w - w0|| / ||w0|| over `params`; FSDP2 shards are summed over the ranks."""
    sums = torch.zeros(2, dtype=torch.float64, device=start[0].device if start else "cpu")
    for w, w0 in zip(_unique([_local(p) for p in params]), start):
        sums[0] += (w.double() - w0.double()).square().sum()
        sums[1] += w0.double().square().sum()
    if dist.is_initialized() and any(hasattr(p, "to_local") for p in params):
        dist.all_reduce(sums)
    return float(sums[0].sqrt() / sums[1].sqrt()) if sums[1] > 0 else 0.0


@torch.no_grad()
def lora_displacement(model) -> float:
    """||W_merged - W_base|| / ||W_base|| of a peft LoRA model: the merged update scale * B A of every
    adapted layer against the norm of all base weights (what displacement() gives a full fine-tune).
    Under FSDP2 the base norm sums the ranks' shards and the (small) adapters are gathered whole."""
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    _reshard(model)
    base = _unique([_local(p) for name, p in model.named_parameters() if "lora_" not in name])
    norm = torch.stack([w.double().square().sum() for w in base]).sum()
    if dist.is_initialized() and any(hasattr(p, "to_local") for p in model.parameters()):
        dist.all_reduce(norm)
    moved = 0.0
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "scaling"):
            for key in m.lora_A:
                delta = full(m.lora_B[key].weight).double() @ full(m.lora_A[key].weight).double()
                moved += float((delta * m.scaling[key]).square().sum())
    return math.sqrt(moved / float(norm)) if norm > 0 else 0.0


def point(model, *, text, ref, held, micro: int, pad_id: int, ctx, device, params=None, start=None) -> dict:
    """The probes at the model's current weights; displacement from `start` (w0) when given."""
    nll, kl = general(model, text, ref, ctx, device)
    return {"heldout_loss": heldout_loss(model, held, micro, pad_id, ctx, device),
            "general_nll": sum(nll) / len(nll), "kl_to_start": sum(kl) / len(kl),
            "displacement": displacement(params, start) if start is not None else None,
            "general_nll_passages": nll, "kl_passages": kl}


def main(model: str, start: str, general_text: str, heldout: str | None = None, out: str | None = None,
         template: str = "alpaca", max_len: int = 512, micro: int = 8, precision: str = "auto") -> dict:
    """One point for a model folder, measured against the start model (its reference and w0)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = autocast_ctx(resolve_precision(precision, device), device)
    tokenizer = common.load_tokenizer(model)
    text = GeneralText(data.load_general_text(general_text), tokenizer, micro)
    base = common.load_model(start, device=device)
    ref = reference(base, text, ctx, device)
    w0 = snapshot(base.parameters())
    names0 = [n for n, _ in base.named_parameters()]
    del base
    net = common.load_model(model, device=device)
    names = [n for n, _ in net.named_parameters()]
    if names != names0:
        raise ValueError(f"--start {start} and {model} have different parameters; pass the model "
                         f"{model} was fine-tuned from.")
    held = []
    if heldout:
        held, _ = data.tokenize(data.load_records(heldout), tokenizer, max_len, template)
    result = {"model": model, "start": start,
              **point(net, text=text, ref=ref, held=held, micro=micro, pad_id=tokenizer.pad_token_id, ctx=ctx,
                      device=device, params=list(net.parameters()), start=w0)}
    if out:
        common.write_json(out, result)
    common.log(f"{model}: held-out loss {result['heldout_loss']}, general NLL {result['general_nll']:.4f}, "
               f"KL to start {result['kl_to_start']:.4f}, displacement {result['displacement']:.4g}")
    return result


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the model to measure (a folder, tiny, smollm2-135m)")
    p.add_argument("--start", required=True, help="the model it was fine-tuned from (stage 1)")
    p.add_argument("--general-text", required=True, help="general_text.jsonl (python data.py --general-text)")
    p.add_argument("--heldout", default=None, help="held-out records of the new task (finetune's heldout.jsonl)")
    p.add_argument("--out", default=None, help="write the point as JSON here")
    p.add_argument("--template", default="alpaca", choices=data.TEMPLATES)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--micro", type=int, default=8, help="passages per forward pass")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="as finetune.py's: auto is bf16 where the hardware computes it fast")
    a = p.parse_args()
    try:
        main(a.model, a.start, a.general_text, a.heldout, a.out, a.template, a.max_len, a.micro, a.precision)
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))
