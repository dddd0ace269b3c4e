"""SAM and its variants on 2 ranks (gloo, CPU): FSDP2 and DDP runs equal a single-process run, norms agree."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(worker: str, out: Path, **env) -> list:
    """`torchrun --nproc_per_node 2 tests/<worker> OUT` on CPU (gloo); each rank's OUT/rank{r}.json."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "tests" / worker), str(out)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_two_ranks("sam_fsdp_worker.py", tmp_path_factory.mktemp("sam_fsdp"), TRITON_INTERPRET="1")


@pytest.mark.parametrize("run", ["fsdp_torch", "fsdp_triton", "ddp"])
def test_two_ranks_equal_one_process(results, run):
    for rank_result in results:
        assert rank_result[f"{run}_max_diff"] < 1e-5


@pytest.mark.parametrize("run", ["fsdp_torch", "fsdp_triton", "ddp"])
def test_both_ranks_use_the_global_norm(results, run):
    rank0, rank1 = (r[f"{run}_norms"] for r in results)
    assert rank0 == rank1                                     # the very same all-reduced value
    reference = results[0]["reference_norms"]
    assert rank0 == pytest.approx(reference, rel=1e-5)        # the whole model's, not a shard's


@pytest.mark.parametrize("variant", ["asam", "looksam", "msam", "samon"])
def test_each_variant_on_two_fsdp2_ranks_equals_one_process(results, variant):
    for rank_result in results:
        assert rank_result[f"{variant}_moved"] > 1e-4                 # it trained
        assert rank_result[f"{variant}_max_diff"] < 1e-5
    rank0, rank1 = (r[f"{variant}_norms"] for r in results)
    assert rank0 == rank1 and len(rank0) >= 2
    assert rank0 == pytest.approx(results[0][f"{variant}_reference_norms"], rel=1e-5)
