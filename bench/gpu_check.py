"""GPU readiness: one command that proves the CUDA path and records what it saw, in minutes.

    python bench/gpu_check.py OUTDIR                  # one GPU, ~4-8 min on an H200; no network needed
    python bench/gpu_check.py OUTDIR --smoke          # CPU, tiny shapes, under a minute (CI runs it)
    python bench/gpu_check.py OUTDIR --only kernel_bandwidth,sam_vs_adamw   # a subset

Everything it needs is built at run time from the repository (no hub, no `datasets`, no `gguf`).
Checks, in order (each is timed, and one that raises is recorded as an error; the rest still run):
  environment      versions, the GPU, and that common/data/finetune/evaluate/sam/kernels import
                   with `datasets` and `gguf` absent;
  kernel_tests     tests/test_kernels.py under pytest: compiled on CUDA (odd sizes, fp32/bf16/fp16,
                   bit-exact restore, norms against fp64); --smoke: a few cases under the interpreter;
  kernel_bandwidth perturb + restore (norm, w <- w + s g keeping a copy, copy back) over (a) one
                   Llama-2-7B decoder layer in fp32 and (b) every parameter of a Llama-3-8B-shaped
                   model in bf16: Triton, the torch._foreach reference, and a per-parameter loop, each
                   as a share of the device copy bandwidth measured on the same tensors (counting the
                   7 element-sizes per parameter the primitive must move, as bench/bench_sam.py does);
                   on a GPU also a sweep of BLOCK / ITERS / NUM_WARPS for the Triton kernels;
  sam_vs_adamw     one SAM step / one AdamW step (time and peak memory) on a randomly initialised
                   TinyLlama-1.1B-shaped Llama, fp32 master weights, FSDP2 with finetune.py's policy
                   (MixedPrecisionPolicy: bf16 compute, fp32 gradient reduction) on one GPU;
  sam_variants     bench/bench_variants.py's measure(): every SAM variant's step time and peak memory
                   over AdamW's, interleaved rounds, on an unsharded TinyLlama-1.1B-shaped Llama with
                   fp32 master weights and bf16 autocast (finetune.py's one-GPU setting);
  finetune_resume  finetune.py --sam under `torchrun --nproc_per_node 1` for a few steps on a model
                   and tokenizer built here, stopped with a checkpoint, then --resume to the end;
  evaluate_speed   evaluate.score_items (packed) against one forward row per request (lm-eval's
                   strategy, written here) on the same items and model: answers identical, items/s.
Targets (recorded, met or not; --strict-targets turns a miss into a failure): Triton perturb+restore
>= 85% of copy bandwidth and faster than _foreach; SAM step <= 2.05x AdamW at 1B; variants: msam <=
1.15x, looksam k=5 <= 1.35x, interval 5 <= 1.3x, sam and samon <= 2.05x; evaluate >= 2x.
Writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md after every check (a cut-off run keeps what it
finished), prints one line per check, and exits 1 if any check failed. docs/gpu.md: how to run it.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import common  # noqa: E402

CHECKS = ("environment", "kernel_tests", "kernel_bandwidth", "sam_vs_adamw", "sam_variants",
          "finetune_resume", "evaluate_speed")
IMPORTS = ("common", "data", "finetune", "evaluate", "sam", "kernels")
TARGETS = {"triton_copy_share": 0.85, "sam_over_adamw": 2.05, "eval_speedup": 2.0}
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
SWEEP = [(1024, 8, 4), (1024, 8, 8), (2048, 4, 8), (4096, 4, 8), (512, 16, 4)]   # BLOCK, ITERS, warps


# ----------------------------------------------------------------------------- small helpers

def log(msg: str):
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version(name: str):
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:   # not installed (or no metadata): recorded as such
        return None


def fsdp2():
    """fully_shard and MixedPrecisionPolicy: public since torch 2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def llama_shapes(vocab, hidden, inter, layers, kv_dim):
    """Parameter shapes of an untied Llama (Llama-3-8B: 128256, 4096, 14336, 32, 1024)."""
    layer = [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden), (inter, hidden),
             (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * layers + [(hidden,), (vocab, hidden)]


@contextlib.contextmanager
def process_group(device):
    """A one-rank process group (NCCL on a GPU, gloo on CPU) for FSDP2 in this process."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- assets built here

WORDS = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "tu", "vo", "ze", "bi", "do")
         for b in ("n", "r", "s", "l", "m", "", "k", "t")]


def arithmetic_records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append({"instruction": f"Add {a} and {b}.", "input": "",
                    "output": f"{a} plus {b} is {a + b}. The answer is: {a + b}"})
    return out


def passage(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def build_assets(folder: Path, model_shape: dict, seed: int = 0) -> tuple:
    """A byte-level BPE tokenizer (the `tokenizers` library) trained on the data written here, a
    random Llama saved with it as a Hugging Face folder, and a .jsonl of instruction records."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    folder.mkdir(parents=True, exist_ok=True)
    records = arithmetic_records(96, seed)
    data_file = folder / "add.jsonl"
    common.write_text(data_file, "".join(json.dumps(r) + "\n" for r in records))
    rng = random.Random(seed)
    import data
    prompts = [getattr(data, k) for k in dir(data) if k.endswith("PROMPT") and isinstance(getattr(data, k), str)]
    corpus = [json.dumps(r) for r in records] + [passage(rng, 60) for _ in range(200)] + prompts * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=768, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(hf_tok), tie_word_embeddings=False,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id, **model_shape)
    torch.manual_seed(seed)
    model_dir = folder / "model"
    common.save_model(LlamaForCausalLM(config), hf_tok, model_dir)
    return model_dir, data_file


# ----------------------------------------------------------------------------- checks

def check_environment(ctx) -> dict:
    dev = ctx["device"]
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(dev),
            **{name: version(name) for name in ("triton", "transformers", "tokenizers", "accelerate",
                                                "peft", "datasets", "gguf", "pytest", "matplotlib")}}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    gpus_visible=torch.cuda.device_count())
    # importing the stages must not need datasets or gguf (the GPU image has neither)
    code = ("import importlib, json, sys, traceback\n"
            "sys.modules['datasets'] = None; sys.modules['gguf'] = None\n"
            "bad = {}\n"
            f"for m in {ctx.get('import_modules', IMPORTS)!r}:\n"
            "    try: importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        frames = [f for f in traceback.extract_tb(e.__traceback__)\n"
            f"                  if f.filename.startswith({str(ROOT)!r})]\n"
            "        where = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]\n"
            "        bad[m] = f'{where.filename}:{where.lineno}: {where.line} -> {e!r}'\n"
            "print(json.dumps(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ctx["env"], capture_output=True,
                          text=True, timeout=300)
    try:
        bad = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        bad = {"(subprocess)": proc.stderr[-1500:]}
    info["imports_without_datasets_gguf"] = "ok" if not bad else bad
    ok = not bad
    summary = f"torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}"
    if dev.type == "cuda":
        summary += f", {info['gpu']}"
    if bad:
        summary += f"; import failed: {bad}"
    return {"ok": ok, "summary": summary, "details": info}


def check_kernel_tests(ctx) -> dict:
    """tests/test_kernels.py in a pytest subprocess; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET
    if version("pytest") is None:
        return {"ok": False, "summary": "pytest is not installed (pip install pytest)", "details": {}}
    xml = ctx["out"] / "kernel_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
           f"--junitxml={xml}"]
    env = dict(ctx["env"])
    env.pop("FLATTUNE_KERNELS", None)
    if ctx["smoke"]:     # the interpreter (chosen as the kernels are imported): a few cases, seconds
        cmd += ["-k", "non_contiguous or unaligned or path_selection or launchers or (perturb and mix)"]
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    names = []
    if xml.exists():
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
        names = [c.get("name") for c in suite.iter("testcase")]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    compiled = any("1823x781" in n for n in names)       # the CUDA-only sizes ran
    ok = proc.returncode == 0 and passed > 0 and (ctx["smoke"] or compiled)
    summary = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
               f"{counts['skipped']} skipped" + ("" if ctx["smoke"] else
                                                 f"; CUDA cases {'ran' if compiled else 'did NOT run'}"))
    tail = proc.stdout[-3000:] if proc.returncode else proc.stdout[-300:]
    return {"ok": ok, "summary": summary, "details": {**counts, "passed": passed, "command": " ".join(cmd),
                                                      "output_tail": tail + proc.stderr[-1000:]}}


def _primitive_rows(shapes, dtype, device, repeats, sweep):
    import bench_sam
    import kernels
    from kernels import sam_perturb
    gen = torch.Generator(device=device).manual_seed(0)
    ws = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    bs = [torch.empty_like(w) for w in ws]
    n, size = sum(w.numel() for w in ws), ws[0].element_size()

    def copy_loop():
        for b, w in zip(bs, ws):
            b.copy_(w)
    t_copy = min(timed(copy_loop, device, repeats), timed(lambda: torch._foreach_copy_(bs, ws), device, repeats))
    copy_bw = 2 * size * n / t_copy
    need = bench_sam.PRIMITIVE_BYTES * size * n         # bytes perturb + restore must move
    rows = {"params": n, "dtype": str(dtype).replace("torch.", ""), "copy_ms": t_copy * 1e3,
            "copy_GBps": copy_bw / 1e9, "approaches": {}}
    approaches = {"torch._foreach reference": bench_sam.flattune("torch"),
                  "per-parameter loop": bench_sam.loop_with_clones}
    if device.type == "cuda" and kernels.HAVE_TRITON:
        approaches = {"Triton": bench_sam.flattune("triton"), **approaches}
    for name, fn in approaches.items():
        t = timed(lambda: fn(ws, gs, bs, 2.0), device, repeats)
        rows["approaches"][name] = {"ms": t * 1e3, "GBps": need / t / 1e9, "copy_share": need / t / copy_bw}
    if sweep and "Triton" in approaches:
        saved = (sam_perturb.BLOCK, sam_perturb.ITERS, sam_perturb.NUM_WARPS)
        rows["sweep"] = []
        try:
            for block, iters, warps in SWEEP:
                sam_perturb.BLOCK, sam_perturb.ITERS, sam_perturb.NUM_WARPS = block, iters, warps
                t = timed(lambda: approaches["Triton"](ws, gs, bs, 2.0), device, repeats)
                rows["sweep"].append({"BLOCK": block, "ITERS": iters, "NUM_WARPS": warps,
                                      "ms": t * 1e3, "copy_share": need / t / copy_bw})
        finally:
            sam_perturb.BLOCK, sam_perturb.ITERS, sam_perturb.NUM_WARPS = saved
    # the primitive must leave the weights exactly as they were
    w_before = [w.clone() for w in ws[:3]]
    approaches[next(iter(approaches))](ws, gs, bs, 2.0)
    rows["restore_exact"] = all(torch.equal(a, b) for a, b in zip(w_before, ws[:3]))
    del ws, gs, bs, w_before
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def check_kernel_bandwidth(ctx) -> dict:
    import bench_sam
    dev, smoke = ctx["device"], ctx["smoke"]
    layers = 32
    if dev.type == "cuda":     # w, g, the copies and the loop's clones: ~4 lists; fewer layers if short
        free = torch.cuda.mem_get_info(dev)[0]
        while layers > 1 and 4.3 * 2 * sum(math.prod(s) for s in
                                         llama_shapes(128256, 4096, 14336, layers, 1024)) > free:
            layers //= 2
    big = f"Llama-3-8B parameters{'' if layers == 32 else f' ({layers} of 32 layers: GPU memory)'}, bf16"
    workloads = {
        "Llama-2-7B layer, fp32": (bench_sam.QUICK_LAYER if smoke else bench_sam.LLAMA7B_LAYER,
                                   torch.float32),
        big: (llama_shapes(2048, 128, 352, 2, 32) if smoke
              else llama_shapes(128256, 4096, 14336, layers, 1024), torch.bfloat16)}
    details, ok, misses = {}, True, []
    for name, (shapes, dtype) in workloads.items():
        rows = _primitive_rows(shapes, dtype, dev, 2 if smoke else (10 if "layer" in name else 5),
                               sweep=not smoke)
        details[name] = rows
        ok &= rows["restore_exact"]
        a = rows["approaches"]
        if "Triton" in a:
            met = a["Triton"]["copy_share"] >= TARGETS["triton_copy_share"] and \
                a["Triton"]["ms"] < a["torch._foreach reference"]["ms"]
            rows["target_met"] = met
            if not met:
                misses.append(name)
        log(f"  {name}: {rows['params'] / 1e6:.1f}M params, copy {rows['copy_GBps']:.1f} GB/s; " + ", ".join(
            f"{k} {v['ms']:.2f} ms ({v['copy_share']:.0%})" for k, v in a.items()))
    first = details["Llama-2-7B layer, fp32"]["approaches"]
    key = "Triton" if "Triton" in first else "torch._foreach reference"
    summary = "; ".join(f"{n.split(',')[0]}: {key} {d['approaches'][key]['copy_share']:.0%} of copy"
                        for n, d in details.items())
    target = None if key != "Triton" else not misses
    return {"ok": ok, "summary": summary, "target_met": target, "details": details,
            "target": f"Triton >= {TARGETS['triton_copy_share']:.0%} of copy and faster than _foreach"}


def _step_fn(kind, model, opt, ids):
    def loss_backward():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    def step():
        loss = loss_backward()
        if kind == "SAM":
            opt.first_step(zero_grad=True)
            loss_backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.second_step(zero_grad=True)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss
    return step


def check_sam_vs_adamw(ctx) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM
    from sam import SAM
    dev, smoke = ctx["device"], ctx["smoke"]
    fully_shard, MixedPrecisionPolicy = fsdp2()
    shape = dict(TINY, vocab_size=512) if smoke else TINYLLAMA
    batch, seq, repeats = (2, 64, 1) if smoke else (8, 1024, 5)
    with process_group(dev):
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape))
        n_params = sum(p.numel() for p in model.parameters())
        # finetune.setup_model's policy: bf16 compute and fp32 reduction on a GPU (plain on CPU)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if dev.type == "cuda" else MixedPrecisionPolicy()
        mesh = init_device_mesh(dev.type, (1,))
        for layer in common.decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.train()
        params = list(model.parameters())
        ids = torch.randint(0, shape["vocab_size"], (batch, seq), device=dev,
                            generator=torch.Generator(device=dev).manual_seed(0))
        losses = []
        for fused in (True, False):     # finetune.py's fused AdamW; an older stack may lack it here
            kw = dict(lr=1e-7, weight_decay=0.0, fused=fused)
            opts = {"AdamW": torch.optim.AdamW(params, **kw),
                    "SAM": SAM(params, torch.optim.AdamW, rho=2.0, **kw)}
            steps = {k: _step_fn(k, model, o, ids) for k, o in opts.items()}
            try:
                for step in steps.values():  # warm-up: optimizer state, backups, kernels compiled
                    losses.append(float(step()))
                break
            except RuntimeError as e:
                if not fused:
                    raise
                log(f"  fused AdamW failed here ({str(e)[:120]}); using the foreach AdamW")
                model.zero_grad(set_to_none=True)
        times, peaks = {k: [] for k in steps}, {k: 0 for k in steps}
        for _ in range(repeats):             # alternate, so both see the same machine state
            for k, step in steps.items():
                sync(dev)
                if dev.type == "cuda":
                    base = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                losses.append(float(step()))
                sync(dev)
                times[k].append(time.perf_counter() - t0)
                if dev.type == "cuda":
                    peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated(dev) - base)
        pnorm = float(opts["SAM"].last_perturbation_norm)
        del model, opts, steps, params
    t = {k: statistics.median(v) for k, v in times.items()}
    ratio = t["SAM"] / t["AdamW"]
    param_bytes = 4 * n_params
    details = {"model": f"TinyLlama-1.1B shapes{' (tiny in --smoke)' if smoke else ''}", "params": n_params,
               "micro_batch": [batch, seq], "compute": "bf16 (FSDP2 policy)" if dev.type == "cuda" else "fp32",
               "fused_adamw": kw["fused"], "ms": {k: v * 1e3 for k, v in t.items()}, "ratio": ratio,
               "tokens_per_s": {k: batch * seq / v for k, v in t.items()},
               "perturbation_norm": pnorm, "losses_finite": all(map(math.isfinite, losses))}
    if dev.type == "cuda":
        details["peak_step_GiB"] = {k: v / 2 ** 30 for k, v in peaks.items()}
        details["extra_peak_over_param_bytes"] = (peaks["SAM"] - peaks["AdamW"]) / param_bytes
    ok = details["losses_finite"] and abs(pnorm - 2.0) < 1e-3 * 2.0
    summary = f"SAM {t['SAM'] * 1e3:.0f} ms / AdamW {t['AdamW'] * 1e3:.0f} ms = {ratio:.2f}x"
    if dev.type == "cuda":
        summary += f"; peak +{details['extra_peak_over_param_bytes']:.2f}x param bytes"
    return {"ok": ok, "summary": summary, "target_met": ratio <= TARGETS["sam_over_adamw"],
            "target": f"<= {TARGETS['sam_over_adamw']}x", "details": details}


def check_sam_variants(ctx) -> dict:
    import bench_variants
    from transformers import LlamaConfig, LlamaForCausalLM
    dev, smoke = ctx["device"], ctx["smoke"]
    shape = dict(TINY, vocab_size=512) if smoke else TINYLLAMA
    micro, seq = (2, 32) if smoke else (4, 1024)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape)).train()
    gen = torch.Generator().manual_seed(0)
    step_batches = []
    for _ in range(3):                  # micro-batch x accumulation 2, every token a target
        ids = [torch.randint(0, shape["vocab_size"], (micro, seq), generator=gen) for _ in range(2)]
        step_batches.append(([{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids],
                             2 * micro * (seq - 1)))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    results = bench_variants.measure(model, step_batches, autocast, dev, rounds=1 if smoke else 2,
                                     steps=5, log=lambda m: log("  " + m))
    del model
    misses = [n for n, r in results.items() if r["target"] is not None and r["ratio"] > r["target"]]
    summary = ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in results.items() if n != "adamw")
    return {"ok": all(math.isfinite(r["step_s"]) for r in results.values()), "summary": summary,
            "target_met": not misses, "target": "msam <= 1.15x, looksam_k5 <= 1.35x, interval5 <= 1.3x, "
            "sam/samon <= 2.05x", "details": {"model": "TinyLlama-1.1B shapes" + (" (tiny in --smoke)" if smoke else ""),
                                              "micro_batch": [micro, seq], "accumulation": 2, "results": results,
                                              "table": bench_variants.table(results)}}


def _metrics(out: Path) -> list:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def check_finetune_resume(ctx) -> dict:
    smoke, out = ctx["smoke"], ctx["out"] / "finetune"
    model_dir, data_file = ctx["assets"]
    run_dir = out / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "finetune.py",
            "--model", str(model_dir), "--data", str(data_file), "--out", str(run_dir), "--sam",
            "--rho", "0.05", "--max-steps", "6", "--batch-size", "8", "--micro-batch-size", "4",
            "--max-len", "256", "--heldout", "8", "--save-every", "100", "--precision", "auto"]
    runs, details = [], {"command": "torchrun " + " ".join(base[3:])}
    for extra in (["--stop-after", "3"], ["--resume"]):
        cmd = base + extra
        cmd[cmd.index("--master_port") + 1] = str(free_port())
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=ctx["env"], capture_output=True, text=True, timeout=900)
        runs.append({"args": " ".join(extra), "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
                     "log_tail": (proc.stdout + proc.stderr)[-2500:]})
        if proc.returncode:
            break
        if extra[0] == "--stop-after":
            first = _metrics(run_dir)
            runs[-1].update(steps=[r.get("step") for r in first],
                            checkpoint=(run_dir / "checkpoint").is_dir(),
                            final_json=(run_dir / "final.json").exists())
    details["runs"] = runs
    rows = _metrics(run_dir)
    losses = [r.get("loss") for r in rows]
    details.update(steps=[r.get("step") for r in rows], losses=losses,
                   resumed_logged="resumed" in runs[-1]["log_tail"],
                   final_json=(run_dir / "final.json").exists(),
                   model_saved=(run_dir / "config.json").exists())
    ok = (len(runs) == 2 and all(r["rc"] == 0 for r in runs) and runs[0].get("steps") == [1, 2, 3]
          and runs[0].get("checkpoint") and not runs[0].get("final_json")
          and details["steps"] == [1, 2, 3, 4, 5, 6]
          and all(isinstance(x, float) and math.isfinite(x) for x in losses)
          and details["resumed_logged"] and details["final_json"] and details["model_saved"])
    if ok:
        summary = (f"3 steps, checkpoint, --resume to 6; loss {losses[0]:.3f} -> {losses[-1]:.3f}, finite; "
                   f"{runs[0]['seconds']:.0f}s + {runs[1]['seconds']:.0f}s")
    else:
        summary = f"failed: runs {[(r['args'], r['rc']) for r in runs]}, steps {details['steps']}"
        missing = [m for m in ("matplotlib", "peft") if f"No module named '{m}'" in runs[-1]["log_tail"]]
        if missing:
            summary += f"; finetune.py needs {', '.join(missing)} on this machine"
    return {"ok": ok, "summary": summary, "details": details}


def synthetic_items(n: int, seed: int = 0) -> list:
    """Multiple-choice items in evaluate.py's format: a passage, 4 continuations of 1-6 words."""
    import hashlib
    rng, items = random.Random(seed), []
    for i in range(n):
        context = f"Passage: {passage(rng, rng.randint(30, 120))}\nQuestion: what comes next?\nAnswer:"
        choices = [" " + passage(rng, rng.randint(1, 6)) for _ in range(4)]
        items.append({"task": "synthetic", "id": i, "subject": "", "context": context, "choices": choices,
                      "label": rng.randrange(4), "lengths": [len(c) for c in choices],
                      "key": hashlib.sha1((context + "|".join(choices)).encode()).hexdigest()[:16]})
    return items


@torch.inference_mode()
def score_per_request(model, tok, items, batch_size: int, max_len: int) -> list:
    """lm-eval's strategy: one row per (context, choice) request, right-padded, longest first; the
    continuation's log-likelihood read off the row's logits. Returns lls per item."""
    device = next(model.parameters()).device
    reqs = []
    for i, it in enumerate(items):
        ctx_ids = tok(it["context"])["input_ids"]
        for j, choice in enumerate(it["choices"]):
            cont = tok(it["context"] + choice)["input_ids"][len(ctx_ids):]
            reqs.append((i, j, (ctx_ids + cont)[-(max_len + 1):][:-1], cont))
    reqs.sort(key=lambda r: -len(r[2]))
    lls = [[0.0] * len(it["choices"]) for it in items]
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start:start + batch_size]
        width = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, toks = [], [], []
        for b, (_, _, row, cont) in enumerate(chunk):
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
            rows += [b] * len(cont)
            cols += range(len(row) - len(cont), len(row))
            toks += cont
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        lp = torch.log_softmax(logits.float(), -1)[rows, cols, toks].double().cpu().tolist()
        k = 0
        for i, j, _, cont in chunk:
            lls[i][j] = sum(lp[k:k + len(cont)])
            k += len(cont)
    return lls


def check_evaluate_speed(ctx) -> dict:
    import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    dev, smoke = ctx["device"], ctx["smoke"]
    model_dir, _ = ctx["assets"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    if smoke:
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev).eval()
    else:      # SmolLM2-135M's shapes, random weights, fp32 (answers are claimed equal in fp32)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, **SMOLLM2))
        model = model.to(dev).eval()
    if dev.type == "cuda":      # full fp32 matrix products, so both sides' answers can be equal
        torch.backends.cuda.matmul.allow_tf32 = False
    items = synthetic_items(24 if smoke else 512)
    batch, max_len = (8, 512) if smoke else (32, 2048)
    evaluate.score_items(model, tok, items[:batch], batch, "loglik", max_len, 0, 1)     # warm-up
    score_per_request(model, tok, items[:batch], batch, max_len)
    sync(dev)
    t0 = time.perf_counter()
    ours = evaluate.score_items(model, tok, items, batch, "loglik", max_len, 0, 1)
    sync(dev)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = score_per_request(model, tok, items, batch, max_len)
    sync(dev)
    t_ref = time.perf_counter() - t0
    ours_by_id = {r["id"]: r["lls"] for r in ours}
    tie = lambda ll: len(ll) > 1 and sorted(ll)[-1] - sorted(ll)[-2] < 1e-4     # noqa: E731
    disagree, ties, max_diff = 0, 0, 0.0
    for it, ll_ref in zip(items, ref):
        ll = ours_by_id[it["id"]]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(ll, ll_ref)))
        norm = [x / n for x, n in zip(ll, it["lengths"])]
        norm_ref = [x / n for x, n in zip(ll_ref, it["lengths"])]
        if tie(ll) or tie(ll_ref) or tie(norm) or tie(norm_ref):
            ties += 1
            continue
        argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)   # noqa: E731
        disagree += argmax(ll) != argmax(ll_ref) or argmax(norm) != argmax(norm_ref)
    speedup = t_ref / t_ours
    details = {"items": len(items), "batch_size": batch, "dtype": "fp32",
               "model": "tiny (built here)" if smoke else "SmolLM2-135M shapes, random weights",
               "items_per_s": {"packed (evaluate.py)": len(items) / t_ours,
                               "one row per request": len(items) / t_ref},
               "speedup": speedup, "disagreements": disagree, "ties": ties, "max_abs_ll_diff": max_diff}
    del model
    ok = disagree == 0 and max_diff < 1e-3
    summary = (f"{len(items) / t_ours:.0f} vs {len(items) / t_ref:.0f} items/s = {speedup:.2f}x; "
               f"{disagree} answers differ ({ties} ties), max ll difference {max_diff:.1e}")
    return {"ok": ok, "summary": summary, "target_met": speedup >= TARGETS["eval_speedup"],
            "target": f">= {TARGETS['eval_speedup']}x", "details": details}


# ----------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    env = report["checks"].get("environment", {}).get("details", {})
    lines = [f"# GPU check, {report['date']}", "",
             f"{report['mode']} on {env.get('gpu', report['device'])}; torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, triton {env.get('triton')}, transformers {env.get('transformers')}. "
             f"Command: `{report['command']}`", "",
             "| check | status | s | result | target | met |", "|---|---|---:|---|---|---|"]
    for name, c in report["checks"].items():
        met = {True: "yes", False: "NO", None: ""}[c.get("target_met")]
        lines.append(f"| {name} | {c['status']} | {c['seconds']:.0f} | {c['summary'].replace('|', '/')} | "
                     f"{c.get('target', '')} | {met} |")
    bw = report["checks"].get("kernel_bandwidth", {}).get("details", {})
    if isinstance(bw, dict) and bw:
        lines += ["", "## perturb + restore bandwidth", "",
                  "| workload | approach | ms | GB/s | share of copy |", "|---|---|---:|---:|---:|"]
        for wl, d in bw.items():
            if not isinstance(d, dict) or "approaches" not in d:
                continue
            lines.append(f"| {wl} ({d['params'] / 1e6:.0f}M) | device copy | {d['copy_ms']:.2f} | "
                         f"{d['copy_GBps']:.0f} | 100% |")
            for a, v in d["approaches"].items():
                lines.append(f"| | {a} | {v['ms']:.2f} | {v['GBps']:.0f} | {v['copy_share']:.0%} |")
        for wl, d in bw.items():
            if isinstance(d, dict) and d.get("sweep"):
                lines += ["", f"Triton sweep, {wl}: " + "; ".join(
                    f"BLOCK {s['BLOCK']} ITERS {s['ITERS']} warps {s['NUM_WARPS']}: {s['copy_share']:.0%}"
                    for s in d["sweep"])]
    failed = [n for n, c in report["checks"].items() if c["status"] != "pass"]
    lines += ["", f"Result: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; "
              f"targets met {report['targets_met']}.", ""]
    return "\n".join(lines)


def save(report: dict, out: Path):
    common.write_json(out / "gpu_check.json", report)
    common.write_text(out / "gpu_check.md", markdown(report))


def main(out: str, smoke: bool = False, only: str = "", strict_targets: bool = False) -> int:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    else:
        common.die("no GPU is visible; run on a CUDA machine, or use --smoke for the CPU smoke test.")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FLATTUNE_CACHE=str(out / "cache"))
    if smoke:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    wanted = [c for c in CHECKS if not only or c in only.split(",")]
    unknown = set(only.split(",")) - set(CHECKS) if only else set()
    if unknown:
        common.die(f"--only {only}: unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECKS)}.")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "mode": "smoke (CPU, tiny shapes)" if smoke else "full", "device": str(device),
              "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]), "targets": TARGETS,
              "checks": {}, "targets_met": ""}
    ctx = {"device": device, "smoke": smoke, "out": out, "env": env}
    t_all = time.time()
    log(f"{report['mode']} on {device}; checks: {', '.join(wanted)}")
    for name in wanted:
        t0 = time.time()
        try:
            if name in ("finetune_resume", "evaluate_speed") and "assets" not in ctx:
                ctx["assets"] = build_assets(out / "assets", TINY if smoke else dict(TINY, hidden_size=128))
            result = globals()[f"check_{name}"](ctx)
            status = "pass" if result["ok"] else "fail"
        except Exception as e:     # recorded, and the next check still runs
            result = {"summary": f"{e.__class__.__name__}: {str(e)[:300]}",
                      "details": {"traceback": traceback.format_exc()[-4000:]}}
            status = "error"
        result.pop("ok", None)
        result.update(status=status, seconds=time.time() - t0)
        if smoke:                  # tiny shapes on a shared CPU: the figures say nothing about targets
            result["target_met"] = None
        if status == "pass" and strict_targets and result.get("target_met") is False:
            result["status"] = status = "fail"
        report["checks"][name] = result
        judged = [c["target_met"] for c in report["checks"].values() if c.get("target_met") is not None]
        report["targets_met"] = f"{sum(judged)}/{len(judged)}"
        report["seconds"] = time.time() - t_all
        save(report, out)
        log(f"{name}: {status.upper()} ({result['seconds']:.0f}s) {result['summary']}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [n for n, c in report["checks"].items() if c["status"] != "pass"]
    log(f"done in {time.time() - t_all:.0f}s: {len(wanted) - len(failed)}/{len(wanted)} checks passed, "
        f"targets met {report['targets_met']}; {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.md and the runs")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, under a minute")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    parser.add_argument("--strict-targets", action="store_true", help="a missed target fails the run")
    a = parser.parse_args()
    sys.exit(main(a.out, a.smoke, a.only, a.strict_targets))
