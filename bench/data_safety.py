"""Data safety under concurrent writers and kills, through the command line (issue 18).

Each try: the output ``OUT`` (a model with external data, tagged 0) is written at the same time by
two ``graphopt optimize`` processes (sources tagged 1 and 2, every weight equal to the tag, external
data). Each process gets, at random, SIGTERM, SIGKILL or nothing, at a random moment of its save:
once its temporary folder ``.graphopt-<pid>-*`` appears beside ``OUT``, after a delay drawn
uniformly from [0, the save time measured beforehand, undisturbed] (two writers contend, so
some signals land during the final renames, some just after them).

After both processes ended, every try must show: ``OUT`` a complete model whose weights are its own
write's (tag 0, 1 or 2, never a model of one write with another's data); exit codes 0, 143 (SIGTERM)
or killed (SIGKILL); one ``interrupted`` line and no traceback after SIGTERM; the sources
byte-identical; no temporary left unless a SIGKILL landed; and the next write into the folder
removes whatever a SIGKILL left (temporaries, data files published without their model).

Run: ``python bench/data_safety.py [--tries 100] [--size 2048] [--seed 18] [--no-write]``; writes
bench/results/data_safety.md and prints it. ``tests/test_data_safety.py`` runs two tries of it.
Exit status 1 when any try broke a promise (each failure is printed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import hashlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphopt.core.model import Model
from graphopt.core.output import TEMP_PREFIX, data_file_pattern
from graphopt.core.saver import save
from graphopt.testing import read_tag, tagged_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "data_safety.md"
GRAPHOPT = Path(sys.executable).with_name("graphopt")
#: a run still going after this long is a hang: killed and counted as a failure
TIMEOUT_S = 300
FATES = ("SIGTERM", "SIGKILL", "none")


def _cmd() -> list[str]:
    return [str(GRAPHOPT)] if GRAPHOPT.is_file() else [sys.executable, "-m", "graphopt.cli"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _temps(folder: Path, pid: int | None = None) -> list[str]:
    prefix = TEMP_PREFIX if pid is None else f"{TEMP_PREFIX}{pid}-"
    try:
        return sorted(n for n in os.listdir(folder) if n.startswith(prefix))
    except FileNotFoundError:
        return []


class Forked:
    """``graphopt.cli.main(argv)`` in a forked child of this process (whose imports are done):
    the command line's code path (signal handlers, job, save, exit status) without the seconds
    each new interpreter spends importing numpy, onnx and onnxruntime. Popen's interface as far
    as the bench uses it (``pid``, ``poll``, ``kill``, ``communicate``, ``returncode``)."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        from graphopt.cli import main as cli_main  # noqa: PLC0415 - imported once, before forks

        self.stderr = stderr
        self.returncode: int | None = None
        fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pid = os.fork()
        if pid == 0:  # the child: main() and nothing else
            code = 99
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(fd, 2)
                code = cli_main(argv)
            except BaseException:  # noqa: BLE001 - main() lets nothing out; 99 tells if it did
                code = 99
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def communicate(self) -> tuple[None, str]:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return None, self.stderr.read_text(errors="replace")


Run = Forked | subprocess.Popen[str]


@dataclass
class Stats:
    """What the tries did and saw."""

    tries: int = 0
    failures: list[str] = field(default_factory=list)
    #: (signal, phase) -> count; phase: "saving" (the temporary was there when the signal was
    #: sent) or "after" (the save had ended, or the process had)
    kills: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    #: exit status -> count ("0", "143", "SIGKILL")
    exits: collections.Counter[str] = field(default_factory=collections.Counter)
    #: what OUT held after the try: "old" (tag 0), "new A", "new B"
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: tries that left a temporary (after a SIGKILL) / a data file without its model
    left_temp: int = 0
    left_data: int = 0
    #: interrupted runs that said "already written: OUT" (the signal came after the publication)
    said_written: int = 0
    #: interrupted runs that said "no output written" although OUT holds their model
    false_reports: int = 0
    save_s: float = 0.0
    wall_s: float = 0.0


class Bench:
    """The sources, the output folder, and one try at a time."""

    def __init__(
        self, work: Path, size: int, rng: np.random.Generator, exec_runs: bool = False
    ) -> None:
        self.rng = rng
        self.size = size
        self.work = work
        self.exec_runs = exec_runs
        self.forks = 0
        src = work / "src"
        src.mkdir()
        self.sources = []
        for tag in (1.0, 2.0):
            p = src / f"m{int(tag)}.onnx"
            onnx.save(
                tagged_model(tag, size),
                str(p),
                save_as_external_data=True,
                location=p.name + ".data",
            )
            self.sources.append(p)
        self.shas = {p: _sha(p) for p in src.iterdir()}
        self.out_dir = work / "out"
        self.out = self.out_dir / "out.onnx"
        self.pattern = data_file_pattern(self.out.name)

    def reset(self) -> None:
        """OUT back to the old complete output (tag 0), written the way graphopt writes."""
        save(Model.from_onnx(tagged_model(0.0, self.size)), self.out, external=True)

    def start(self, src: Path) -> Run:
        argv = ["optimize", str(src), "-o", str(self.out), "--no-verify"]
        argv += ["--passes", "eliminate-dead"]
        if self.exec_runs:
            return subprocess.Popen(
                _cmd() + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        self.forks += 1
        return Forked(argv, self.work / f"stderr-{self.forks}.txt")

    def measure_save(self) -> float:
        """Seconds a run's temporary folder exists (its save: staging, publishing, removal of the
        folder), median of two undisturbed runs."""
        times = []
        for src in self.sources:
            self.reset()
            p = self.start(src)
            seen = gone = None
            while p.poll() is None and gone is None:
                present = bool(_temps(self.out_dir, p.pid))
                if seen is None and present:
                    seen = time.perf_counter()
                elif seen is not None and not present:
                    gone = time.perf_counter()
                time.sleep(0.001)
            p.communicate()
            if p.returncode != 0 or seen is None:
                raise RuntimeError(f"calibration run failed (exit {p.returncode})")
            times.append((gone or time.perf_counter()) - seen)
        return float(np.median(times))

    def one_try(self, i: int, save_s: float, stats: Stats) -> None:
        self.reset()
        fates = [FATES[int(k)] for k in self.rng.integers(0, 3, 2)]
        delays = self.rng.uniform(0.0, save_s, 2)
        procs = [self.start(s) for s in self.sources]
        when: list[float | None] = [None, None]  # the moment to send the signal
        sent: list[str | None] = [None, None]
        t0 = time.perf_counter()
        while any(p.poll() is None for p in procs) and time.perf_counter() - t0 < TIMEOUT_S:
            now = time.perf_counter()
            for k, p in enumerate(procs):
                if fates[k] == "none" or sent[k] is not None:
                    continue
                due = when[k]
                if due is None and _temps(self.out_dir, p.pid):
                    due = when[k] = now + float(delays[k])
                if due is not None and now >= due and p.poll() is None:
                    saving = bool(_temps(self.out_dir, p.pid))
                    os.kill(p.pid, getattr(signal, fates[k]))
                    sent[k] = fates[k]
                    stats.kills[(fates[k], "saving" if saving else "after")] += 1
            time.sleep(0.001)
        for p in procs:
            if p.poll() is None:
                p.kill()
                stats.failures.append(f"try {i}: pid {p.pid} hung (> {TIMEOUT_S} s)")
        errs = [p.communicate()[1] for p in procs]
        for k, (p, err) in enumerate(zip(procs, errs, strict=True)):
            rc = p.returncode
            assert rc is not None  # communicate() waited
            stats.exits[signal.Signals(-rc).name if rc < 0 else str(rc)] += 1
            # SIGTERM: 143 (interrupted) or, arriving after main() restored the default handler,
            # the default action (-15); both after a complete run are fine
            allowed = {0} | ({143, -signal.SIGTERM} if sent[k] == "SIGTERM" else set())
            allowed |= {-signal.SIGKILL} if sent[k] == "SIGKILL" else set()
            if rc not in allowed:
                stats.failures.append(f"try {i}: {fates[k]} run exited {rc}: {err.strip()}")
            if "Traceback" in err:
                stats.failures.append(f"try {i}: traceback: {err.strip()}")
            if rc == 143:
                lines = [ln for ln in err.splitlines() if not ln.startswith("graphopt: warning:")]
                if len(lines) != 1 or "interrupted" not in lines[0]:
                    stats.failures.append(f"try {i}: SIGTERM output: {err.strip()}")
        try:
            tag = read_tag(self.out)
        except Exception as exc:  # noqa: BLE001 - a broken output is the failure counted here
            stats.failures.append(f"try {i}: output broken: {type(exc).__name__}: {exc}")
        else:
            stats.outcomes[{0.0: "old", 1.0: "new A", 2.0: "new B"}[tag]] += 1
            if tag == 0.0 and 0 in [p.returncode for p in procs]:
                stats.failures.append(f"try {i}: a run exited 0 but the old output is there")
            for k, err in enumerate(errs):  # "no output written" must be true
                if "no output written" in err and tag == float(k + 1):
                    stats.failures.append(f"try {i}: run {k} said 'no output written': {err}")
                    stats.false_reports += 1
                elif "already written" in err:
                    stats.said_written += 1
        temps = _temps(self.out_dir)
        if temps and "SIGKILL" not in sent:
            stats.failures.append(f"try {i}: temporaries left without SIGKILL: {temps}")
        stats.left_temp += bool(temps)
        data = [n for n in os.listdir(self.out_dir) if self.pattern.match(n)]
        stats.left_data += len(data) > 1
        if i % 10 == 9 or i == 0:
            self.check_sources(i, stats)
        stats.tries += 1

    def check_sources(self, i: int, stats: Stats) -> None:
        if {p: _sha(p) for p in self.shas} != self.shas:
            stats.failures.append(f"try {i}: a source file changed")

    def check_cleanup(self, stats: Stats) -> None:
        """The next write removes what SIGKILL left: no temporary, one data file."""
        self.reset()
        temps = _temps(self.out_dir)
        data = [n for n in os.listdir(self.out_dir) if self.pattern.match(n)]
        if temps or len(data) != 1:
            stats.failures.append(f"after the next write: temporaries {temps}, data files {data}")


def run(tries: int, size: int, seed: int, exec_runs: bool = False) -> Stats:
    if not exec_runs:  # every import before the first fork (the children share them)
        from graphopt.cli import build_parser  # noqa: PLC0415

        build_parser(["optimize"])
    stats = Stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphopt-data-safety-") as tmp:
        bench = Bench(Path(tmp), size, np.random.default_rng(seed), exec_runs)
        stats.save_s = bench.measure_save()
        for i in range(tries):
            bench.one_try(i, stats.save_s, stats)
            print(f"try {i + 1}/{tries}: {len(stats.failures)} failures", file=sys.stderr)
        bench.check_sources(tries, stats)
        bench.check_cleanup(stats)
    stats.wall_s = time.perf_counter() - t0
    return stats


def markdown(stats: Stats, size: int, seed: int, exec_runs: bool = False) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mb = size * size * 4 / 1e6
    lines = [
        "# Data safety: two writers of one output, killed at random points of their saves",
        "",
        f"Date: {now}. Machine: {platform.machine()}, {os.cpu_count()} cores (shared). "
        f"Command: `python bench/data_safety.py --tries {stats.tries} --size {size} "
        f"--seed {seed}{' --exec' if exec_runs else ''}`. Wall time {stats.wall_s:.0f} s.",
        "",
        "Each try: two `graphopt optimize` runs ("
        + ("new processes" if exec_runs else "forked processes calling `graphopt.cli.main`")
        + f") write the same `-o` (external data, {mb:.0f} MB each) over an old complete "
        "output; each gets SIGTERM, SIGKILL or nothing at a random moment of its save (save "
        f"time measured undisturbed: {stats.save_s * 1000:.0f} ms).",
        "",
        "| what | count |",
        "|---|---:|",
        f"| tries | {stats.tries} |",
        f"| **failures (mixed or broken output, wrong exit, traceback, leftover)** | "
        f"**{len(stats.failures)}** |",
    ]
    for (sig, phase), n in sorted(stats.kills.items()):
        lines.append(
            f"| {sig} sent {'during the save' if phase == 'saving' else 'after it'} | {n} |"
        )
    for k in ("old", "new A", "new B"):
        lines.append(f"| output afterwards: {k} complete output | {stats.outcomes.get(k, 0)} |")
    for k, n in sorted(stats.exits.items()):
        lines.append(f"| runs exiting {k} | {n} |")
    lines.append(f"| SIGTERM runs saying 'already written' | {stats.said_written} |")
    lines.append(f"| SIGTERM runs saying 'no output written' wrongly | {stats.false_reports} |")
    lines.append(f"| tries leaving a temporary (SIGKILL) | {stats.left_temp} |")
    lines.append(f"| tries leaving a data file without its model (SIGKILL) | {stats.left_data} |")
    lines.append("")
    lines.append(
        "After the last try the next write removed every temporary and orphaned data file"
        + (" (checked)." if not any("next write" in f for f in stats.failures) else ": NOT.")
    )
    for f in stats.failures:
        lines.append(f"- FAILURE {f}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--tries", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048, help="weights: SIZE x SIZE float32")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--no-write", action="store_true", help="print only, do not write results")
    ap.add_argument(
        "--exec",
        dest="exec_runs",
        action="store_true",
        help="start each run as a new `graphopt` process (default: fork this process, whose "
        "imports are done, and call graphopt.cli.main: the same code path, much faster)",
    )
    args = ap.parse_args()
    stats = run(args.tries, args.size, args.seed, args.exec_runs)
    text = markdown(stats, args.size, args.seed, args.exec_runs)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    print(text)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
