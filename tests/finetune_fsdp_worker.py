"""Run by tests/test_finetune_fsdp.py under torchrun: a 2-rank finetune.main() interrupted after
step 1 and resumed, in one launch (one interpreter start per rank keeps the test cheap)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import finetune  # noqa: E402

if __name__ == "__main__":
    kwargs, out = json.loads(sys.argv[1]), sys.argv[2]
    common.init_distributed()            # main() leaves a process group it did not create running
    stopped = finetune.main(finetune.Args(**kwargs, out=out, stop_after=1))
    assert stopped["stopped_at"] == 1, stopped
    finetune.main(finetune.Args(**kwargs, out=out, resume=True))
    common.cleanup_distributed()
