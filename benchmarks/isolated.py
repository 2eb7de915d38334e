"""What the benchmark scripts share: every measurement in a fresh process (so that its time
and peak memory are its own), results written as they come with the provenance of the run
(:func:`provenance`), and one mapping of a JSON setting onto ``prune`` arguments
(:func:`prune_kwargs`)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: benchmark outputs: rewriting them during a run does not make the checkout dirty
RESULTS = "benchmarks/results"
#: the keys of a JSON setting that make falcon++'s one Schedule
SCHEDULE_KEYS = ("schedule", "stages", "start", "min_step")


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``python script *args`` in a new process and return the JSON row it printed after
    ``RESULT ``; a failing run stops the benchmark with its error output."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        sys.exit(f"{Path(script).name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def run_rows(script: str, labels: list[str], seeds: list[int], out: Path, append: bool,
             shown: tuple[str, ...], extra: list[str] = ()) -> list[dict]:
    """Every (label, seed) of a benchmark in its own process (``script --one LABEL SEED
    *extra``; the label ``dense`` runs seed 0 only), each row stamped with the commit and
    written to ``out`` as it comes (after the file's earlier rows with ``append``: a row of
    the same label and seed replaces the earlier one); prints the keys ``shown`` of each
    row and returns all rows."""
    prov = provenance()
    earlier = previous(out) if append and out.exists() else None
    rows = list(earlier["rows"]) if earlier else []
    for label in labels:
        for seed in ([0] if label == "dense" else seeds):
            row = {**run_isolated(script, ["--one", label, str(seed), *extra]),
                   "commit": prov["commit"], "dirty": prov["dirty"]}
            rows = [r for r in rows if (r["label"], r["seed"]) != (label, seed)] + [row]
            print(json.dumps({k: row.get(k) for k in shown}), flush=True)
            save_rows(out, rows, earlier["commands"] if earlier else None, prov,
                      earlier["provenance"] if earlier else None)
    return rows


# -- machine-independent time ---------------------------------------------------------------
def unit_seconds(model, x, y, n: int = 1000, batch: int = 100, repeats: int = 3) -> float:
    """One *unit*: the seconds of a plain batched forward and backward pass (cross-entropy,
    gradients of every parameter, no optimizer step) over the first ``n`` samples of
    ``(x, y)`` in batches of ``batch``, median of ``repeats``; ``model`` is left as it was.
    A run's seconds divided by the unit measured beside it is a time that does not depend
    on the machine's speed."""
    import statistics
    import time

    import torch

    was = model.training
    model.eval()
    times = []
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            for a in range(0, n, batch):
                loss = torch.nn.functional.cross_entropy(model(x[a:a + batch]), y[a:a + batch])
                torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            times.append(time.perf_counter() - t)
    finally:
        model.train(was)
    return statistics.median(times)


# -- provenance ------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def provenance() -> dict:
    """Where and on what a run ran: the git ``commit`` of this checkout and whether tracked
    files differ from it (``dirty``; the results under benchmarks/results/ do not count),
    the torch and Python versions, the CPU model, the number of logical cores and the UTC
    date and time (now)."""
    import torch

    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                  f":(exclude,top){RESULTS}")
    return {
        "commit": head.strip() if head else "unknown (not a git checkout)",
        "dirty": bool(status.strip()) if status is not None else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- results files ---------------------------------------------------------------------------
def write_results(path: Path, record: dict, prov: dict,
                  earlier_provenance: list[dict] | None = None) -> None:
    """Write ``record`` to ``path`` as JSON with ``"provenance"`` (``prov``) at the top;
    ``earlier_provenance`` (of the runs whose rows the file already held) follows it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"provenance": prov}
    if earlier_provenance:
        out["earlier_provenance"] = earlier_provenance
    out.update({k: v for k, v in record.items() if k not in out})
    path.write_text(json.dumps(out, indent=1))


def save_rows(path: Path, rows: list[dict], earlier: list[str] | None = None,
              prov: dict | None = None, earlier_provenance: list[dict] | None = None) -> None:
    """Write ``{"provenance": ..., "command": ..., "rows": rows}`` to ``path``; called after
    every row so that an interrupted benchmark keeps what it measured. ``prov``: the run's
    provenance (take it once, when the run starts; default: now). ``earlier``: the commands
    that made rows already in the file (then ``"commands"`` lists them all, this one last),
    ``earlier_provenance`` their provenance (from :func:`previous`)."""
    command = " ".join(["python", *sys.argv])
    record: dict = {"command": command, "rows": rows}
    if earlier:
        record = {"commands": [*earlier, command], "rows": rows}
    write_results(path, record, prov or provenance(), earlier_provenance)


def previous(path: Path) -> dict:
    """What a results file holds of the runs that wrote it: its ``rows``, their
    ``commands`` and every ``provenance`` recorded (oldest first)."""
    saved = json.loads(path.read_text())
    commands = saved.get("commands") or ([saved["command"]] if "command" in saved else [])
    provs = list(saved.get("earlier_provenance", []))
    if "provenance" in saved:
        provs.append(saved["provenance"])
    return {"rows": saved.get("rows", []), "commands": commands, "provenance": provs}


def commands_of(path: Path) -> list[str]:
    """The command(s) recorded in a results file (``command`` or ``commands``)."""
    return previous(path)["commands"]


# -- settings --------------------------------------------------------------------------------
def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def prune_kwargs(setting: dict, method: str = "falcon++") -> dict:
    """``prune`` keyword arguments from a JSON setting (a tuning grid row, ``--kwargs``) for
    ``method``.

    - SolverOptions fields (``ridges``, ``max_iter``, ``cost_exponents``, ``saliencies``,
      ``obs_steps``, ...) become one ``solver``: for falcon++
      ``falcon_prune.multistage_options(**fields)`` (falcon++'s defaults with them changed),
      for other methods the method's default SolverOptions with them changed; JSON lists
      become tuples. ``solver`` may also be given as a dict of fields.
    - ``schedule`` (a shape name, a list of kept fractions or a dict of Schedule fields),
      ``stages``, ``start`` and ``min_step`` become one ``schedule=falcon_prune.Schedule``:
      falcon++'s default shape (cubic) and number of stages unless given, and its default
      ``min_step`` for a named shape unless given (an explicit list of levels is taken as
      it is, as ``prune`` does).
    - Everything else is passed on as it is; ``prune`` refuses what ``method`` does not use.
    """
    import falcon_prune as fp

    kw = dict(setting)
    base = fp.defaults(method)
    fields = {f.name for f in dataclasses.fields(fp.SolverOptions)}
    opts = _tuples({k: kw.pop(k) for k in list(kw) if k in fields})
    if isinstance(kw.get("solver"), dict):
        opts = {**_tuples(kw.pop("solver")), **opts}
    if opts:
        if method == "falcon++":
            kw["solver"] = fp.multistage_options(**opts)
        elif base.solver is not None:
            kw["solver"] = base.solver.replace(**opts)
        else:  # prune refuses it with the reason
            kw["solver"] = fp.SolverOptions(**opts)
    if any(k in kw for k in SCHEDULE_KEYS):
        kw["schedule"] = _schedule({k: kw.pop(k) for k in SCHEDULE_KEYS if k in kw})
    return kw


def _schedule(given: dict):
    """One Schedule from the setting's ``schedule``, ``stages``, ``start``, ``min_step``."""
    import falcon_prune as fp

    default = fp.defaults("falcon++").schedule
    shape = given.pop("schedule", default.kind)
    if isinstance(shape, dict):
        if given:
            raise ValueError(f"give {sorted(given)} inside the schedule, not beside it")
        return fp.Schedule(**_tuples(shape))
    if isinstance(shape, (list, tuple)):
        if "start" in given:
            raise ValueError("start does not apply to an explicit list of levels")
        if given.get("stages", len(shape)) != len(shape):
            raise ValueError(f"stages={given['stages']} disagrees with the {len(shape)} levels")
        return fp.Schedule(levels=tuple(shape), min_step=given.get("min_step", 0.0))
    return fp.Schedule(given.get("stages", default.stages), shape, given.get("start"),
                       min_step=given.get("min_step", default.min_step))
