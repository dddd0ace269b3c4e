"""--config files (runconfig.py) for finetune.py, evaluate.py and landscape.py: the file sets values,
the command line overrides them, args.json is a config, bad keys and types fail in one sentence."""
import dataclasses
import json

import pytest

import evaluate
import finetune
import landscape


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_sets_values_and_flags_override(tmp_path):
    cfg = _write(tmp_path / "run.yaml", "model: tiny\nbatch-size: 8\nmicro_batch_size: 2\nlr: 1e-5\nsam: true\n"
                                        "rho: 0.05\nsave-model-at: [2, 4]\nwarmup-steps: null\n"
                                        "report-to: tensorboard\n")
    a = finetune.parse_args(["--config", cfg])
    assert (a.model, a.batch_size, a.micro_batch_size, a.lr, a.sam, a.rho) == ("tiny", 8, 2, 1e-5, True, 0.05)
    assert list(a.save_model_at) == [2, 4] and a.warmup_steps is None and a.report_to == "tensorboard"
    assert a.epochs == finetune.Args().epochs                           # not in the file: the default
    b = finetune.parse_args(["--lr", "3e-4", "--config", cfg, "--save-model-at", "6", "--rho", "0.2"])
    assert (b.lr, b.rho, list(b.save_model_at), b.batch_size) == (3e-4, 0.2, [6], 8)


def test_json_config_and_finetune_args_json_round_trip(tmp_path):
    args = finetune.Args(model="tiny", data="naturalqs", sam=True, rho=0.3, save_model_at=(3,), limit=12,
                         lr=2e-4, warmup_steps=2, report_to="wandb", template="alpaca")
    # what finetune.main writes: the fields, plus world and compute_precision
    path = _write(tmp_path / "args.json", json.dumps({**dataclasses.asdict(args), "world": 1,
                                                      "compute_precision": "fp32"}))
    got = finetune.parse_args(["--config", path])
    assert dataclasses.asdict(got) == {**dataclasses.asdict(args), "save_model_at": [3]}


def test_unknown_key_is_one_sentence_naming_key_and_file(tmp_path, capsys):
    cfg = _write(tmp_path / "bad.yaml", "model: tiny\nlearning_rate: 1e-5\n")
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--config", cfg])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert cfg in err and "'learning_rate'" in err and "did you mean" in err


@pytest.mark.parametrize("line, key", [("epochs: two", "epochs"), ("epochs: 2.5", "epochs"),
                                       ("sam: yes please", "sam"), ("template: klingon", "template"),
                                       ("save-model-at: [2, x]", "save-model-at"), ("lr: [1, 2]", "lr"),
                                       ("model: null", "model")])
def test_wrong_type_is_one_sentence_naming_key_and_file(tmp_path, capsys, line, key):
    cfg = _write(tmp_path / "bad.yaml", line + "\n")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--config", cfg])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and cfg in err and repr(key) in err, err


def test_malformed_and_missing_files(tmp_path, capsys):
    for path, text in ((tmp_path / "m.json", "{\"lr\": "), (tmp_path / "l.yaml", "- 1\n- 2\n")):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--config", _write(path, text)])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err, err
    with pytest.raises(SystemExit):
        finetune.parse_args(["--config", str(tmp_path / "none.yaml")])
    assert "no such file" in capsys.readouterr().err


def test_evaluate_config_and_its_args_json(tmp_path):
    a = evaluate.parse_args(["--config", _write(tmp_path / "e.yaml", "model: tiny\ntasks: [arc_easy, piqa]\n"
                                                                     "limit: [40, arc_easy=150]\nbatch-size: 4\n"),
                             "--shots", "1"])
    assert (a.model, a.tasks, a.limit, a.batch_size, a.shots) == ("tiny", ["arc_easy", "piqa"],
                                                                   ["40", "arc_easy=150"], 4, 1)
    # evaluate.main's args.json holds the resolved limit, as results.json's settings
    written = {"model": "runs/ft", "tasks": ["paper"], "out": "runs/eval/ft", "limit": {"*": 40, "arc_easy": None},
               "shots": 0, "batch_size": 8, "dtype": "bf16", "scoring": "ppl", "seed": 7, "baseline": None,
               "heldout": "runs/ft/heldout.jsonl", "max_len": 256}
    b = evaluate.parse_args(["--config", _write(tmp_path / "args.json", json.dumps(written))])
    assert {**vars(b), "limit": None} == {**written, "limit": None}
    assert evaluate.parse_limit(b.limit) == {None: 40, "arc_easy": None}
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--config", _write(tmp_path / "x.yaml", "dtype: fp8\n")])


def test_landscape_config_and_its_args_json(tmp_path):
    a = landscape.parse_args(["--config", _write(tmp_path / "s.yaml", "range: 0.5\nsteps: 7\nhessian: true\n")])
    assert (a.radius, a.steps, a.hessian) == (0.5, 7, True)
    written = dict(landscape.parse_args([]).__dict__, model="runs/ft", radius=0.2, steps=9, dtype="bf16")
    b = landscape.parse_args(["--config", _write(tmp_path / "args.json", json.dumps(written)), "--steps", "11"])
    assert vars(b) == {**written, "steps": 11}

