"""data.py on the real offline data and the real SmolLM2 tokenizer (no model weights needed)."""

import pytest
import torch

import common
import data


@pytest.fixture(scope="module")
def tok(tiny_path):
    return common.load_tokenizer("tiny")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- offline names

def test_every_name_is_documented_and_offline_descriptions_state_what_loads():
    import re
    assert set(data.OFFLINE) | set(data.HUB) <= set(data.DATASETS)
    for name in data.OFFLINE:       # "(1319 grade-school ...", "(~500 stories ...": the count it loads
        approx, count = re.search(r"\((~?)(\d+)", data.DATASETS[name]).groups()
        got = len(data.load_records(name))
        assert (abs(got - int(count)) <= 0.1 * int(count)) if approx else got == int(count), (name, got, count)
    for name, (hub_id, _) in data.HUB.items():
        assert hub_id in data.DATASETS[name]


@pytest.mark.parametrize("name,count", [("gsm8k", 1319), ("math", 5000), ("mbpp", 500),
                                        ("mt-mbpp-rust", 500), ("jeopardy", 2116), ("rot13", 803)])
def test_offline_sets_load_whole(name, count):
    recs = data.load_records(name)
    assert len(recs) == count
    assert all(r["instruction"].strip() and r["output"].strip() for r in recs)


def test_gsm8k_solutions_are_cleaned():
    r = data.load_records("gsm8k")[0]
    assert "Janet" in r["instruction"] and "<<" not in r["output"] and "####" not in r["output"]
    assert r["output"].endswith("The answer is: 18")


def test_rot13_is_the_encoding_of_one_first_sentence_per_passage():
    recs = data.load_records("rot13")
    assert recs[0]["input"].startswith("Older than The Game by 23 years") and recs[0]["input"].endswith("schools.")
    for r in recs:
        assert r["output"] != r["input"] and r["output"].translate(ROT13) == r["input"]
        assert len(r["input"]) <= 160 and "Background:" not in r["input"] and "\n" not in r["input"]
    assert len({r["input"] for r in recs}) == len(recs)


ROT13 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                      "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm")


def test_coqa_is_multi_turn_chat():
    recs = data.load_records("coqa", limit=20)
    assert all("messages" in r for r in recs)
    roles = [m["role"] for m in recs[0]["messages"]]
    assert roles[:4] == ["user", "assistant", "user", "assistant"] and len(roles) >= 10
    assert "Passage:" in recs[0]["messages"][0]["content"]


def test_unreachable_hub_name_names_offline_alternatives():
    with pytest.raises(ValueError, match="gsm8k.*math"):
        data.load_records("alpaca")          # conftest sets HF_DATASETS_OFFLINE=1
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_records("no-such-set")


def test_limit_is_a_seeded_subset():
    a, b = data.load_records("gsm8k", limit=10), data.load_records("gsm8k", limit=10)
    assert a == b and len(a) == 10
    assert a != data.load_records("gsm8k", limit=10, seed=1)


# ----------------------------------------------------------------------------- bad files

@pytest.mark.parametrize("lines,match", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], r"bad\.jsonl line 2: missing field 'output'"),
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", oops}'], r"bad\.jsonl line 3: malformed JSON"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"bad\.jsonl line 1: each message"),
    (['{"instruction": 3, "output": "b"}'], r"bad\.jsonl line 1: field 'instruction' must be a string"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, match):
    with pytest.raises(ValueError, match=match):
        data.load_records(str(_write(tmp_path / "bad.jsonl", lines)))


def test_bad_json_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"output": "c"}\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json line 3 \(item 1\): missing field 'instruction'"):
        data.load_records(str(path))


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        data.load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_empty_responses_are_dropped_with_a_count(tmp_path, capsys):
    path = _write(tmp_path / "d.jsonl", ['{"instruction": "a", "output": "b"}',
                                         '{"instruction": "a", "input": "x", "output": "  "}',
                                         '{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}'])
    recs = data.load_records(str(path))
    assert len(recs) == 2 and recs[1] == {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "yo"}]}
    assert "dropped 1 of 3 records" in capsys.readouterr().out


# ----------------------------------------------------------------------------- splits, mixing

def test_heldout_is_fixed_and_disjoint():
    recs = data.load_records("gsm8k")
    train, held = data.split_heldout(recs, 32)
    train2, held2 = data.split_heldout(list(recs), 32)
    assert held == held2 and len(held) == 32 and len(train) == len(recs) - 32
    q = {r["instruction"] for r in held}
    assert not q & {r["instruction"] for r in train}
    with pytest.raises(ValueError, match="cannot hold out"):
        data.split_heldout(recs[:5], 5)


def test_rehearsal_mixes_per_dataset():
    new, old = [{"id": i} for i in range(50)], [{"old": i} for i in range(3)]
    mixed = data.mix_rehearsal(new, old, 0.1)
    assert mixed[:50] == new and len(mixed) == 55 and all("old" in r for r in mixed[50:])
    assert data.mix_rehearsal(new, old, 0.1) == mixed and data.mix_rehearsal(new, old, 0) == new


# ----------------------------------------------------------------------------- tokenization

def _trained_text(tok, ex):
    return tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != data.IGNORE])


def test_alpaca_prompt_is_masked_and_response_ends_with_eos(tok):
    recs = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    examples, stats = data.tokenize(recs, tok, 512)
    full = tok.decode(examples[0]["input_ids"])
    assert full.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\n2 and 3" in full and "### Input" not in tok.decode(examples[1]["input_ids"])
    assert _trained_text(tok, examples[0]) == "The sum is 5." + tok.eos_token
    assert _trained_text(tok, examples[1]) == "Hi!" + tok.eos_token
    assert examples[0]["input_ids"][-1] == tok.eos_token_id
    assert stats == {"records": 2, "truncated": 0, "dropped": 0, "examples": 2,
                     "tokens": sum(len(e["input_ids"]) for e in examples),
                     "trained_tokens": len(tok("The sum is 5.")["input_ids"]) + len(tok("Hi!")["input_ids"]) + 2}


def test_truncation_and_drops_are_counted(tok):
    long = {"instruction": "Repeat.", "input": "", "output": "word " * 200}
    huge_prompt = {"instruction": "x " * 300, "input": "", "output": "ok"}
    examples, stats = data.tokenize([long, huge_prompt], tok, 64)
    assert stats["truncated"] == 2 and stats["dropped"] == 1 and len(examples) == 1
    assert len(examples[0]["input_ids"]) == 64 and examples[0]["labels"][-1] != data.IGNORE


def test_chatml_trains_only_assistant_turns(tok):
    rec = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]}
    (ex,), _ = data.tokenize([rec], tok, 512, template="chatml")
    full = tok.decode(ex["input_ids"])
    assert full.startswith("<|im_start|>system") and "<|im_start|>user\nAnd 3+3?<|im_end|>" in full
    assert _trained_text(tok, ex) == "4<|im_end|>\n6<|im_end|>\n"
    # instruction records become a user turn; chat records work with the Alpaca template too
    (ex2,), _ = data.tokenize([{"instruction": "Hi", "input": "", "output": "Hello"}], tok, 512, "chatml")
    assert _trained_text(tok, ex2) == "Hello<|im_end|>\n"
    (ex3,), _ = data.tokenize([rec], tok, 512, template="alpaca")
    assert _trained_text(tok, ex3) == f"4{tok.eos_token}6{tok.eos_token}"
    assert "### Instruction:\nAnd 3+3?" in tok.decode(ex3["input_ids"])


def test_collate_pads_with_ignored_labels(tok):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = data.collate(examples, pad_id=tok.pad_token_id)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_length_grouping_wastes_under_ten_percent(tok):
    examples, _ = data.tokenize(data.load_records("gsm8k", limit=96), tok, 256)
    batches = data.length_grouped_batches(examples, 4, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    assert batches == data.length_grouped_batches(examples, 4, seed=0, epoch=0)
    assert batches != data.length_grouped_batches(examples, 4, seed=0, epoch=1)
    grouped = data.padding_fraction(examples, batches)
    shuffled = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    random_frac = data.padding_fraction(examples, [shuffled[i:i + 4] for i in range(0, len(shuffled), 4)])
    assert grouped < 0.10 and grouped < random_frac / 3, (grouped, random_frac)
