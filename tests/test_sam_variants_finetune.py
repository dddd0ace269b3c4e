"""finetune.py --sam --sam-variant V end to end on `tiny`: the passes each step took, resume."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune

SMALL = dict(model="tiny", data="naturalqs", batch_size=4, micro_batch_size=2, max_len=64, precision="fp32",
             heldout=4, warmup_ratio=0.0, limit=12, epochs=2, lr=1e-3, sam=True, rho=0.05, save_every=0)


def rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant, interval, passes", [
    ("sam", 1, [2] * 6), ("asam", 1, [2] * 6), ("samon", 1, [2] * 6), ("sam", 3, [2, 1, 1] * 2),
    ("looksam", 2, [2, 1] * 3), ("msam", 1, [1] * 6)])
def test_metrics_count_the_passes_each_variant_takes(tmp_path, tiny_path, variant, interval, passes):
    final = finetune.main(finetune.Args(**SMALL, sam_variant=variant, sam_interval=interval, out=str(tmp_path)))
    got = rows(tmp_path)
    assert [r["passes"] for r in got] == passes and final["passes"] == sum(passes)
    assert final["sam_variant"] == variant
    two = [r for r in got if r["passes"] == 2]
    assert all(r["loss_perturbed"] > r["loss"] and r["grad_norm_perturbed"] > 0 for r in two)
    if variant in ("sam", "looksam"):
        assert all(r["perturbation_norm"] == pytest.approx(0.05, rel=1e-4) for r in two)
    if variant == "msam":          # no momentum before the first step, then rho along -m
        assert [r["perturbation_norm"] for r in got][0] == 0.0
        assert all(r["perturbation_norm"] == pytest.approx(0.05, rel=1e-4) for r in got[1:])


@pytest.mark.parametrize("variant", ["looksam", "msam"])
def test_variant_resume_equals_uninterrupted(tmp_path, tiny_path, variant):
    kw = dict(SMALL, sam_variant=variant, sam_interval=3 if variant == "looksam" else 1)
    finetune.main(finetune.Args(**kw, out=str(tmp_path / "a")))
    finetune.main(finetune.Args(**kw, out=str(tmp_path / "b"), stop_after=4))   # mid-way between SAM steps
    finetune.main(finetune.Args(**kw, out=str(tmp_path / "b"), resume=True))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "b")] == [r["loss"] for r in rows(tmp_path / "a")]


def test_variant_flags_that_cannot_work_are_one_sentence(tmp_path, tiny_path):
    for kw, match in ((dict(sam=False, sam_variant="msam"), "add --sam"),
                      (dict(adaptive=True, sam_variant="looksam"), "--adaptive is --sam-variant asam"),
                      (dict(sam_variant="samon", lora=4), "freezes")):
        with pytest.raises(ValueError, match=match):
            finetune.main(finetune.Args(**dict(SMALL, **kw), out=str(tmp_path)))
