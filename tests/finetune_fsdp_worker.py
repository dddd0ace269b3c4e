"""Run by tests/test_finetune_fsdp.py and tests/test_checkpoint.py under torchrun: several
finetune.main() runs in one launch (one interpreter start per rank keeps the tests cheap).

    argv[1]: JSON list of runs, each a dict of finetune.Args fields (out, stop_after, resume, ...; an
             "{rank}" in out gives each rank its own folder, as nodes without a shared one would have;
             expect_error: a sentence the run must be refused with),
             or a list of command-line arguments for finetune.cli() (the real command line)
    FLATTUNE_TEST_KILL="RANK STEP FILE": that rank writes the time into FILE and SIGKILLs itself in the
    middle of STEP (after its first forward/backward pass), as the OOM killer would
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import finetune  # noqa: E402


def kill_mid_step(rank: int, step: int, stamp: str):
    calls, real = [0], finetune.forward_backward

    def forward_backward(*a, **kw):
        calls[0] += 1
        loss = real(*a, **kw)
        if calls[0] == step and common.rank_world()[0] == rank:     # first pass of STEP (AdamW)
            Path(stamp).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return loss
    finetune.forward_backward = forward_backward


if __name__ == "__main__":
    runs = json.loads(sys.argv[1])
    if os.environ.get("FLATTUNE_TEST_KILL"):
        rank, step, stamp = os.environ["FLATTUNE_TEST_KILL"].split()
        kill_mid_step(int(rank), int(step), stamp)
    if isinstance(runs[0], str):
        sys.exit(finetune.cli(runs))
    common.init_distributed()            # main() leaves a process group it did not create running
    for kw in runs:
        expect = kw.pop("expect_error", None)       # a run that must be refused with this sentence
        kw["out"] = kw["out"].format(rank=common.rank_world()[0])     # "{rank}": a folder per rank
        try:
            result = finetune.main(finetune.Args(**kw))
        except ValueError as e:
            if expect is None or expect not in str(e):
                raise
            common.log(f"refused as expected: {e}")
            continue
        assert expect is None, f"not refused: {kw}"
        if kw.get("stop_after"):
            assert result["stopped_at"] == kw["stop_after"], result
    common.cleanup_distributed()
