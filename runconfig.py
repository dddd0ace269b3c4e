"""Config files for the stages' flags: `--config run.yaml` (or .json), the command line on top.

    python finetune.py --config my.yaml --lr 1e-5        # the file's values, then the flags given
    python finetune.py --config runs/x/args.json         # rerun a run: args.json is a config
    python evaluate.py --config eval.yaml ; python landscape.py --config scan.yaml

A config is one mapping of flag names to values: `batch-size: 8` or `batch_size: 8` for
`--batch-size 8`, `sam: true` for `--sam`, a list for a flag that takes several values
(`save-model-at: [2, 4]`), null for a flag whose default is None. The file's values become the
parser's defaults, so every flag on the command line overrides them. A key that names no flag and a
value of the wrong type end the run with one sentence naming the key and the file. Numbers written
as strings are read as numbers (YAML reads `1e-5`, without a dot, as a string).
"""
import argparse
import difflib
import json
from pathlib import Path

import common

# names the same settings have in the HF Trainer / TRL / torchtune, for the hint of an unknown key
ALIASES = {"learning_rate": "lr", "num_train_epochs": "epochs", "output_dir": "out", "max_seq_length": "max_len",
           "model_name_or_path": "model", "per_device_train_batch_size": "micro_batch_size", "dataset": "data",
           "max_length": "max_len", "max_grad_norm": "grad_clip"}


def parse(parser: argparse.ArgumentParser, argv=None, recorded=(), convert=None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with `--config PATH` added: the file's values as defaults.

    recorded: keys a run writes into its args.json beside its flags (finetune.py's `world`), accepted
    and ignored. convert: {dest: function} turning a file value into the flag's values first.
    """
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML or JSON file of flag values (keys: flag names); flags given override it")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if path:
        try:
            parser.set_defaults(**values(parser, load(path), path, recorded, convert or {}))
        except (ValueError, FileNotFoundError) as e:
            common.die(str(e))
    args = parser.parse_args(argv)
    del args.config
    return args


def load(path) -> dict:
    """The mapping in a .yaml/.yml/.json file (anything else is read as YAML, a superset of JSON)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file; pass a YAML or JSON file of flag values.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            obj = json.loads(text)
        else:
            import yaml
            obj = yaml.safe_load(text)
    except Exception as e:          # json.JSONDecodeError, yaml.YAMLError: a malformed file
        raise ValueError(f"--config {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                         f"({str(e).splitlines()[0]}); fix the file.") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ValueError(f"--config {path} holds a {type(obj).__name__}, not a mapping of flag names to "
                         f"values; write one `flag: value` per line.")
    return obj


def values(parser, config: dict, path, recorded=(), convert=None) -> dict:
    """{dest: value} for `parser.set_defaults`, each value checked against its flag."""
    actions = {}
    for a in parser._actions:
        if a.option_strings and a.dest not in ("help", "config"):
            actions[a.dest] = a
            for s in a.option_strings:
                actions.setdefault(s.lstrip("-").replace("-", "_"), a)
    out = {}
    for key, value in config.items():
        name = str(key).replace("-", "_")
        if name in recorded:
            continue
        if name not in actions:
            near = [ALIASES[name]] if ALIASES.get(name) in actions else difflib.get_close_matches(name, actions, n=1)
            hint = f" (did you mean {near[0].replace('_', '-')}?)" if near else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; use the names of the flags in --help, "
                             f"e.g. batch-size for --batch-size.")
        action = actions[name]
        if convert and action.dest in convert:
            value = convert[action.dest](value)
        out[action.dest] = _check(action, value, key, path)
    return out


def _check(action, value, key, path):
    flag = max(action.option_strings, key=len)
    def bad(what):
        return ValueError(f"{path}: key {key!r} must be {what}, not {value!r} ({type(value).__name__}); "
                          f"fix it in the file or give {flag} on the command line.")
    if action.nargs == 0:                       # store_true / store_false
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if value is None:
        if action.default is None:
            return None
        raise bad(f"a value ({flag} has the default {action.default!r}, not null)")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_scalar(action, v, bad) for v in items]
    if isinstance(value, (list, tuple, dict)):
        raise bad("a single value")
    return _scalar(action, value, bad)


def _scalar(action, v, bad):
    kind = action.type or str
    what = {int: "a whole number", float: "a number", str: "a string"}.get(kind, f"a valid {kind.__name__}")
    if isinstance(v, (bool, list, tuple, dict)) or v is None:
        raise bad(what)
    if kind is int and isinstance(v, float):
        raise bad(what)
    if kind is str:
        v = str(v)
    else:
        try:
            v = kind(v)
        except (TypeError, ValueError):
            raise bad(what) from None
    if action.choices is not None and v not in action.choices:
        raise bad("one of " + ", ".join(map(str, action.choices)))
    return v
