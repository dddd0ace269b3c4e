"""Worker of tests/test_sam_fsdp.py: SAM on 2 ranks (FSDP2 and DDP) against one process.

    TRITON_INTERPRET=1 python -m torch.distributed.run --nproc_per_node 2 tests/sam_fsdp_worker.py OUT

Every rank trains a small Llama for a few SAM steps three ways and writes OUT/rank{r}.json:
the single-process reference on the full batch; FSDP2 (`fully_shard`, each rank half the batch)
with the torch kernels and with the Triton kernels (interpreter on CPU); DDP with the torch kernels.
Then each other variant (asam, looksam with k = 2, msam, samon): reference against FSDP2 (torch kernels).
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from sam import SAM, normalization_parameters  # noqa: E402

STEPS, RHO, LR = 3, 2.0, 1e-3


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def train(model, batches, params=None, variant="sam"):
    """STEPS steps of a SAM variant (AdamW base), sam.py's loop; returns the global norm of each
    step's perturbation: ||g|| at w, or ||e|| for msam (0 before AdamW has a first moment)."""
    only = normalization_parameters(model) if variant == "samon" else None
    opt = SAM(params if params is not None else model.parameters(), torch.optim.AdamW, rho=RHO,
              lr=LR, weight_decay=0.1, variant=variant, interval=2 if variant == "looksam" else 1,
              perturb_only=only)
    norms = []
    for ids in batches:
        if opt.perturbs_before_pass:
            opt.first_step()
            e = opt.last_perturbation_norm
            norms.append(0.0 if e is None else e.item())
        model(input_ids=ids, labels=ids).loss.backward()
        if opt.perturbs_this_step:
            opt.first_step(zero_grad=True)
            norms.append(opt.last_grad_norm.item())
            model(input_ids=ids, labels=ids).loss.backward()
        opt.second_step(zero_grad=True)
    return norms


def max_diff(reference, weights):
    return max((reference[k] - weights[k]).abs().max().item() for k in reference)


def main(out: str):
    rank, world, _ = common.init_distributed()
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    torch.manual_seed(1)
    full = [torch.randint(0, 128, (2 * world, 16)) for _ in range(STEPS)]   # no padding: equal halves
    mine = [ids[rank * 2:(rank + 1) * 2] for ids in full]
    base = build_model()

    os.environ["FLATTUNE_KERNELS"] = "torch"
    reference = copy.deepcopy(base)
    result = {"reference_norms": train(reference, full)}
    ref_weights = {k: v.detach() for k, v in reference.named_parameters()}

    for kernel_path in ("torch", "triton"):
        os.environ["FLATTUNE_KERNELS"] = kernel_path
        model = copy.deepcopy(base)
        for layer in common.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        result[f"fsdp_{kernel_path}_norms"] = train(model, mine)
        gathered = {k: v.full_tensor() for k, v in model.named_parameters()}
        result[f"fsdp_{kernel_path}_max_diff"] = max_diff(ref_weights, gathered)

    os.environ["FLATTUNE_KERNELS"] = "torch"
    for variant in ("asam", "looksam", "msam", "samon"):
        reference = copy.deepcopy(base)
        result[f"{variant}_reference_norms"] = train(reference, full, variant=variant)
        model = copy.deepcopy(base)
        for layer in common.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        result[f"{variant}_norms"] = train(model, mine, variant=variant)
        result[f"{variant}_max_diff"] = max_diff({k: v.detach() for k, v in reference.named_parameters()},
                                                 {k: v.full_tensor() for k, v in model.named_parameters()})
        result[f"{variant}_moved"] = max_diff({k: v.detach() for k, v in base.named_parameters()},
                                              {k: v.detach() for k, v in reference.named_parameters()})

    ddp = DistributedDataParallel(copy.deepcopy(base))
    result["ddp_norms"] = train(ddp, mine, ddp.parameters())
    result["ddp_max_diff"] = max_diff(ref_weights, dict(ddp.module.named_parameters()))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    common.cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
