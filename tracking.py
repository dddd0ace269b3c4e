"""What a run shows and leaves behind besides its own logs: trackers, a progress bar, model cards.

    trackers = Trackers("tensorboard,wandb", out, config)    # --report-to; rank 0 writes, others skip
    trackers.log_step(row); trackers.log_probe(point); trackers.close()
    bar = Progress(total, initial=start, desc="fine-tuning")  # a tqdm bar on a terminal, else nothing
    common.write_text(folder / "README.md", finetune_card(...))   # or wiseft_card(...)

Trackers. TensorBoard event files go to OUT/tensorboard (`tensorboard --logdir OUT`), a W&B run to
OUT/wandb: offline (no network, `wandb sync OUT/wandb/offline-run-*` uploads it later) unless
WANDB_MODE says otherwise or W&B credentials are set up (WANDB_API_KEY, or `wandb login`). The
scalars, under train/ and probe/ (the names of metrics.jsonl and trajectory.jsonl):
  train/loss, train/lr, train/grad_norm (||g|| at w), train/tokens_per_s, and on SAM steps
  train/loss_perturbed (L(w + e)), train/loss_rise (L(w + e) - L(w): the sharpness the radius buys),
  train/grad_norm_perturbed (||g'||, before clipping), train/perturbation_norm (||e||);
  probe/heldout_loss, probe/general_nll, probe/kl_to_start, probe/displacement (--eval-every).

Progress. On a terminal, rank 0 draws a tqdm bar with the rate and the ETA and prints its log
lines above it; in a log file (stdout not a terminal) there is no bar, only the caller's lines,
which carry their own ETA.
"""
import importlib.util
import math
import os
import shlex
import sys
from pathlib import Path

import common

TRACKERS = ("tensorboard", "wandb")
PINS = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}       # as requirements.txt
STEP_KEYS = ("loss", "loss_perturbed", "grad_norm", "grad_norm_perturbed", "perturbation_norm", "lr",
             "tokens_per_s")
PROBE_KEYS = ("heldout_loss", "general_nll", "kl_to_start", "displacement")


# ----------------------------------------------------------------------------- trackers

def parse_report_to(value) -> list:
    """'none' | 'tensorboard' | 'wandb' | 'tensorboard,wandb' -> the tracker names; a user error
    (an unknown name, a package not installed) is a ValueError of one sentence."""
    names = [n.strip() for n in str(value or "none").split(",") if n.strip() not in ("", "none")]
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"--report-to {value}: unknown tracker {n!r}; choose none, tensorboard, wandb "
                             f"or a comma-separated list of them.")
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"--report-to {n} needs the `{n}` package, which is not installed; "
                             f"`pip install {PINS[n]}` (requirements.txt) or leave {n} out of --report-to.")
    return list(dict.fromkeys(names))


def wandb_mode():
    """'offline' unless the user chose (WANDB_MODE) or can log in (WANDB_API_KEY, ~/.netrc)."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        import netrc
        if netrc.netrc().authenticators("api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class Trackers:
    """TensorBoard and/or W&B for one run, written by rank 0 only."""

    def __init__(self, report_to, out, config: dict, name: str | None = None):
        self.names = parse_report_to(report_to)
        self.tb = self.wandb = None
        if not common.is_main():
            return
        out = Path(out)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if "wandb" in self.names:
            import wandb
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            mode = wandb_mode()
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "flattune"), name=name or out.name,
                                    dir=str(out), config=config, mode=mode)
            if mode == "offline":
                common.log(f"W&B: offline run in {out}/wandb (no credentials); upload it with "
                           f"`wandb sync {out}/wandb/offline-run-*`")

    def log(self, metrics: dict, step: int, prefix: str):
        scalars = {f"{prefix}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def log_step(self, row: dict):
        """One optimizer step's row of metrics.jsonl, plus the loss rise on SAM steps."""
        scalars = {k: row[k] for k in STEP_KEYS if k in row}
        if "loss_perturbed" in row:
            scalars["loss_rise"] = row["loss_perturbed"] - row["loss"]
        self.log(scalars, row["step"], "train")

    def log_probe(self, point: dict):
        """One row of trajectory.jsonl (probe.py's point at a step)."""
        self.log({k: point[k] for k in PROBE_KEYS if k in point}, point["step"], "probe")

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tb = self.wandb = None


# ----------------------------------------------------------------------------- progress

def _tty(stream) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class Progress:
    """A tqdm bar (rate, ETA) on rank 0 when stdout and stderr are terminals; otherwise nothing.
    While the bar is up, stdout goes through tqdm.write, so log lines print above the bar."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "step"):
        self.bar = None
        if not (common.is_main() and _tty(sys.stdout) and _tty(sys.stderr)):
            return
        try:
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile
        except ImportError:
            return
        self.stdout = sys.stdout
        # the bar on stdout itself, so that tqdm.write clears it before each line (tqdm's documented pattern)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stdout, dynamic_ncols=True)
        sys.stdout = DummyTqdmFile(sys.stdout)

    def update(self, done: int, **postfix):
        """`done` units finished so far; postfix values (e.g. loss=...) are shown after the bar."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                     refresh=False)
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            sys.stdout = self.stdout
            self.bar = None


# ----------------------------------------------------------------------------- model cards

def command_line(script: str, args: dict, defaults: dict, world: int = 1) -> str:
    """The command that repeats a run: every flag whose value differs from its default."""
    words = ["torchrun", "--nproc_per_node", str(world)] if world > 1 else ["python"]
    words.append(script)
    for k, v in args.items():
        if k not in defaults or v == defaults[k] or (isinstance(v, (list, tuple)) and
                                                    list(v) == list(defaults[k] or [])):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            words += [flag] if v else []
        elif isinstance(v, (list, tuple)):
            words += [flag, *map(str, v)]
        elif v is not None:
            words += [flag, str(v)]
    return shlex.join(words)


def _fmt(x) -> str:
    return "not measured" if x is None else f"{x:.4f}"


def _trajectory(run: Path, step: int) -> tuple:
    """(point at step 0, point at `step`) from run/trajectory.jsonl, None where not taken."""
    path = run / "trajectory.jsonl"
    rows = {r["step"]: r for r in common.read_jsonl(path)} if path.exists() else {}
    return rows.get(0, {}), rows.get(step, {})


def finetune_card(run, args: dict, step: int, total: int, command: str, heldout_start=None,
                  heldout_end=None, extra: dict | None = None) -> str:
    """README.md of a model folder finetune.py writes: after `step` of `total` steps of the run in
    folder `run` (its trajectory.jsonl gives the probes' values at step 0 and at `step`)."""
    start, end = _trajectory(Path(run), step)
    heldout_end = heldout_end if heldout_end is not None else end.get("heldout_loss")
    a, extra = args, extra or {}
    if a["sam"]:
        sam = (f"{'ASAM (adaptive)' if a['adaptive'] else 'SAM'} around AdamW, rho {a['rho']:g}, perturbing "
               f"{'every step' if a['sam_interval'] == 1 else 'every %d-th step' % a['sam_interval']}")
    else:
        sam = "none (plain AdamW)"
    tuning = f"LoRA rank {a['lora']} (alpha {a['lora_alpha']:g}), merged into the weights" if a["lora"] \
        else "full fine-tuning"
    warmup = f"{a['warmup_steps']} warmup steps" if a.get("warmup_steps") is not None \
        else f"warmup ratio {a['warmup_ratio']:g}"
    data = f"`{a['data']}`" + (f" (first {a['limit']} items)" if a["limit"] else "") + \
        (f", rehearsal `{a['rehearsal']}` at ratio {a['rehearsal_ratio']:g}" if a["rehearsal"] else "") + \
        f", {a['heldout']} items held out, template {a['template']}, max {a['max_len']} tokens"
    rows = [("base model", f"`{a['model']}`"), ("data", data), ("training", tuning),
            ("optimizer", f"AdamW, lr {a['lr']:g} ({warmup}, then cosine to 0), weight decay "
                          f"{a['weight_decay']:g}, grad clip {a['grad_clip']:g}, {a['batch_size']} examples a step"),
            ("SAM", sam), ("steps", f"{step} of {total}" + (f" ({step / total * a['epochs']:.2f} epochs)"
                                                            if total else "")),
            ("seed", str(a["seed"]))] + [(k, str(v)) for k, v in extra.items()]
    lines = ["---", "library_name: transformers", "tags: [flattune, " + ("sam" if a["sam"] else "adamw") + "]",
             "---", "", f"# {Path(run).name}" + (f" after step {step}" if step < total else ""), "",
             f"Fine-tuned with flattune's finetune.py from `{a['model']}` on `{a['data']}`"
             f" ({'SAM, rho %g' % a['rho'] if a['sam'] else 'AdamW'}).", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
             "## Measured", "",
             f"| | step 0 | step {step} |", "|---|---|---|",
             f"| held-out loss (nats/token) | {_fmt(heldout_start)} | {_fmt(heldout_end)} |",
             f"| general-text NLL (nats/token) | {_fmt(start.get('general_nll'))} | {_fmt(end.get('general_nll'))} |",
             "", "## How it was made", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def wiseft_card(base: str, finetuned: str, alpha: float, command: str, finetuned_dir=None) -> str:
    """README.md of a Wise-FT folder: both parents, alpha, and the fine-tuned parent's own recipe
    (the first line of its card, when `finetuned_dir` has one)."""
    parent = Path(finetuned_dir or finetuned) / "README.md"
    made = ""
    if parent.is_file():            # the fine-tuned parent's card: its first line of prose
        prose = [l for l in parent.read_text().splitlines() if l.startswith("Fine-tuned with")]
        made = f" The fine-tuned parent: {prose[0][len('Fine-tuned with '):]}" if prose else ""
    return "\n".join([
        "---", "library_name: transformers", "tags: [flattune, wise-ft]", "---", "",
        f"# Wise-FT, alpha {alpha:g}", "",
        f"The weights (1 - alpha) * base + alpha * fine-tuned with alpha = {alpha:g}, tensor by tensor "
        f"(Wortsman et al. 2022), written by flattune's wiseft.py.{made}", "",
        "| | |", "|---|---|", f"| base (alpha = 0) | `{base}` |", f"| fine-tuned (alpha = 1) | `{finetuned}` |",
        f"| alpha | {alpha:g} |", "", "## How it was made", "", "```bash", command, "```", ""])
