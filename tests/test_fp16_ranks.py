"""fp16 + GradScaler + SAM on 2 FSDP2 ranks (gloo, CPU): an inf in ONE rank's gradient shard, in
either pass, makes EVERY rank skip the step and back off; without an inf every rank steps.
The worker is tests/fp16_ranks_worker.py."""
import pytest

from test_sam_fsdp import run_two_ranks

INIT_SCALE = 2.0 ** 10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two_ranks("fp16_ranks_worker.py", tmp_path_factory.mktemp("fp16_ranks"),
                         FLATTUNE_KERNELS="torch")


def test_without_an_inf_every_rank_steps(ranks):
    for r in ranks:
        assert r["control"]["changed"] and r["control"]["adamw_states"] > 0
        assert r["control"]["scale"] == INIT_SCALE


@pytest.mark.parametrize("case", ["inf_pass1", "inf_pass2",
                                  "inf_pass1_sam_reduces", "inf_pass2_sam_reduces"])
def test_an_inf_in_one_ranks_shard_makes_every_rank_skip(ranks, case):
    # the inf is in rank 1's shard only; rank 0's gradients are all finite
    for r in ranks:
        assert r[case]["unchanged_exactly"], f"rank stepped in {case}"
        assert r[case]["adamw_states"] == 0                   # AdamW never ran
        assert r[case]["scale"] == INIT_SCALE / 2             # every rank backed off


def test_what_torch_itself_does(ranks):
    # plain AdamW + GradScaler: torch >= 2.5 all-reduces the found-inf flag of DTensor gradients
    # (rank 0 skips too); with that reduction removed, rank 0 steps: what SAM must not rely on
    if not ranks[0]["torch_reduction_removed"]:
        pytest.skip(f"torch {ranks[0]['torch']} has no DTensor found-inf reduction to remove")
    for r in ranks:
        assert not r["torch_alone"]["changed"] and r["torch_alone"]["scale"] == INIT_SCALE / 2
    assert ranks[0]["torch_alone_without_reduction"]["changed"]
    assert not ranks[1]["torch_alone_without_reduction"]["changed"]
