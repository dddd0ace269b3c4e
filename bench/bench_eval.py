"""evaluate.py against lm-evaluation-harness (HFLM): items per second on the same items, model, batch size
and dtype, the per-item answers of both, and the prompts against lm-eval's own task definitions.

lm-eval is for this benchmark only (not in requirements.txt). It is pure Python and keeps this torch:
  pip install lm_eval==0.4.13 accelerate          # accelerate: HFLM imports it

Launch (the lead's measurement; ~15-25 min on a quiet 2-core CPU):
  python bench/bench_eval.py                       # smollm2-135m, 60 items x 9 tasks, batch 8, fp32 and bf16
  python bench/bench_eval.py --quick               # smoke test: tiny model, 3 items per task, fp32
  python bench/bench_eval.py --per-task 20 --dtypes fp32 --out runs/bench/eval.json

What is compared, per dtype: the same (context, continuation) requests go through lm-eval's
HFLM.loglikelihood (one row per choice, right-padded, its one-token-continuation cache on) and through
evaluate.score_items (one packed row per item); both sides get a warm-up batch first and run in this
process one after the other. acc/acc_norm predictions are compared item by item; an item whose top two
choices are within 1e-4 nats on either side counts as a tie, not a disagreement. Equality is claimed
in fp32 only (bf16 rounding moves ~2% of answers between any two correct implementations).
FLOP count: each side's matrix-product FLOPs on the same items (flop_model), whose ratio is about the
speed-up that exact scoring can reach where both sides are compute-bound, as on a CPU.
Prompt check: lm-eval's task yaml (doc_to_text / doc_to_choice / doc_to_target, description,
target delimiter, process_docs) is rendered on the same raw documents and compared string for string.
"""
import argparse
import ast
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
import evaluate as E  # noqa: E402
import tasks  # noqa: E402

TASKS = ["mmlu", "arc_challenge", "boolq", "copa", "hellaswag", "openbookqa", "piqa", "rte", "siqa"]
YAML = {"arc_challenge": "arc/arc_challenge.yaml", "boolq": "super_glue/boolq/default.yaml",
        "copa": "super_glue/copa/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml", "rte": "glue/rte/default.yaml",
        "siqa": "siqa/siqa.yaml", **{g: "mmlu/default/mmlu_{s}.yaml" for g in tasks.MMLU}}
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16")}


def load_items(per_task, seed):
    """`per_task` items of each task (MMLU: spread over its four groups), with evaluate.py's prompts."""
    items = []
    for t in TASKS:
        for name in (list(tasks.MMLU) if t == "mmlu" else [t]):
            items += tasks.load_task(name, limit=max(1, per_task // 4) if t == "mmlu" else per_task, seed=seed)
    return items


def run_ours(model_name, dtype, items, batch_size):
    model, tok = common.load_model(model_name, dtype=DTYPES[dtype][0]), common.load_tokenizer(model_name)
    E.score_items(model, tok, items[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    res = E.score_items(model, tok, items, batch_size)
    return {(r["task"], r["id"]): r["lls"] for r in res}, time.perf_counter() - t0


def run_lm_eval(model_name, dtype, items, batch_size):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=common.resolve_model(model_name), batch_size=batch_size, dtype=DTYPES[dtype][1],
              device="cpu")
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(it["context"], c), idx=j)
            for it in items for j, c in enumerate(it["choices"])]
    lm.loglikelihood(reqs[:batch_size], disable_tqdm=True)  # warm-up
    t0 = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    seconds, lls, k = time.perf_counter() - t0, {}, 0
    for it in items:
        lls[(it["task"], it["id"])] = [ll for ll, _ in out[k:k + len(it["choices"])]]
        k += len(it["choices"])
    return lls, seconds


def flop_model(model_name, items):
    """Matrix-product FLOPs of each side's computation on `items`, per task: the transformer body's linear
    layers (2 x their weights per token fed) plus the vocabulary projection (2 x hidden x vocab per position
    projected). lm-eval: one row per distinct (context + continuation but its last token), as its
    one-token-continuation cache groups them, projected at every position; evaluate.py: its packed rows,
    projected only where a continuation token is predicted. Padding and attention are left out on both
    sides (both cost lm-eval more), so the measured speed-up of two compute-bound runs lands near this ratio,
    above it only by those left-out costs."""
    model, tok = common.load_model(model_name), common.load_tokenizer(model_name)
    head = model.get_output_embeddings().weight
    body = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    max_len = model.config.max_position_embeddings
    per = {}
    for it, rows in zip(items, E.encode_rows(items, tok, max_len)):
        lm_tokens = sum(map(len, {tuple(ctx + c[:-1]) for ctx, conts, _ in rows for c in conts}))
        f = per.setdefault(it["task"], [0.0, 0.0])
        f[0] += 2 * (body + head.numel()) * lm_tokens
        for ctx, conts, _ in rows:
            ids, _, _, targets = E.pack_rows([(ctx, conts)], False)
            projected = {p for pairs in targets[0][0] for p, _ in pairs}
            f[1] += 2 * (body * ids.shape[1] + head.numel() * len(projected))
    return per


def _preds(lls, lengths):
    gap = lambda xs: sorted(xs)[-1] - sorted(xs)[-2] if len(xs) > 1 else 1.0  # noqa: E731
    norm = [x / n for x, n in zip(lls, lengths)]
    return (max(range(len(lls)), key=lls.__getitem__), max(range(len(lls)), key=norm.__getitem__),
            gap(lls) < 1e-4, gap(norm) < 1e-4 / max(lengths))


def agreement(ours, theirs, items):
    """Per task: items, acc and acc_norm answers that agree, ties, and the largest |Δ log-likelihood|."""
    rows = {}
    for it in items:
        a, b = ours[(it["task"], it["id"])], theirs[(it["task"], it["id"])]
        pa, pb = _preds(a, it["lengths"]), _preds(b, it["lengths"])
        r = rows.setdefault(it["task"], {"n": 0, "acc_same": 0, "norm_same": 0, "ties": 0, "max_dll": 0.0})
        r["n"] += 1
        tie_acc, tie_norm = pa[2] or pb[2], pa[3] or pb[3]
        r["ties"] += tie_acc or tie_norm
        r["acc_same"] += pa[0] == pb[0] or tie_acc
        r["norm_same"] += pa[1] == pb[1] or tie_norm
        r["max_dll"] = max(r["max_dll"], max(abs(x - y) for x, y in zip(a, b)))
    return rows


def _render(spec, doc):
    from lm_eval.utils import apply_template
    if callable(spec):
        return spec(doc)
    if isinstance(spec, (list, int)):
        return spec
    if spec in doc:
        return doc[spec]
    out = apply_template(spec, doc)
    return ast.literal_eval(out) if out.lstrip().startswith("[") else out


def check_prompts(items, per_task, seed):
    """Render lm-eval's own yaml on the raw documents behind `items`: {task: [checked, mismatched]}."""
    import datasets
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval 0.4.13's loader (private API)
    root, ours, report = Path(lm_eval.__file__).parent / "tasks", {}, {}
    for it in items:
        ours.setdefault(it["task"], []).append(it)
    for task, its in ours.items():
        subjects = tasks.MMLU.get(task, [None])
        docs = [tasks.read_source(tasks.TASKS[task][2], s)[0] for s in subjects]
        picked = tasks.pick_subset([len(d) for d in docs], len(its), seed)
        report[task] = [0, 0]
        for it, (si, i) in zip(its, picked):
            cfg = load_yaml(root / YAML[task].format(s=subjects[si]))
            doc = dict(docs[si][i])
            if task == "boolq":  # google/boolq ships `answer`; super_glue's `label` is the same bit
                doc["label"] = int(doc["answer"])
            if "process_docs" in cfg:
                doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]
            choices = _render(cfg["doc_to_choice"], doc)
            target = _render(cfg["doc_to_target"], doc)
            label = choices.index(target) if isinstance(target, str) and not target.strip().isdigit() else int(target)
            delim = cfg.get("target_delimiter", " ")
            context = cfg.get("description", "") + _render(cfg["doc_to_text"], doc)
            same = (context, [delim + c for c in choices], label) == (it["context"], it["choices"], it["label"])
            report[task][0] += 1
            report[task][1] += not same
            if not same and report[task][1] == 1:
                print(f"prompt mismatch {task} {it['id']}:\n  lm-eval {context[-120:]!r} {choices} {label}\n"
                      f"  ours    {it['context'][-120:]!r} {it['choices']} {it['label']}")
    return report


def main(model: str = "smollm2-135m", per_task: int = 60, batch_size: int = 8, dtypes: list[str] = ("fp32", "bf16"),
         seed: int = 1234, quick: bool = False, out: str = "runs/bench/eval.json") -> dict:
    if quick:
        model, per_task, dtypes = "tiny", 3, ["fp32"]
    items = load_items(per_task, seed)
    print(f"{len(items)} items, {sum(len(it['choices']) for it in items)} requests, model {model}, "
          f"batch {batch_size}, {torch.get_num_threads()} threads")
    flops = flop_model(model, items)
    lm_f, us_f = (sum(f[k] for f in flops.values()) for k in (0, 1))
    print(f"matrix-product FLOPs (padding and attention left out): lm-eval {lm_f / 1e12:.2f} T, evaluate.py "
          f"{us_f / 1e12:.2f} T, ratio {lm_f / us_f:.2f}x: about the speed-up of exact scoring where both sides "
          f"are compute-bound")
    prompts = check_prompts(items, per_task, seed)
    print("prompts identical to lm-eval's task definitions: " +
          ", ".join(f"{t} {c - m}/{c}" for t, (c, m) in prompts.items()))
    result = {"model": model, "items": len(items), "batch_size": batch_size, "prompts": prompts, "runs": {},
              "flops": {"lm_eval": lm_f, "ours": us_f, "ratio": lm_f / us_f,
                        "per_task": {t: {"lm_eval": a, "ours": b, "ratio": a / b} for t, (a, b) in flops.items()}}}
    print("| dtype | lm-eval items/s | evaluate.py items/s | speed-up | acc answers same | acc_norm same | "
          "ties | max abs Δll |\n|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        theirs, t_lm = run_lm_eval(model, dtype, items, batch_size)
        ours, t_us = run_ours(model, dtype, items, batch_size)
        agree = agreement(ours, theirs, items)
        tot = {k: sum(r[k] for r in agree.values()) for k in ("n", "acc_same", "norm_same", "ties")}
        dll = max(r["max_dll"] for r in agree.values())
        result["runs"][dtype] = {"lm_eval_s": t_lm, "ours_s": t_us, "lm_eval_items_per_s": len(items) / t_lm,
                                 "ours_items_per_s": len(items) / t_us, "speedup": t_lm / t_us, "per_task": agree}
        print(f"| {dtype} | {len(items) / t_lm:.2f} | {len(items) / t_us:.2f} | {t_lm / t_us:.2f}x | "
              f"{tot['acc_same']}/{tot['n']} | {tot['norm_same']}/{tot['n']} | {tot['ties']} | {dll:.2e} |")
    print("FLOP ratio per task: " + ", ".join(f"{t} {a / b:.2f}x" for t, (a, b) in flops.items()))
    for dtype in dtypes:
        print(f"{dtype} per task (acc same / acc_norm same / n): " + ", ".join(
            f"{t} {r['acc_same']}/{r['norm_same']}/{r['n']}" for t, r in result["runs"][dtype]["per_task"].items()))
    common.write_json(Path(out), {"args": {"model": model, "per_task": per_task, "batch_size": batch_size,
                                           "dtypes": list(dtypes), "seed": seed, "quick": quick}, **result})
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF folder")
    p.add_argument("--per-task", type=int, default=60, help="items per task (MMLU: split over its 4 groups)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval: requests per batch; ours: items per batch")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny, 3 items per task, fp32")
    p.add_argument("--out", default="runs/bench/eval.json")
    a = p.parse_args()
    main(a.model, a.per_task, a.batch_size, a.dtypes, a.seed, a.quick, a.out)
