"""Worker of tests/test_fp16_ranks.py: fp16 autocast + GradScaler + SAM on FSDP2, an inf in ONE rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/fp16_ranks_worker.py OUT

Each case shards a fresh copy of a small Llama (each decoder layer, then the root) and takes one
SAM step with a GradScaler. "inf_pass1" / "inf_pass2" write an inf into one element of rank 1's
local gradient shard after the first / second backward; "control" injects nothing. A second case
per pass, "..._sam_reduces", disables torch's own reduction of the found-inf flag inside DTensor's
unscale, so only SAM's makes the ranks agree. "torch_alone" runs plain AdamW with the scaler and
the inf in rank 1's shard: whether torch itself makes rank 0 skip (a fact about this torch version).
Every rank writes OUT/rank{r}.json: per case, whether its local weights changed, the scale after
update(), and the number of AdamW states (0 when the step was skipped).
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from sam import SAM  # noqa: E402
from sam_fsdp_worker import build_model  # noqa: E402  (this folder is on sys.path: the script's own)

INIT_SCALE = 2.0 ** 10


def shard(base):
    from torch.distributed.fsdp import fully_shard
    model = copy.deepcopy(base)
    for layer in common.decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def local_weights(model):
    return [p.to_local().detach().clone() for p in model.parameters()]


def inject_inf(model, rank):
    """An inf in rank 1's shard of the first parameter that has local elements there."""
    if rank != 1:
        return
    for p in model.parameters():
        g = p.grad.to_local()
        if g.numel():
            g.view(-1)[0] = float("inf")
            return
    raise RuntimeError("rank 1 holds no gradient elements")


def loss_of(model, ids):
    with torch.autocast("cpu", dtype=torch.float16):
        return model(input_ids=ids, labels=ids).loss


def sam_case(base, ids, rank, inf_in):
    model = shard(base)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    before = local_weights(model)
    scaler.scale(loss_of(model, ids)).backward()
    if inf_in == 1:
        inject_inf(model, rank)
    opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(loss_of(model, ids)).backward()
    if inf_in == 2:
        inject_inf(model, rank)
    opt.second_step(zero_grad=True, scaler=scaler)
    scaler.update()
    after = local_weights(model)
    return {"changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "unchanged_exactly": all(torch.equal(a, b) for a, b in zip(before, after)),
            "scale": scaler.get_scale(), "adamw_states": len(opt.base_optimizer.state)}


def torch_alone_case(base, ids, rank):
    model = shard(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    before = local_weights(model)
    scaler.scale(loss_of(model, ids)).backward()
    inject_inf(model, rank)
    scaler.step(opt)
    scaler.update()
    after = local_weights(model)
    return {"changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
            "scale": scaler.get_scale()}


def without_torch_reduction():
    """Context that removes DTensor's found-inf all-reduce (torch >= 2.5), as older torch lacks it."""
    import contextlib
    try:
        from torch.distributed.tensor import DTensor
        handlers = DTensor._op_dispatcher._custom_op_handlers
        op = torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default
    except (ImportError, AttributeError):
        return contextlib.nullcontext(False)

    @contextlib.contextmanager
    def ctx():
        saved = handlers.pop(op, None)
        try:
            yield saved is not None
        finally:
            if saved is not None:
                handlers[op] = saved
    return ctx()


def main(out: str):
    rank, world, _ = common.init_distributed()
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2 * world, 16))[rank * 2:(rank + 1) * 2]
    base = build_model()
    result = {"torch": torch.__version__,
              "control": sam_case(base, ids, rank, None),
              "inf_pass1": sam_case(base, ids, rank, 1),
              "inf_pass2": sam_case(base, ids, rank, 2),
              "torch_alone": torch_alone_case(base, ids, rank)}
    with without_torch_reduction() as removed:
        result["torch_reduction_removed"] = removed
        result["torch_alone_without_reduction"] = torch_alone_case(base, ids, rank)
        result["inf_pass1_sam_reduces"] = sam_case(base, ids, rank, 1)
        result["inf_pass2_sam_reduces"] = sam_case(base, ids, rank, 2)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
