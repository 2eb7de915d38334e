"""What the benchmark scripts share: every measurement in a fresh process (so that its time
and peak memory are its own), and results written as they come."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_isolated(script: str, args: list[str]) -> dict:
    """Run ``python script *args`` in a new process and return the JSON row it printed after
    ``RESULT ``; a failing run stops the benchmark with its error output."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        sys.exit(f"{Path(script).name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def save_rows(path: Path, rows: list[dict], earlier: list[str] | None = None) -> None:
    """Write ``{"command": ..., "rows": rows}`` to ``path``; called after every row so that an
    interrupted benchmark keeps what it measured. ``earlier``: the commands that made rows
    already in the file (then ``"commands"`` lists them all, this one last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    out = {"command": command, "rows": rows}
    if earlier:
        out = {"commands": [*earlier, command], "rows": rows}
    path.write_text(json.dumps(out, indent=1))


def commands_of(path: Path) -> list[str]:
    """The command(s) recorded in a results file (``command`` or ``commands``)."""
    saved = json.loads(path.read_text())
    return saved.get("commands") or [saved["command"]]


def prune_kwargs(setting: dict) -> dict:
    """``prune`` keyword arguments from a JSON setting (a tuning grid row, ``--kwargs``):
    SolverOptions fields become ``options`` on top of falcon++'s defaults
    (``falcon_prune.multistage_options``; JSON lists become tuples), and ``start`` or
    ``min_step`` makes ``stages``, ``schedule`` (default cubic), ``start`` and ``min_step``
    (default falcon++'s) one Schedule. Everything else is passed on as it is."""
    import falcon_prune as fp

    kw = dict(setting)
    fields = set(fp.SolverOptions.__dataclass_fields__) - {"progress", "history", "timings"}
    opts = {k: kw.pop(k) for k in list(kw) if k in fields}
    if opts:
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}
        kw["options"] = fp.multistage_options(progress=False, **opts)
    if "start" in kw or "min_step" in kw:
        defaults = fp.api.MULTISTAGE_DEFAULTS
        kw["schedule"] = fp.Schedule(kw.pop("stages", defaults["stages"]),
                                     kw.pop("schedule", "cubic"), kw.pop("start", None),
                                     min_step=kw.pop("min_step", defaults["min_step"]))
    return kw
