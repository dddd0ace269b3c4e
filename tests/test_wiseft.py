"""wiseft.py on real `tiny` checkpoints: exact endpoints, averages, dtypes, sharding, refusals."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import common
import wiseft

ROOT = Path(__file__).resolve().parent.parent


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_path):
    """A = tiny; B = perturbed tiny, saved single-file, sharded, and both in bf16."""
    root = tmp_path_factory.mktemp("wiseft")
    tok = common.load_tokenizer("tiny")
    b = _perturb(common.load_model("tiny"), seed=1)
    common.save_model(b, tok, root / "B")
    b.save_pretrained(root / "B_sharded", max_shard_size="4MB")
    tok.save_pretrained(root / "B_sharded")
    common.save_model(common.load_model("tiny", dtype=torch.bfloat16), tok, root / "A16")
    common.save_model(b.to(torch.bfloat16), tok, root / "B16")
    assert (root / "B_sharded" / wiseft.INDEX_FILE).exists()  # the sharded case really is sharded
    return {"A": Path(tiny_path), "root": root,
            **{k: root / k for k in ("B", "B_sharded", "A16", "B16")}}


def _raw(folder):
    """All stored tensors of a folder, whatever its sharding."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _state(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_alpha_0_and_1_reproduce_base_and_finetuned(folders, tmp_path, capsys):
    out = tmp_path / "sweep"
    written = wiseft.main(base=str(folders["A"]), finetuned=str(folders["B"]), alpha=[0.0, 1.0],
                          out=str(out))
    assert written == [str(out / "alpha_0"), str(out / "alpha_1")]
    for folder, ref in zip(written, (folders["A"], folders["B"])):
        got, want = _state(folder), _state(ref)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    a_norm, b_norm = (_state(folders[k])["model.norm.weight"] for k in "AB")
    assert not torch.equal(a_norm, b_norm)  # the two endpoints really differ
    record = json.loads((out / "alpha_1" / "wiseft.json").read_text())
    assert record["alpha"] == 1.0 and record["finetuned"] == str(folders["B"])
    assert json.loads((out / "args.json").read_text())["alpha"] == [0.0, 1.0]
    # one alpha makes --out the model folder: replacing the sweep would delete alpha_0 and alpha_1
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(folders["B"]), alpha=[0.5], out=str(out))
    assert "not a model folder" in err and str(out) in err
    assert (out / "alpha_0" / "wiseft.json").exists() and (out / "alpha_1" / "wiseft.json").exists()
    # an earlier output (it has wiseft.json) is replaced as before
    wiseft.main(base=str(folders["A"]), finetuned=str(folders["B"]), alpha=[0.5], out=str(out / "alpha_1"))
    assert json.loads((out / "alpha_1" / "wiseft.json").read_text())["alpha"] == 0.5


def test_half_is_the_average_keeps_sharding_and_loads(folders, tmp_path):
    out = tmp_path / "half"
    wiseft.interpolate(str(folders["A"]), str(folders["B_sharded"]), 0.5, str(out))
    b_files = sorted(p.name for p in folders["B_sharded"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(b_files + ["wiseft.json", "README.md"])
    assert (json.loads((out / wiseft.INDEX_FILE).read_text())["weight_map"]
            == json.loads((folders["B_sharded"] / wiseft.INDEX_FILE).read_text())["weight_map"])
    a, b, got = _raw(folders["A"]), _raw(folders["B_sharded"]), _raw(out)
    assert got.keys() == a.keys()
    for k in a:
        assert torch.equal(got[k], 0.5 * a[k] + 0.5 * b[k]), k
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 42, 7]])).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()
    assert common.load_tokenizer(str(out)).eos_token == "<|im_end|>"


def test_sharded_base_into_single_file_layout(folders, tmp_path):
    out = tmp_path / "single"
    wiseft.interpolate(str(folders["B_sharded"]), str(folders["A"]), 0.25, str(out))
    assert (out / "model.safetensors").exists() and not (out / wiseft.INDEX_FILE).exists()
    a, b, got = _raw(folders["B_sharded"]), _raw(folders["A"]), _raw(out)
    for k in a:
        assert torch.equal(got[k], 0.75 * a[k] + 0.25 * b[k]), k


def test_bf16_stays_bf16_and_is_mixed_in_fp32(folders, tmp_path):
    out = tmp_path / "bf16"
    wiseft.interpolate(str(folders["A16"]), str(folders["B16"]), 0.3, str(out))
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    a, b, got = _raw(folders["A16"]), _raw(folders["B16"]), _raw(out)
    for k in a:
        want = ((1 - 0.3) * a[k].float() + 0.3 * b[k].float()).bfloat16()
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def _refused(capsys, **kwargs):
    with pytest.raises(SystemExit) as e:
        wiseft.main(**kwargs)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_mismatched_shape_is_refused_naming_the_tensor(folders, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(folders["B"], bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:100].clone()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(bad), out=str(tmp_path / "o"))
    assert key in err and "[128, 64]" in err and "[100, 64]" in err
    assert not (tmp_path / "o").exists()


def test_mismatched_config_and_dtype_are_refused(folders, tmp_path, capsys):
    cfg = LlamaConfig.from_pretrained(folders["A"])
    cfg.intermediate_size = 96
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    o = str(tmp_path / "o")
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(tmp_path / "wide"), out=o)
    assert "intermediate_size" in err and "128" in err and "96" in err
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(folders["B16"]), out=o)
    assert "model.embed_tokens.weight" in err and "F32" in err and "BF16" in err


def test_alpha_outside_unit_interval_needs_extrapolate(folders, tmp_path, capsys):
    args = dict(base=str(folders["A"]), finetuned=str(folders["B"]), alpha=[1.5],
                out=str(tmp_path / "x"))
    assert "--extrapolate" in _refused(capsys, **args)
    assert not (tmp_path / "x").exists()
    wiseft.main(**args, extrapolate=True)
    a, b, got = _raw(folders["A"]), _raw(folders["B"]), _raw(tmp_path / "x")
    for k in a:
        torch.testing.assert_close(got[k], b[k] + 0.5 * (b[k] - a[k]))


def test_bad_inputs_give_one_line_errors(folders, tmp_path, capsys):
    o = str(tmp_path / "o")
    assert "--base and --finetuned" in _refused(capsys, out=o)
    err = _refused(capsys, base=str(tmp_path / "nope"), finetuned=str(folders["B"]), out=o)
    assert "--base" in err and "no such folder" in err
    (tmp_path / "cfg_only").mkdir()
    shutil.copy(folders["B"] / "config.json", tmp_path / "cfg_only")
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(tmp_path / "cfg_only"), out=o)
    assert "--finetuned" in err and "model.safetensors" in err
    err = _refused(capsys, base=str(folders["A"]), finetuned=str(folders["B"]), out=str(folders["root"]))
    assert "would replace --finetuned" in err and folders["B"].exists()


def test_integer_tensors_are_copied_only_when_equal(tmp_path, folders):
    def folder(name, ids):
        (tmp_path / name).mkdir()
        shutil.copy(folders["A"] / "config.json", tmp_path / name)
        tensors = {"w": torch.full((3,), float(len(name))), "ids": ids}
        save_file(tensors, tmp_path / name / "model.safetensors")
    folder("a", torch.arange(4))
    folder("bb", torch.arange(4))
    folder("ccc", torch.arange(4) + 1)
    wiseft.interpolate(str(tmp_path / "a"), str(tmp_path / "bb"), 0.5, str(tmp_path / "o"))
    got = _raw(tmp_path / "o")
    assert torch.equal(got["ids"], torch.arange(4)) and torch.equal(got["w"], torch.full((3,), 1.5))
    with pytest.raises(wiseft.CheckpointError, match="non-floating tensor ids"):
        wiseft.interpolate(str(tmp_path / "a"), str(tmp_path / "ccc"), 0.5, str(tmp_path / "o2"))


def test_cli_sweep_writes_one_folder_per_alpha(folders, tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(ROOT / "wiseft.py"), "--base", str(folders["A"]), "--finetuned",
                    str(folders["B"]), "--alpha", "0", "0.25", "0.5", "0.75", "1", "--out", str(out)],
                   check=True, cwd=tmp_path)
    names = ["alpha_0", "alpha_0.25", "alpha_0.5", "alpha_0.75", "alpha_1"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["args.json"])
    a, b = _raw(folders["A"]), _raw(folders["B"])
    key = "model.layers.0.self_attn.q_proj.weight"
    for name, alpha in zip(names, (0, 0.25, 0.5, 0.75, 1)):
        assert json.loads((out / name / "wiseft.json").read_text())["alpha"] == alpha
        assert (out / name / "tokenizer.json").exists() and (out / name / "config.json").exists()
        assert torch.equal(_raw(out / name)[key], (1 - alpha) * a[key] + alpha * b[key])
