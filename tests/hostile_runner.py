"""Run graphopt commands on crafted cases, in this process, and print what happened.

``python tests/hostile_runner.py SPEC.json`` reads a list of jobs ``{"case", "folder", "model",
"data", "commands"}``, runs each command through :func:`graphopt.cli.main` (stderr captured per
command, stdout dropped), and prints one JSON object: per case and command the exit code, stderr
and the files left in the command's output folder, plus this process's peak resident memory
(``ru_maxrss``). A command that kills the process (a crash) leaves ``CASE COMMAND`` in
``SPEC.json.running`` for the caller to report.

Used by tests/test_hostile_inputs.py (one process per group of cases, so that a crash or a
runaway allocation cannot take the test run with it) and by hand::

    python tests/hostile_runner.py --case bomb-tile inspect optimize
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

#: command -> its arguments; {m} the model, {o} the command's empty output folder, {d} the case
#: folder (calibration data, input arrays)
COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "{m}", "--json"],
    "optimize": ["optimize", "{m}", "-o", "{o}/opt.onnx", "--report", "{o}/report.html"],
    "plan": ["plan", "{m}", "-o", "{o}/plan.onnx"],
    "quantize": ["quantize", "{m}", "-o", "{o}/q.onnx", "--calib", "{d}/calib.npz"],
    "prune": ["prune", "{m}", "-o", "{o}/p.onnx", "--ratio", "0.5"],
    "fp16": ["fp16", "{m}", "-o", "{o}/h.onnx"],
    "run": ["run", "{m}", "-o", "{o}/r.npz"],
    "diff": ["diff", "{m}", "{m}"],
    "compile": ["compile", "{m}", "-o", "{o}/lib.so", "--no-schedules"],
}

#: the same commands reading the case's data files (the data cases are about those files)
DATA_COMMANDS: dict[str, list[str]] = {
    "quantize": ["quantize", "{m}", "-o", "{o}/q.onnx", "--calib", "{d}/calib.npz"],
    "prune": [
        "prune",
        "{m}",
        "-o",
        "{o}/p.onnx",
        "--ratio",
        "0.5",
        "--criterion",
        "activation",
        "--calib",
        "{d}/calib.npz",
    ],
    "run": ["run", "{m}", "-o", "{o}/r.npz", "--input", "x={d}/x.npy"],
    "plan": ["plan", "{m}", "-o", "{o}/plan.onnx", "--prove", "--feeds", "{d}/feeds.npz"],
    "optimize": [
        "optimize",
        "{m}",
        "-o",
        "{o}/opt.onnx",
        "--recipe",
        "edge-int8",
        "--calib",
        "{d}/calib.npz",
    ],
}


def args_for(command: str, model: Path, folder: Path, out: Path, data: bool) -> list[str]:
    table = DATA_COMMANDS if data else COMMANDS
    return [a.format(m=model, o=out, d=folder) for a in table[command]]


def run_jobs(spec: Path) -> dict[str, object]:
    from graphopt.cli import main as graphopt_main  # noqa: PLC0415 - after argv is read

    jobs = json.loads(spec.read_text())
    running = spec.with_name(spec.name + ".running")
    results: dict[str, dict[str, dict[str, object]]] = {}
    for job in jobs:
        folder, model = Path(job["folder"]), Path(job["model"])
        case = results.setdefault(job["case"], {})
        for command in job["commands"]:
            out = folder / f"out-{command}"
            out.mkdir(exist_ok=True)
            running.write_text(f"{job['case']} {command}")
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = graphopt_main(args_for(command, model, folder, out, job["data"]))
                except SystemExit as exc:  # argparse
                    rc = int(exc.code or 0)
            case[command] = {
                "rc": rc,
                "stderr": err.getvalue(),
                "left": sorted(p.name for p in out.iterdir()),
            }
    running.unlink(missing_ok=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"results": results, "peak_bytes": peak}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--case":  # by hand: build one case in a temporary folder and run it
        sys.path.insert(0, str(Path(__file__).parent))
        from hostile_cases import CASES_BY_NAME  # noqa: PLC0415

        case = CASES_BY_NAME[argv[1]]
        tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
        try:
            model = case.build(tmp / case.name)
            spec = tmp / "spec.json"
            commands = argv[2:] or list(case.commands or COMMANDS)
            job = {
                "case": case.name,
                "folder": str(tmp / case.name),
                "model": str(model),
                "data": bool(case.commands),
                "commands": commands,
            }
            spec.write_text(json.dumps([job]))
            print(json.dumps(run_jobs(spec), indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    print(json.dumps(run_jobs(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
