import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # CI has no model hub: never wait on it
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without a GPU the Triton kernels run under the interpreter, which triton.jit picks when the kernels
# are imported: set it before any test module imports them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_path():
    """The cached `tiny` model folder (built on first use)."""
    import common
    return common.resolve_model("tiny")


@pytest.fixture(scope="session")
def smol_path():
    import common
    return common.resolve_model("smollm2-135m")
