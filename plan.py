"""The study's plan, written once: its fixed parameters (data set, learning rate, epochs, radii, seeds, ...)
and the names of the models it runs. measure.py reads those models' folders, study.py decides on them,
report.py renders them; run_all.sh passes the same parameters as flags and builds the same names.

    plan = settings("results", data="rot13", lr="3e-4")    # defaults < results/report_args.json < given
    plan = dataclasses.replace(plan, best_rho="0.02")      # the SAM radius, once study.best_rho chose it
    plan.names["sam"]["0"]                                  # 'rot13_lr3e-4_e1_sam0.02_s0'

A Plan is frozen: a choice made later (the SAM radius) is a new Plan, never an edit of the old one.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

METRIC_TEXT = {  # --metric: what the general change measures, and its unit
    "p": ("probability of the correct choice (softmax over the item's choices; an expected accuracy)",
          "probability"),
    "lp": ("log-probability of the correct choice normalised over the item's choices", "nats"),
    "margin": ("log-likelihood of the correct choice minus the best other choice", "nats"),
    "acc": ("accuracy (argmax of the summed log-likelihoods)", "fraction"),
    "acc_norm": ("accuracy with length-normalised log-likelihoods", "fraction")}

SETTINGS = {"profile": "smol", "model": "smollm2-135m", "stage1": None, "data": None, "lr": None, "epochs": "2",
            "other_data": [], "distance_data": [], "rhos": ["2"], "seeds": ["0"], "wiseft_alpha": "0.5",
            "rehearsal_data": "naturalqs", "rehearsal_ratio": "0.25", "landscape_data": "naturalqs",
            "size_models": [], "metric": "p", "wiseft_alphas": ["0", "0.25", "0.5", "0.75", "1"], "lora": None}


def dtag(data: str) -> str:
    """A data set (name or file) as it appears in model names: the file name without .jsonl/.json."""
    name = Path(str(data).rstrip("/")).name
    return name.removesuffix(".jsonl").removesuffix(".json")


def run_name(data, lr, epochs, method, seed, rehearsal=False, lora=None) -> str:
    """<data>_lr<lr>_e<epochs>_<adamw|sam<rho>>[_rh][_lora<r>]_s<seed>; run_all.sh's run_name builds the same."""
    return f"{dtag(data)}_lr{lr}_e{epochs}_{method}{'_rh' if rehearsal else ''}{f'_lora{lora}' if lora else ''}_s{seed}"


@dataclass(frozen=True)
class Plan:
    """The study folder `out` and the settings, as strings the way run names write them (lists as tuples);
    stage1 is None when stage 1 was not trained (the study starts from `model`). best_rho: the SAM radius
    the study continues with (study.best_rho), None until chosen."""
    out: str
    profile: str
    model: str
    stage1: str | None
    data: str
    lr: str
    epochs: str
    other_data: tuple
    distance_data: tuple
    rhos: tuple
    seeds: tuple
    wiseft_alpha: str
    rehearsal_data: str
    rehearsal_ratio: str
    landscape_data: str
    size_models: tuple
    metric: str
    wiseft_alphas: tuple
    lora: str | None
    best_rho: str | None = None

    @property
    def conf(self) -> dict:
        """The settings as report_args.json saves them (a later report reads them back)."""
        conf = {k: getattr(self, k) for k in SETTINGS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in conf.items()}

    @property
    def names(self) -> dict:
        """The study's model names by role (run_all.sh runs exactly these); the SAM names need best_rho."""
        d, lr, e, h, s0 = self.data, self.lr, self.epochs, str(int(self.epochs) // 2), self.seeds[0]
        sam = f"sam{self.best_rho}"
        return {"adamw": {sd: run_name(d, lr, e, "adamw", sd) for sd in self.seeds},
                "sam": {sd: run_name(d, lr, h, sam, sd) for sd in self.seeds},
                "sweep": {rho: run_name(d, lr, h, f"sam{rho}", s0) for rho in self.rhos},
                "wiseft": [run_name(d, lr, e, "adamw", s0) + f"_wiseft{self.wiseft_alpha}",
                           run_name(d, lr, h, sam, s0) + f"_wiseft{self.wiseft_alpha}"],
                "rehearsal": [run_name(d, lr, e, "adamw", s0, True), run_name(d, lr, h, sam, s0, True)],
                "datasets": {x: (run_name(x, lr, e, "adamw", s0), run_name(x, lr, h, sam, s0))
                             for x in dict.fromkeys([d, *self.other_data])},
                "distance": {x: run_name(x, lr, e, "adamw", s0) for x in dict.fromkeys(self.distance_data)},
                "wiseft_curve": {a: run_name(d, lr, e, "adamw", s0) + f"_wiseft{a}" for a in self.wiseft_alphas},
                "lora": [run_name(d, lr, e, "adamw", s0, lora=self.lora),
                         run_name(d, lr, h, sam, s0, lora=self.lora)] if self.lora else []}

    @property
    def order(self) -> list:
        """Every stage-2 model of the study once, in the order the tables list them."""
        N = self.names
        return list(dict.fromkeys([*N["adamw"].values(), *N["sam"].values(), *N["sweep"].values(), *N["wiseft"],
                                   *N["rehearsal"], *N["lora"], *[n for ns in N["datasets"].values() for n in ns],
                                   *N["distance"].values()]))


def settings(out, **given) -> Plan:
    """The study's plan: SETTINGS, then OUT/report_args.json (the last report's), then `given`."""
    path = Path(out) / "report_args.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    conf = {**SETTINGS, **saved, **{k: v for k, v in given.items() if v is not None and k in SETTINGS}}
    if not conf["data"] or not conf["lr"]:
        raise ValueError(f"--data and --lr are needed (no {out}/report_args.json from an earlier report); "
                         f"run_all.sh passes them, or give them by hand.")
    return Plan(out=str(out), **{k: tuple(v) if isinstance(v, list) else v for k, v in conf.items() if k in SETTINGS})


def add_settings_args(p: argparse.ArgumentParser):
    """The settings flags report.py and `study.py best-rho` take (run_all.sh passes them all)."""
    p.add_argument("--out", default="results", help="the study folder run_all.sh wrote")
    p.add_argument("--profile")
    p.add_argument("--model", help="the model stage 2 starts from, as named in the study")
    p.add_argument("--stage1", help="the stage-1 model folder when stage 1 was trained (paper profile)")
    p.add_argument("--data", help="the main stage-2 data set (the key comparison)")
    p.add_argument("--lr", help="stage-2 learning rate, as written in the run names (e.g. 1e-4)")
    p.add_argument("--epochs", help="AdamW epochs (SAM runs half)")
    p.add_argument("--other-data", nargs="*", help="more stage-2 data sets for Table 2(a)")
    p.add_argument("--distance-data", nargs="*", help="Table 1's data sets, nearest first")
    p.add_argument("--rhos", nargs="*", help="the SAM radii of the sweep")
    p.add_argument("--seeds", nargs="*", help="the seeds of the AdamW vs SAM comparison (first: the sweep)")
    p.add_argument("--wiseft-alpha")
    p.add_argument("--rehearsal-data")
    p.add_argument("--rehearsal-ratio")
    p.add_argument("--landscape-data")
    p.add_argument("--size-models", nargs="*", help="extra model sizes for Table 2(b) (under OUT/sizes/)")
    p.add_argument("--metric", choices=list(METRIC_TEXT), help="per-item general metric (default p)")
    p.add_argument("--wiseft-alphas", nargs="*", help="the Wise-FT curve of the first AdamW run (probe.py points)")
    p.add_argument("--lora", help="LoRA rank of the study's LoRA runs (none: no LoRA runs)")
