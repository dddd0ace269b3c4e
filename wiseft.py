"""Wise-FT: interpolate the weights of a model before and after fine-tuning.

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") ensemble two checkpoints of one
architecture in weight space: theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned.
alpha = 0 is the base model, alpha = 1 the fine-tuned one; in between trades new skills against
forgetting (the paper's Table 2(c) compares it with and without SAM).

Launch:
  python wiseft.py --base smollm2-135m --finetuned runs/ft --alpha 0.5 --out runs/wiseft
  python wiseft.py --base smollm2-135m --finetuned runs/ft --alpha 0 0.25 0.5 0.75 1 --out runs/wiseft
      # several alphas: one folder each, runs/wiseft/alpha_0, alpha_0.25, ..., alpha_1
  python wiseft.py --base A --finetuned B --alpha 1.5 --extrapolate --out runs/wiseft_x

Works tensor by tensor from the safetensors files (single file or sharded with an index) and
streams each result to disk, so only one tensor of each model is in memory at a time. Floating
tensors are mixed in fp32 (fp64 stays fp64) and cast back to their stored dtype; integer/bool
tensors must be equal in both checkpoints and are copied. The output keeps the fine-tuned
folder's layout (same shard names and index), its config, generation config and tokenizer, and
adds a wiseft.json and a README.md model card (both parents, alpha, the command).
"""
import argparse
import fnmatch
import json
import math
import shlex
import shutil
import struct
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

import common
import tracking

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# Copied as they are from the fine-tuned folder; other files there (metrics, args, optimizer state)
# describe the fine-tuning run, not the interpolated model, so they are left behind.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
                   "vocab.*", "merges.txt", "*.model")
COPIED_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES
# Config fields that must agree for two checkpoints to be one architecture.
ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
               "tie_word_embeddings")
# An existing --out holding one of these is an earlier output and may be replaced; any other
# non-empty folder is refused.
MODEL_MARKERS = ("wiseft.json", "config.json")
HUB_PATTERNS = ["*.json", "model*.safetensors", "*.jinja", "*.txt", "*.model"]


class CheckpointError(ValueError):
    """A user error in the inputs (mismatched checkpoints, bad alpha); the CLI prints it in one line."""


# ----------------------------------------------------------------------------- inputs

def model_folder(name: str, flag: str) -> Path:
    """A local folder for `name`: a folder, a built-in (`tiny`, `smollm2-135m`), or a hub snapshot."""
    try:
        path = common.resolve_model(name)
    except FileNotFoundError as e:
        raise FileNotFoundError(str(e).replace("--model", flag, 1)) from None
    if Path(path).is_dir():
        return Path(path)
    try:  # a hub name: fetch only config, tokenizer and safetensors (honours HF_HUB_OFFLINE)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same user error here
        raise FileNotFoundError(
            f"{flag} {name}: not a local folder and not available from the hub "
            f"({e.__class__.__name__}); pass a Hugging Face model folder or one of "
            f"{', '.join(common.BUILTIN_MODELS)}.") from None


def weight_map(folder: Path, flag: str) -> dict:
    """{tensor name: safetensors file name} of a model folder (one file or an index, as HF reads it)."""
    if (folder / SINGLE_FILE).exists():
        with safe_open(folder / SINGLE_FILE, "pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    if (folder / INDEX_FILE).exists():
        mapping = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        for fname in sorted(set(mapping.values())):
            if not (folder / fname).exists():
                raise FileNotFoundError(f"{flag} {folder}: shard {fname} listed in {INDEX_FILE} is "
                                        f"missing; copy the complete checkpoint folder.")
        return mapping
    hint = " (a PEFT adapter: merge it into its base model first)" \
        if (folder / "adapter_config.json").exists() else ""
    raise FileNotFoundError(f"{flag} {folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; re-save the "
                            f"model with save_pretrained(folder, safe_serialization=True).")


def tensor_specs(folder: Path, mapping: dict, flag: str) -> dict:
    """{tensor name: (safetensors dtype string, shape)} read from the headers only."""
    specs = {}
    for fname in sorted(set(mapping.values())):
        with safe_open(folder / fname, "pt") as f:
            listed = {k for k, v in mapping.items() if v == fname}
            if set(f.keys()) != listed:
                key = sorted(set(f.keys()) ^ listed)[0]
                raise CheckpointError(f"{flag} {folder}: {fname} and {INDEX_FILE} disagree about {key}; "
                                      f"re-save the checkpoint with save_pretrained.")
            for key in listed:
                s = f.get_slice(key)
                specs[key] = (s.get_dtype(), tuple(s.get_shape()))
    return specs


def check_compatible(a_dir: Path, b_dir: Path) -> tuple[dict, dict]:
    """Raise CheckpointError naming the first difference; return both weight maps."""
    where = f"in --base {a_dir} but {{}} in --finetuned {b_dir}"
    fix = ("Wise-FT needs two checkpoints of one architecture: pass the model --finetuned was "
           "trained from.")
    cfg_a, cfg_b = (json.loads((d / "config.json").read_text()) for d in (a_dir, b_dir))
    for field in ARCH_FIELDS:
        if cfg_a.get(field) != cfg_b.get(field):
            raise CheckpointError(f"config {field} is {cfg_a.get(field)!r} "
                                  f"{where.format(repr(cfg_b.get(field)))}; {fix}")
    map_a, map_b = weight_map(a_dir, "--base"), weight_map(b_dir, "--finetuned")
    spec_a, spec_b = tensor_specs(a_dir, map_a, "--base"), tensor_specs(b_dir, map_b, "--finetuned")
    for key in sorted(spec_a.keys() | spec_b.keys()):
        if key not in spec_a or key not in spec_b:
            present = "present" if key in spec_a else "absent"
            other = "absent" if key in spec_a else "present"
            raise CheckpointError(f"tensor {key} is {present} {where.format(other)}; {fix}")
        (dt_a, shape_a), (dt_b, shape_b) = spec_a[key], spec_b[key]
        if shape_a != shape_b:
            raise CheckpointError(f"tensor {key} has shape {list(shape_a)} "
                                  f"{where.format(list(shape_b))}; {fix}")
        if dt_a != dt_b:
            raise CheckpointError(f"tensor {key} is {dt_a} {where.format(dt_b)}; re-save one of them "
                                  f"in the other's dtype (from_pretrained(dtype=...), save_pretrained).")
        if not dt_a.startswith(("F", "BF")):  # integer/bool tensors are copied, so they must agree
            with safe_open(a_dir / map_a[key], "pt") as fa, safe_open(b_dir / map_b[key], "pt") as fb:
                if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                    raise CheckpointError(f"non-floating tensor {key} ({dt_a}) differs between --base "
                                          f"{a_dir} and --finetuned {b_dir} and cannot be interpolated; "
                                          f"use unquantized checkpoints of one architecture.")
    return map_a, map_b


def check_alphas(alphas, extrapolate: bool) -> list[float]:
    """Distinct alphas in the given order; outside [0, 1] only when extrapolating."""
    out = []
    for a in alphas:
        a = float(a) + 0.0  # + 0.0 turns -0.0 into 0.0 so it names the same folder
        if not math.isfinite(a):
            raise CheckpointError(f"--alpha {a} is not a finite number; pass values in [0, 1].")
        if not 0.0 <= a <= 1.0 and not extrapolate:
            raise CheckpointError(f"--alpha {a} is outside [0, 1]; pass --extrapolate to go beyond the "
                                  f"two models on purpose.")
        if a not in out:
            out.append(a)
    if not out:
        raise CheckpointError("--alpha needs at least one value, e.g. --alpha 0.5.")
    return out


def alpha_dirname(alpha: float) -> str:
    """Folder of one alpha in a sweep: alpha_0, alpha_0.25, alpha_1, alpha_1.5, alpha_-0.5."""
    s = repr(float(alpha) + 0.0)  # shortest text that reads back as the same float
    return "alpha_" + (s[:-2] if s.endswith(".0") else s)


def _check_out(out: Path, inputs: dict):
    """Refuse an output that would replace an input or a folder that is not a model: atomic_path
    swaps the whole folder, so anything else in it (an earlier sweep's alpha_* folders) would go."""
    o = out.resolve()
    for flag, folder in inputs.items():
        f = folder.resolve()
        if o == f or o in f.parents:
            raise CheckpointError(f"--out {out} would replace {flag} {folder}; choose another output "
                                  f"folder.")
    if o.exists() and not o.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder name for the model.")
    if o.is_dir() and any(o.iterdir()) and not any((o / n).is_file() for n in MODEL_MARKERS):
        raise CheckpointError(f"--out {out} is a non-empty folder that is not a model folder (no "
                              f"wiseft.json or config.json) and would be replaced whole; pass a new or "
                              f"empty --out folder.")


# ----------------------------------------------------------------------------- writing

def mix(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * a + alpha * b in fp32 (or fp64), cast back to the stored dtype."""
    if not b.is_floating_point():
        return b
    compute = torch.promote_types(b.dtype, torch.float32)
    return ((1 - alpha) * a.to(compute) + alpha * b.to(compute)).to(b.dtype)


def _copy_side_files(a_dir: Path, b_dir: Path, dst: Path):
    """Config and tokenizer from --finetuned; the tokenizer from --base if --finetuned has none."""
    def matching(folder, patterns):
        return [p for p in sorted(folder.iterdir())
                if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    files = matching(b_dir, COPIED_FILES)
    if not any(any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_FILES) for p in files):
        files += matching(a_dir, TOKENIZER_FILES)
    for p in files:
        shutil.copy2(p, dst / p.name)


def _mix_shard(b_file: Path, dst: Path, files_a: dict, map_a: dict, alpha: float):
    """Write one output shard tensor by tensor; yield the bytes written after each tensor.

    The output has the fine-tuned shard's own header (same names, dtypes, shapes, offsets and
    metadata), so only the data changes and only one tensor is ever held in memory.
    """
    with open(b_file, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = f.read(size)
    layout = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    with open(dst, "wb") as out, safe_open(b_file, "pt") as fb:
        out.write(struct.pack("<Q", size) + header)
        for key, info in sorted(layout.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = mix(files_a[map_a[key]].get_tensor(key), fb.get_tensor(key), alpha)
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            begin, end = info["data_offsets"]
            assert data.nbytes == end - begin, (key, data.nbytes, begin, end)
            out.seek(8 + size + begin)
            out.write(data)
            yield data.nbytes


def _write(a_dir: Path, map_a: dict, b_dir: Path, map_b: dict, alpha: float, out: Path, record: dict):
    """Write one interpolated folder atomically, in --finetuned's layout."""
    shards = sorted(set(map_b.values()))
    total = sum((b_dir / s).stat().st_size for s in shards)
    done, t0, last_log = 0, time.time(), time.time()
    with common.atomic_path(out) as tmp, ExitStack() as stack:
        tmp.mkdir()
        files_a = {f: stack.enter_context(safe_open(a_dir / f, "pt"))
                   for f in sorted(set(map_a.values()))}
        for i, shard in enumerate(shards):
            for nbytes in _mix_shard(b_dir / shard, tmp / shard, files_a, map_a, alpha):
                done += nbytes
                if time.time() - last_log > 10:  # big models: a progress line every 10 s
                    last_log = time.time()
                    rate = done / (last_log - t0)
                    common.log(f"alpha {alpha:g} | shard {i + 1}/{len(shards)} | {rate / 1e6:.0f} MB/s "
                               f"| eta {(total - done) / max(rate, 1):.0f} s")
        if not (b_dir / SINGLE_FILE).exists():  # sharded (weight_map's precedence): same index
            shutil.copy2(b_dir / INDEX_FILE, tmp / INDEX_FILE)
        _copy_side_files(a_dir, b_dir, tmp)
        (tmp / "wiseft.json").write_text(json.dumps({**record, "alpha": alpha}, indent=2) + "\n")
        command = shlex.join(["python", "wiseft.py", "--base", record["base"], "--finetuned", record["finetuned"],
                              "--alpha", str(alpha), "--out", str(out)] + ["--extrapolate"] * (not 0 <= alpha <= 1))
        (tmp / "README.md").write_text(tracking.wiseft_card(record["base"], record["finetuned"], alpha, command, b_dir))
    common.log(f"alpha {alpha:g} | {len(map_b)} tensors | {done / 1e6:.1f} MB | "
               f"{time.time() - t0:.1f} s -> {out}")


def _prepare(base: str, finetuned: str, outs: list[Path]):
    a_dir, b_dir = model_folder(base, "--base"), model_folder(finetuned, "--finetuned")
    for out in outs:
        _check_out(out, {"--base": a_dir, "--finetuned": b_dir})
    map_a, map_b = check_compatible(a_dir, b_dir)
    record = {"method": "wise-ft", "formula": "(1 - alpha) * base + alpha * finetuned",
              "base": base, "finetuned": finetuned,
              "base_path": str(a_dir), "finetuned_path": str(b_dir)}
    return a_dir, map_a, b_dir, map_b, record


def interpolate(base: str, finetuned: str, alpha: float, out: str, extrapolate: bool = False) -> str:
    """Write (1 - alpha) * base + alpha * finetuned as a Hugging Face folder at `out`; return `out`."""
    (alpha,) = check_alphas([alpha], extrapolate)
    a_dir, map_a, b_dir, map_b, record = _prepare(base, finetuned, [Path(out)])
    _write(a_dir, map_a, b_dir, map_b, alpha, Path(out), record)
    return str(out)


def interpolate_many(base: str, finetuned: str, alphas, out: str, extrapolate: bool = False) -> dict:
    """One folder per alpha, out/alpha_<a> (see alpha_dirname); returns {alpha: folder}."""
    alphas = check_alphas(alphas, extrapolate)
    outs = {a: Path(out) / alpha_dirname(a) for a in alphas}
    a_dir, map_a, b_dir, map_b, record = _prepare(base, finetuned, list(outs.values()))
    for a, folder in outs.items():
        _write(a_dir, map_a, b_dir, map_b, a, folder, record)
    return {a: str(folder) for a, folder in outs.items()}


def main(base: str | None = None, finetuned: str | None = None, alpha: list[float] = (0.5,),
         out: str = "runs/wiseft", extrapolate: bool = False) -> list[str]:
    """One alpha: `out` is the model folder. Several distinct alphas: out/alpha_<a>/ each."""
    if not base or not finetuned:
        common.die("--base and --finetuned are both required: pass the stage-1 model (a folder or "
                   "tiny/smollm2-135m) and the folder finetune.py wrote, e.g. `python wiseft.py --base "
                   "smollm2-135m --finetuned runs/ft --alpha 0.5 --out runs/wiseft`.")
    try:
        alphas = check_alphas(alpha, extrapolate)
        if len(alphas) == 1:
            folders = [interpolate(base, finetuned, alphas[0], out, extrapolate)]
        else:
            folders = list(interpolate_many(base, finetuned, alphas, out, extrapolate).values())
    except (CheckpointError, FileNotFoundError) as e:
        common.die(str(e))
    common.write_json(Path(out) / "args.json", {"base": base, "finetuned": finetuned, "alpha": alphas,
                                                "out": out, "extrapolate": extrapolate})
    return folders


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="stage-1 model: HF folder, hub name, tiny or smollm2-135m (alpha = 0)")
    p.add_argument("--finetuned", help="fine-tuned model folder of the same architecture (alpha = 1)")
    p.add_argument("--alpha", type=float, nargs="+", default=[0.5],
                   help="weight of --finetuned; several values write out/alpha_<a>/ each")
    p.add_argument("--out", default="runs/wiseft", help="output model folder (or sweep folder)")
    p.add_argument("--extrapolate", action="store_true", help="allow alpha outside [0, 1]")
    main(**vars(p.parse_args()))
