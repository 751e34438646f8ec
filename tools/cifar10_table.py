"""The CIFAR-10 runs' final errors as a table, beside the paper's Table 6 (He et al. 2016).

    python tools/cifar10_table.py [RUNS]          # default runs/cifar10: every RUNS/*/config.yaml
    python tools/cifar10_table.py RUNS/RUN        # one run directory

Each run directory is read as training left it: the network and seed from its ``config.yaml``, the test
error from the last ``val/top1`` row of ``csv/metrics.csv`` (the CIFAR config validates on the test set
at each epoch's end; the paper's 64k steps end 40 steps after the last one, at lr 0.001), the training
error from the ``train/top1`` rows of that validation's epoch (augmented batches, as the paper's curves;
not the 40 steps after it). A run short of its planned steps (``trainer.max_steps``, else the checkpoint's
plan) is shown with the step it is at and left out of the numbers; a run directory without a
``config.yaml`` (a job not started yet, or one that stopped before training) is named on stderr. Runs of one
network and one recipe (any seeds) make one row: best and mean +- std of the final error, as the paper
reports ResNet-110. Runs of a network whose recipes differ (option B, another border, the 45k split, ...)
make a row each, named by the settings that differ (the network's options with their defaults filled in); a row
not scored on the whole test split (another ``data.val_split``, a ``trainer.limit_val_batches``) says so and has
no paper number beside it.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.checkpoints import read_checkpoint
from launch.errors import LaunchError
from pipeline.models.registry import options
from pipeline.run_layout import CONFIG_FILE, metrics_csv

# Table 6 of the paper: CIFAR-10 test error (%); ResNet-110 is "best (mean +- std)" over 5 runs
PAPER = {"cifar_resnet20": "8.75", "cifar_resnet32": "7.51", "cifar_resnet44": "7.17", "cifar_resnet56": "6.97",
         "cifar_resnet110": "6.43 (6.61 ± 0.16)", "cifar_resnet1202": "7.93"}


# What makes two runs of a network the same experiment: the settings that change its result (not the seeds,
# the run directory, loader workers or logging). The whole model section and augmentation, and these.
RECIPE_SECTIONS = ("model", "data.augment")
RECIPE_KEYS = ("data.root", "data.train_split", "data.val_split", "data.batch_size", "trainer.max_steps",
               "trainer.max_epochs", "trainer.precision", "trainer.devices", "trainer.num_nodes",
               "trainer.accumulate_grad_batches", "trainer.limit_train_batches", "trainer.limit_val_batches")


@dataclass
class Run:
    path: Path
    arch: str
    seed: object
    step: int  # optimizer steps done: last.ckpt's, else the last logged step's
    planned: int | None  # the run's steps: trainer.max_steps, else the checkpoint's plan (a max_epochs run)
    test_error: float | None  # %, at the last validation
    train_error: float | None  # %, mean over the logged training batches of the last validation's epoch
    recipe: dict[str, str] = field(default_factory=dict)  # RECIPE_* settings, dotted key -> value

    @property
    def done(self) -> bool:
        return self.planned is not None and self.step >= self.planned

    @property
    def scored_on(self) -> str:
        return self.recipe.get("data.val_split", "test")

    @property
    def scored_part(self) -> str | None:
        """``trainer.limit_val_batches`` where the validation scored part of its split, else None."""
        return self.recipe.get("trainer.limit_val_batches")


def _get(cfg: dict, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _flat(value: object, key: str) -> dict[str, str]:
    """Dotted key -> YAML text of each leaf; a null is left out (unset: ``arch_kwargs: null`` is no kwargs)."""
    if isinstance(value, dict):
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{key}.{name}").items()}
    if value is None:
        return {}
    return {key: yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()}


def recipe(cfg: dict) -> dict[str, str]:
    """The settings of ``RECIPE_SECTIONS`` and ``RECIPE_KEYS`` in a run's config, as text. The network's options
    with their defaults filled in (``arch_kwargs: {}`` and ``{shortcut: A}`` build one network: one row); a
    whole validation (``limit_val_batches`` 1.0, null) left out."""
    out: dict[str, str] = {}
    for key in (*RECIPE_SECTIONS, *RECIPE_KEYS):
        out.update(_flat(_get(cfg, key), key))
    arch, kwargs = _get(cfg, "model.arch"), _get(cfg, "model.arch_kwargs")
    if isinstance(arch, str) and isinstance(kwargs, dict | None):
        out = {k: v for k, v in out.items() if not k.startswith("model.arch_kwargs.")}
        out.update(_flat(options(arch, kwargs), "model.arch_kwargs"))
    limit = _get(cfg, "trainer.limit_val_batches")
    if limit is None or (isinstance(limit, float) and limit == 1.0):  # (an int 1 is one batch)
        out.pop("trainer.limit_val_batches", None)
    out.pop("model.arch", None)  # the row's name already
    return out


def _float(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if v not in (None, "") else None


def _steps(run_dir: Path, rows: list[dict], max_steps: int) -> tuple[int, int | None]:
    """(steps done, steps planned): last.ckpt's step, else the last logged one; ``max_steps``, else the plan
    the checkpoint records (a run ended by ``trainer.max_epochs``), else None (not known yet)."""
    last = run_dir / "checkpoints" / "last.ckpt"  # a file, or a DeepSpeed checkpoint directory
    info = read_checkpoint(last) if last.exists() else None
    done = info.global_step if info is not None and info.global_step is not None else \
        1 + max(int(r["step"]) for r in rows if r.get("step"))
    return done, max_steps if max_steps > 0 else (info.planned_steps if info is not None else None)


def read_run(run_dir: Path) -> Run | None:
    """The run in ``run_dir``, or None before its first logged row."""
    with open(run_dir / CONFIG_FILE) as f:
        cfg = yaml.safe_load(f)
    metrics = metrics_csv(run_dir)
    if not metrics.is_file():
        return None
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    val = [r for r in rows if _float(r, "val/top1") is not None]
    # the epoch of the error beside it: at 64k steps the epoch after the last validation is 40 steps long
    epoch = int(val[-1]["epoch"]) if val else max(int(r["epoch"]) for r in rows if r.get("epoch"))
    # one value per step: after a kill -9 the steps between the last save and the kill are logged twice (the
    # killed start's, then the resumed one's, which is the run's); the later row counts
    by_step = {r["step"]: t for r in rows if r.get("epoch") and int(r["epoch"]) == epoch
               and (t := _float(r, "train/top1")) is not None}
    train = list(by_step.values())
    step, planned = _steps(run_dir, rows, int(cfg["trainer"].get("max_steps") or -1))
    return Run(
        path=run_dir, arch=cfg["model"]["arch"], seed=cfg.get("seed_everything"), step=step, planned=planned,
        test_error=100 * (1 - _float(val[-1], "val/top1")) if val else None,
        train_error=100 * (1 - statistics.fmean(train)) if train else None,
        recipe=recipe(cfg),
    )


def _cell(values: list[float], first: float | None = None) -> str:
    """``first`` (default: the smallest value), then mean ± std of ``values`` when there are several."""
    if not values:
        return "-"
    first = min(values) if first is None else first
    if len(values) == 1:
        return f"{first:.2f}"
    return f"{first:.2f} ({statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f})"


def _groups(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """The runs of one network split by recipe, each with its label: the settings that differ between its
    groups, and the split it was scored on when that is not the test set."""
    by_recipe: dict[tuple, list[Run]] = {}
    for r in runs:
        by_recipe.setdefault(tuple(sorted(r.recipe.items())), []).append(r)
    recipes = [dict(k) for k in by_recipe]
    keys = sorted({k for rec in recipes for k in rec})
    differ = [k for k in keys if len({rec.get(k) for rec in recipes}) > 1]
    out = []
    for rec, mine in zip(recipes, by_recipe.values()):
        said = [f"{k.removeprefix('model.arch_kwargs.')}: {rec.get(k, 'unset')}" for k in differ]
        if mine[0].scored_on != "test" and "data.val_split" not in differ:
            said.append(f"data.val_split: {mine[0].scored_on}")
        out.append((", ".join(said), mine))
    return sorted(out, key=lambda group: group[0])


def table(runs: list[Run]) -> str:
    """One markdown row per network and recipe, in the paper's order (plain nets after the residual ones)."""
    def order(arch: str) -> tuple:
        depth = "".join(c for c in arch.rsplit("resnet", 1)[-1] if c.isdigit())
        return (arch.startswith("plain_"), int(depth) if depth else 0, arch)

    lines = ["| network | runs done | test error %: best (mean ± std) | train error % of the best run, its epoch "
             "(mean ± std) | paper's test error % |",
             "| --- | --- | --- | --- | --- |"]
    for arch in sorted({r.arch for r in runs}, key=order):
        for label, mine in _groups([r for r in runs if r.arch == arch]):
            done = [r for r in mine if r.done]
            going = ", ".join(f"seed {r.seed}: checkpoint at step {r.step} of {r.planned or '?'}"
                              for r in mine if not r.done)
            split = mine[0].scored_on
            shortcut = mine[0].recipe.get("model.arch_kwargs.shortcut", "A")  # the CIFAR nets' default: A
            plain = arch.startswith("plain_") or str(mine[0].recipe.get("model.arch_kwargs.plain")).lower() == "true"
            part = mine[0].scored_part
            paper = (f"- (scored on split {split}, not test)" if split != "test" else
                     f"- (scored on part of the test set: trainer.limit_val_batches {part})" if part else
                     "-" if plain else  # the paper gives plain nets' errors in its figures only
                     "- (the paper's are option A)" if shortcut != "A" else PAPER.get(arch, "-"))
            scored = [r for r in done if r.test_error is not None]
            best = min(scored, key=lambda r: r.test_error) if scored else None
            # the train error beside the best test error is that same run's, not the smallest of another run
            trains = [r.train_error for r in done if r.train_error is not None]
            train = "-" if best is None or best.train_error is None else _cell(trains, best.train_error)
            lines.append(f"| `{arch}`" + (f" ({label})" if label else "") + f" | {len(done)} of {len(mine)}" +
                         (f" ({going})" if going else "") +
                         f" | {_cell([r.test_error for r in scored])} | {train} | {paper} |")
    return "\n".join(lines)


def repeated_seeds(runs: list[Run]) -> list[str]:
    """A seed that two runs of one network and recipe share: the same run twice, not two samples."""
    seen: dict[tuple, Path] = {}
    said = []
    for r in runs:
        key = (r.arch, tuple(sorted(r.recipe.items())), r.seed)
        if key in seen:
            said.append(f"cifar10_table: {r.path} and {seen[key]}: the same network, recipe and seed "
                        f"{r.seed}; both counted in the row's mean")
        seen.setdefault(key, r.path)
    return said


def not_started(root: Path) -> list[str]:
    """A line for each directory of ``root`` without a config.yaml: a submitted job that has not started
    training (pending, or failed before it: a bad setting, a missing data root). Unlisted, a network's row
    would say "1 of 1" where the sweep submitted five seeds."""
    if not root.is_dir():
        return []
    return [f"cifar10_table: {d}: no {CONFIG_FILE}, its training has not started (a job still pending, or one "
            f"that stopped before it: `python -m launch status {d}`); left out"
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and not (d / CONFIG_FILE).exists()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="?", default="runs/cifar10", help="parent of the run directories, or one run directory")
    args = p.parse_args(argv)
    root = Path(args.runs)
    if not root.is_dir():
        print(f"cifar10_table: {root} does not exist (or is no folder): give the parent of the run directories",
              file=sys.stderr)
        return 2
    # one run directory (its checkpoints/, csv/ are no runs not started yet): a table of that run
    single = (root / CONFIG_FILE).is_file()
    configs = [root / CONFIG_FILE] if single else sorted(root.glob(f"*/{CONFIG_FILE}"))
    for line in [] if single else not_started(root):
        print(line, file=sys.stderr)
    if not configs:
        print(f"cifar10_table: no run directories (*/{CONFIG_FILE}) in {root}", file=sys.stderr)
        return 2
    runs = []
    for c in configs:
        try:
            run = read_run(c.parent)
        except (OSError, KeyError, ValueError, TypeError, yaml.YAMLError, LaunchError) as e:
            print(f"cifar10_table: {c.parent}: cannot read it ({e}); left out", file=sys.stderr)
            continue
        if run is None:
            print(f"cifar10_table: {c.parent}: nothing logged yet; left out", file=sys.stderr)
        else:
            runs.append(run)
    for line in repeated_seeds(runs):
        print(line, file=sys.stderr)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
