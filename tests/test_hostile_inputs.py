"""Every command against every crafted case of issue 15 (tests/hostile_cases.py).

Value types (optional, sequence, map, string, every element type ONNX defines), non-UTF-8 strings,
lying external data fields, nodes onnxruntime refuses, constant-folding bombs, and corrupt, empty,
NaN-only, wrongly named, typed or ranked calibration data and feeds. For each case and command:

- exit 2 with one line ``graphopt: error: ...``, no traceback and nothing in the output folder; or,
  where the case is a valid model of an exotic kind (``expect="either"``, and ``inspect`` for the
  models that only onnxruntime cannot run), exit 0 with every ONNX file written loadable by
  onnxruntime (where onnxruntime loads the input) or at least passing ``onnx.checker``;
- never exit 1, never a crash (the cases run in a child process: a SIGSEGV is reported as one);
- the case's files are byte-identical afterwards;
- the child's peak resident memory stays under 2 GB (``ru_maxrss``), bombs and 256 GB headers
  included.

Cases run in one child process per group (imports are paid once per group). By default the dtype
group covers a handful of element types; ``GRAPHOPT_HOSTILE_ALL=1`` runs every type ONNX defines.
``compile`` (TVM) runs in its own test, marked ``tvm``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from hostile_cases import CASES, Case

RUNNER = Path(__file__).with_name("hostile_runner.py")
PEAK_LIMIT = 2 * 10**9
COMMANDS = ("inspect", "optimize", "plan", "quantize", "prune", "fp16", "run", "diff")
HAVE_TVM = importlib.util.find_spec("tvm") is not None
ALL = os.environ.get("GRAPHOPT_HOSTILE_ALL", "") not in ("", "0")
#: element types the dtype group covers by default (all with GRAPHOPT_HOSTILE_ALL=1)
DEFAULT_TYPES = ("bfloat16", "float8e4m3fn", "int4", "float4e2m1", "int2", "complex64")


def _selected(case: Case) -> bool:
    return ALL or case.group != "dtypes" or case.name.startswith(DEFAULT_TYPES)


GROUPS = sorted({c.group for c in CASES})


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _loads_in_ort(path: Path) -> str | None:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return None
    except Exception as exc:  # noqa: BLE001
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def run_cases(cases: list[Case], commands: tuple[str, ...], tmp: Path) -> list[str]:
    """Run ``commands`` on ``cases`` in one child process; the list of broken promises."""
    jobs, before = [], {}
    for case in cases:
        folder = tmp / case.name
        model = case.build(folder)
        before[case.name] = _hashes(folder)
        cmds = [c for c in (case.commands or commands) if c in commands]
        jobs.append(
            {
                "case": case.name,
                "folder": str(folder),
                "model": str(model),
                "data": bool(case.commands),
                "commands": cmds,
            }
        )
    spec = tmp / "spec.json"
    spec.write_text(json.dumps(jobs))
    r = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=RUNNER.parent,
    )
    running = spec.with_name(spec.name + ".running")
    if r.returncode != 0 or not r.stdout.strip():
        where = running.read_text() if running.exists() else "?"
        return [f"the child process died (exit {r.returncode}) in {where}: {r.stderr[-2000:]}"]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    problems = []
    if report["peak_bytes"] > PEAK_LIMIT:
        problems.append(f"peak memory {report['peak_bytes'] / 1e9:.2f} GB > 2 GB")
    by_name = {c.name: c for c in cases}
    for name, results in report["results"].items():
        case = by_name[name]
        folder = tmp / name
        input_loads = _loads_in_ort(folder / "model.onnx") is None
        for command, res in results.items():
            problems += _judge(case, command, res, folder / f"out-{command}", input_loads)
        # outputs live in out-*; everything the case wrote must be as it was
        after = {k: v for k, v in _hashes(folder).items() if not k.startswith("out-")}
        if after != before[name]:
            problems.append(f"{name}: the case's files were modified")
    return problems


def _judge(case: Case, command: str, res: dict, out: Path, input_loads: bool) -> list[str]:
    rc, err, left = res["rc"], res["stderr"], res["left"]
    label = f"{case.name} / {command}"
    if "Traceback" in err:
        return [f"{label}: traceback on stderr: {err[-500:]}"]
    may_succeed = (
        case.expect == "either"
        or (case.expect == "inspect" and command == "inspect")
        or command in case.may_succeed
    )
    if rc == 2:
        lines = err.strip().splitlines()
        if case.expect == "inspect" and command == "inspect":
            return [f"{label}: inspect refused a model it can describe: {err.strip()}"]
        if len(lines) != 1 or not lines[0].startswith("graphopt: error: "):
            return [f"{label}: exit 2 without one 'graphopt: error:' line: {err!r}"]
        if left:
            return [f"{label}: refused but left {left} behind"]
        missing = [w for w in case.words if w.lower() not in err.lower()]
        return [f"{label}: {missing} missing from: {err.strip()}"] if missing else []
    if rc == 0 and may_succeed:
        problems = []
        for name in left:
            p = out / name
            if p.suffix != ".onnx":
                continue
            if input_loads:
                why = _loads_in_ort(p)
                if why is not None:
                    problems.append(f"{label}: output {name} does not load in onnxruntime: {why}")
            else:
                try:
                    onnx.checker.check_model(str(p))
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"{label}: output {name} fails onnx.checker: {exc}")
        return problems
    return [f"{label}: exit {rc}: {err.strip()[:400]}"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_command_on_crafted_inputs(group: str, tmp_path: Path) -> None:
    cases = [c for c in CASES if c.group == group and _selected(c)]
    problems = run_cases(cases, COMMANDS, tmp_path)
    assert not problems, "\n".join(problems)


@pytest.mark.tvm
@pytest.mark.skipif(not HAVE_TVM, reason="apache-tvm is not installed")
@pytest.mark.parametrize("group", [g for g in GROUPS if g != "data"])
def test_compile_on_crafted_inputs(group: str, tmp_path: Path) -> None:
    cases = [c for c in CASES if c.group == group and _selected(c)]
    problems = run_cases(cases, ("compile",), tmp_path)
    assert not problems, "\n".join(problems)
