"""bench/gpu_check.py --smoke (CPU, tiny shapes): every check runs and what it wrote is complete, so
the GPU script cannot rot between GPU slices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ["environment", "kernel_tests", "kernel_bandwidth", "sam_vs_adamw", "sam_variants",
          "finetune_resume", "evaluate_speed"]


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run(str(out), "--smoke")
    return out, proc


def test_the_smoke_run_passes_every_check_and_says_so_as_it_goes(smoke):
    out, proc = smoke
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report["checks"]) == CHECKS
    for name, check in report["checks"].items():
        assert check["status"] == "pass", (name, check["summary"], check.get("details"))
        assert f"{name}: PASS" in proc.stdout                  # one progress line per check
        assert check.get("target_met") is None                 # smoke figures judge no target


def test_what_each_check_measured(smoke):
    out, _ = smoke
    checks = json.loads((out / "gpu_check.json").read_text())["checks"]
    env = checks["environment"]["details"]
    assert env["torch"] == torch.__version__ and env["imports_without_datasets_gguf"] == "ok"
    kt = checks["kernel_tests"]["details"]
    assert kt["passed"] >= 5 and kt["failures"] == kt["errors"] == 0
    bw = checks["kernel_bandwidth"]["details"]
    assert set(bw) == {"Llama-2-7B layer, fp32", "Llama-3-8B parameters, bf16"}
    for rows in bw.values():
        assert rows["restore_exact"] and rows["copy_GBps"] > 0
        assert set(rows["approaches"]) >= {"torch._foreach reference", "per-parameter loop"}
        assert all(a["ms"] > 0 and a["copy_share"] > 0 for a in rows["approaches"].values())
    assert bw["Llama-3-8B parameters, bf16"]["dtype"] == "bfloat16"
    step = checks["sam_vs_adamw"]["details"]
    assert step["losses_finite"] and step["perturbation_norm"] == pytest.approx(2.0, rel=1e-3)
    assert step["ratio"] > 0 and set(step["ms"]) == {"SAM", "AdamW"}
    variants = checks["sam_variants"]["details"]["results"]
    assert set(variants) == {"adamw", "sam", "asam", "samon", "sam_interval5", "looksam_k5", "msam"}
    assert [variants[n]["passes"] for n in ("adamw", "sam", "looksam_k5", "sam_interval5", "msam")] == \
        [1.0, 2.0, 1.2, 1.2, 1.0]
    assert all(r["step_s"] > 0 for r in variants.values()) and variants["msam"]["sam_mb"] > 0
    ft = checks["finetune_resume"]["details"]
    assert ft["runs"][0]["steps"] == [1, 2, 3] and ft["runs"][0]["checkpoint"]
    assert ft["steps"] == [1, 2, 3, 4, 5, 6] and ft["resumed_logged"] and ft["final_json"]
    ev = checks["evaluate_speed"]["details"]
    assert ev["items"] == 24 and ev["disagreements"] == 0 and ev["max_abs_ll_diff"] < 1e-4
    assert all(v > 0 for v in ev["items_per_s"].values())


def test_the_markdown_report_holds_the_table(smoke):
    out, _ = smoke
    md = (out / "gpu_check.md").read_text()
    assert "| check | status | s | result | target | met |" in md
    for name in CHECKS:
        assert f"| {name} | pass |" in md
    assert "## perturb + restore bandwidth" in md and "all checks passed" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_the_full_run_refuses_in_one_sentence(tmp_path):
    proc = run(str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no GPU is visible") and "--smoke" in proc.stderr


def test_an_unknown_check_is_refused(tmp_path):
    proc = run(str(tmp_path), "--smoke", "--only", "kernels", timeout=120)
    assert proc.returncode == 2 and "--only kernels" in proc.stderr


def test_an_import_that_needs_datasets_fails_the_environment_check_and_names_the_line(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    (tmp_path / "needs_datasets.py").write_text("import json\nimport datasets\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    ctx = {"device": torch.device("cpu"), "smoke": True, "env": env,
           "import_modules": ("common", "needs_datasets")}
    result = gpu_check.check_environment(ctx)
    assert not result["ok"]
    bad = result["details"]["imports_without_datasets_gguf"]
    assert set(bad) == {"needs_datasets"} and "needs_datasets.py:2: import datasets" in bad["needs_datasets"]
