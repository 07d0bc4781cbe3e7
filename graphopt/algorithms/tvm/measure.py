"""Build and time schedule candidates: a spawned builder process and TVM's RPC tracker.

One code path for every target (after AutoTVM/MetaSchedule's builder/runner split):

* **Builder** (:class:`Builder`): a worker process (a fresh interpreter) receives a kernel as
  TVMScript text (``PrimFunc.script()``: pickling TVM objects or ``tvm.ir.save_json`` is avoided,
  it crashes with some apache-tvm-ffi wheels), applies one template with its parameters
  (:func:`graphopt.algorithms.tvm.schedules.apply_template`), builds it for the target and exports
  a shared library (cross-compiled for AArch64). A candidate that crashes or hangs the worker
  costs only that candidate: the worker is killed and restarted.
* **Runner** (:class:`RPCRunner`): sessions requested from a TVM RPC tracker by device key
  (``tvm.rpc.connect_tracker(...).request(key)``); each session uploads the library, runs it once
  on seeded inputs, compares every argument with the reference candidate's (the hand rule's), and
  times it with the module's ``time_evaluator`` (the minimum over repeats: on a shared machine
  interference only adds time). With several servers under one key the candidates are measured in
  parallel, one thread per server. A session that dies (a kernel that segfaults on the board) marks
  that candidate ``crashed`` and the next candidate gets a new session.
* **Local measurement** uses the same runner: :class:`LocalTracker` starts a tracker and one or
  more servers on this host (``rpc_server.py``), or under qemu-aarch64 with the arm64 Python of
  ``scripts/install-tvm-deps.sh`` (emulated timings mean nothing; that path tests the mechanics).

Nothing here imports TVM at module level in the parent process except through ``require_tvm``.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, OptionError

logger = logging.getLogger(__name__)

RPC_SERVER_SCRIPT = Path(__file__).resolve().with_name("rpc_server.py")
#: statuses of a candidate: ok | not-applicable | build-error | wrong | run-error | crashed |
#: timeout
OK = "ok"


class MeasureError(GraphoptError):
    """The measuring infrastructure failed (no tracker, no server for the key)."""

    exit_code = 1


@dataclass
class Candidate:
    """One point of a search space: a template and its parameters (None: its hand rule)."""

    template: str
    params: dict[str, Any] | None = None

    def label(self) -> str:
        if self.params is None:
            return f"{self.template}(hand)"
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if v is not None)
        return f"{self.template}({inner})"


@dataclass
class BuildSpec:
    """What the builder needs to know about the target (picklable, no TVM objects)."""

    target: dict[str, Any]
    host: dict[str, Any] | None
    lanes: int
    cores: int
    cross_cc: str | None = None


@dataclass
class Result:
    """The outcome of one candidate."""

    candidate: Candidate
    status: str
    ms: float | None = None
    error: str | None = None
    build_s: float = 0.0
    runs: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == OK


# ---------------------------------------------------------------------- builder

_MARK = "@@graphopt-build@@ "


def build_candidate(
    script: str, template: str, params: dict[str, Any] | None, spec: BuildSpec, out: str
) -> dict[str, Any]:
    """In the builder process: parse, schedule, build, export ``out``. Returns a status dict."""
    import tvm  # noqa: PLC0415
    from tvm.script import from_source  # noqa: PLC0415

    from graphopt.algorithms.tvm import schedules  # noqa: PLC0415

    t0 = time.perf_counter()
    func = from_source(script)
    func = func.with_attr("global_symbol", "main")
    target = (
        tvm.target.Target(spec.target, host=spec.host)
        if spec.host
        else tvm.target.Target(spec.target)
    )
    try:
        with target:
            if template == "none":
                new = func
            else:
                new = schedules.apply_template(func, template, params, spec.lanes, spec.cores)
    except schedules.NotApplicable as exc:
        return {"status": "not-applicable", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a primitive refused these parameters
        return {"status": "not-applicable", "error": schedules.first_error_line(exc)}
    if new is None:
        return {"status": "not-applicable", "error": f"{template} does not match this kernel"}
    try:
        ex = tvm.compile(tvm.IRModule({"main": new.with_attr("global_symbol", "main")}), target)
        lib = getattr(ex, "mod", ex)
        if spec.cross_cc:
            from tvm.support import cc  # noqa: PLC0415

            lib.export_library(out, fcompile=cc.cross_compiler(spec.cross_cc))
        else:
            lib.export_library(out)
    except Exception as exc:  # noqa: BLE001
        return {"status": "build-error", "error": schedules.first_error_line(exc)}
    return {"status": "built", "path": out, "build_s": time.perf_counter() - t0}


def builder_main() -> None:
    """The builder process: one JSON job per stdin line, one marked JSON result per job on
    stdout (anything else TVM prints there is ignored by the parent)."""
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # TVM's FFI probes torch
    import tvm  # noqa: F401, PLC0415

    print(_MARK + json.dumps({"status": "ready"}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            res = build_candidate(
                job["script"], job["template"], job["params"], BuildSpec(**job["spec"]), job["out"]
            )
        except Exception as exc:  # noqa: BLE001 - reported, the worker lives on
            res = {"status": "build-error", "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(_MARK + json.dumps(res), flush=True)


class Builder:
    """One builder process (a fresh interpreter: ``builder_main``) building candidates; a
    candidate that crashes or hangs it costs only that candidate (it is killed and restarted)."""

    def __init__(self, spec: BuildSpec, timeout: float = 120.0, workdir: Path | None = None):
        self.spec = spec
        self.timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self._own_dir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="graphopt-tune-")) if workdir is None else workdir
        )
        self._n = 0

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from graphopt.algorithms.tvm.measure import builder_main; builder_main()",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            first = self._read(self._proc, max(self.timeout, 180.0))
            if first is None or first.get("status") != "ready":
                self._kill()
                raise MeasureError("the schedule builder process did not start")
        return self._proc

    def _read(self, proc: subprocess.Popen[str], timeout: float) -> dict[str, Any] | None:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                line = proc.stdout.readline()
                if not line:
                    return None  # the process died
                if line.startswith(_MARK):
                    return json.loads(line[len(_MARK) :])  # type: ignore[no-any-return]

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def build(self, script: str, cand: Candidate) -> dict[str, Any]:
        self._n += 1
        out = str(self.workdir / f"c{self._n}.so")
        proc = self._start()
        job = {
            "script": script,
            "template": cand.template,
            "params": cand.params,
            "spec": asdict(self.spec),
            "out": out,
        }
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            self._kill()
            return {"status": "crashed", "error": "the builder process died"}
        res = self._read(proc, self.timeout)
        if res is None:
            crashed = proc.poll() is not None
            self._kill()
            if crashed:
                return {"status": "crashed", "error": "the builder process died"}
            return {"status": "timeout", "error": f"build took over {self.timeout:.0f} s"}
        return res

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._kill()
        self._proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------- inputs


@dataclass
class KernelArgs:
    """Shapes and dtypes of a kernel's parameters, and seeded host arrays for them."""

    shapes: list[tuple[int, ...]]
    dtypes: list[str]

    def arrays(self, seed: int = 0) -> list[np.ndarray]:
        """Inputs in ranges every kernel accepts: floats in [0.5, 1.5) (log, sqrt and division
        stay finite), integers 0 (always a valid index), booleans False."""
        rng = np.random.default_rng(seed)
        out = []
        for shape, dt in zip(self.shapes, self.dtypes):
            d = np.dtype(dt) if dt != "bool" else np.dtype(np.bool_)
            if d.kind == "f":
                out.append(rng.uniform(0.5, 1.5, shape).astype(d))
            else:
                out.append(np.zeros(shape, d))
        return out


def kernel_args(func: Any) -> KernelArgs:
    """The parameter shapes and dtypes of a static-shaped PrimFunc."""
    from graphopt.algorithms.tvm.tuning_db import param_buffers  # noqa: PLC0415

    bufs = param_buffers(func)
    return KernelArgs([s for s, _d in bufs], [d for _s, d in bufs])


def _close(ref: np.ndarray, got: np.ndarray) -> bool:
    if ref.dtype.kind == "f":
        if not np.array_equal(np.isnan(ref), np.isnan(got)):
            return False
        r, g = np.nan_to_num(ref), np.nan_to_num(got)
        scale = float(np.abs(r).max()) if r.size else 0.0
        return bool(np.abs(r - g).max() <= 1e-5 + 1e-4 * scale) if r.size else True
    if ref.dtype.kind in "iu" and ref.size:
        return bool(np.abs(ref.astype(np.int64) - got.astype(np.int64)).max() <= 1)
    return bool(np.array_equal(ref, got))


# ---------------------------------------------------------------------- runner


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port).

    Raises:
        OptionError: not of that form.
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise OptionError(f"bad --rpc '{addr}': expected HOST:PORT of a TVM RPC tracker")
    return host, int(port)


class RPCRunner:
    """Times built candidates on the servers registered under ``key`` at a TVM RPC tracker."""

    def __init__(
        self,
        tracker: tuple[str, int],
        key: str,
        session_timeout: float = 120.0,
        number: int = 3,
        repeat: int = 3,
        min_repeat_ms: int = 20,
        wait_s: float = 60.0,
    ) -> None:
        self.tracker = tracker
        self.key = key
        self.session_timeout = session_timeout
        self.number = number
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms
        self.servers = self._wait_for_servers(wait_s)
        self._local = threading.local()

    def _summary(self) -> dict[str, Any]:
        from tvm import rpc  # noqa: PLC0415

        client = rpc.connect_tracker(*self.tracker)
        try:
            return dict(client.summary())
        finally:
            client.close()

    def _wait_for_servers(self, wait_s: float) -> int:
        t0 = time.monotonic()
        last: Exception | None = None
        while True:
            try:
                info = self._summary().get("queue_info", {}).get(self.key, {})
                n = int(info.get("free", 0)) + int(info.get("pending", 0))
                if n > 0:
                    return max(1, int(info.get("free", 0)))
            except Exception as exc:  # noqa: BLE001 - tracker not up yet
                last = exc
            if time.monotonic() - t0 > wait_s:
                where = f"{self.tracker[0]}:{self.tracker[1]}"
                if last is not None:
                    raise MeasureError(f"no TVM RPC tracker answers at {where} ({last})")
                raise MeasureError(
                    f"no RPC server is registered under key '{self.key}' at the tracker {where} "
                    "(start one: python graphopt/algorithms/tvm/rpc_server.py server "
                    f"--tracker {where} --key {self.key})"
                )
            time.sleep(0.5)

    def _session(self) -> Any:
        sess = getattr(self._local, "sess", None)
        if sess is None:
            from tvm import rpc  # noqa: PLC0415

            client = rpc.connect_tracker(*self.tracker)
            sess = client.request(self.key, priority=1, session_timeout=self.session_timeout)
            self._local.sess = sess
            self._local.n = 0
        return sess

    def _drop(self) -> None:
        self._local.sess = None

    def run_one(
        self, lib_path: str, args: KernelArgs, ref: list[np.ndarray] | None
    ) -> tuple[str, float | None, list[np.ndarray] | None, str | None]:
        """Upload, run once, check against ``ref`` (None: this is the reference), time.

        Returns (status, ms, outputs, error)."""
        import tvm  # noqa: PLC0415

        try:
            sess = self._session()
        except Exception as exc:  # noqa: BLE001
            raise MeasureError(f"cannot get an RPC session for '{self.key}': {exc}") from None
        try:
            self._local.n += 1
            name = f"k{threading.get_ident() % 100000}_{self._local.n}.so"
            sess.upload(lib_path, name)
            rlib = sess.load_module(name)
            dev = sess.cpu(0)
            host = args.arrays()
            targs = [tvm.runtime.tensor(a, dev) for a in host]
            rlib["main"](*targs)
            outs = [t.numpy() for t in targs]
            if ref is not None and not all(_close(r, o) for r, o in zip(ref, outs)):
                return "wrong", None, None, "differs from the reference schedule"
            te = rlib.time_evaluator(
                "main",
                dev,
                number=self.number,
                repeat=self.repeat,
                min_repeat_ms=int(self.min_repeat_ms),
            )
            res = te(*targs).results
            return OK, float(min(res)) * 1e3, outs, None
        except Exception as exc:  # noqa: BLE001 - the session died (kernel crashed) or errored
            self._drop()
            msg = str(exc).strip().splitlines()
            text = msg[-1][:200] if msg else type(exc).__name__
            status = (
                "crashed"
                if "closed" in text.lower() or "connection" in text.lower()
                else "run-error"
            )
            return status, None, None, text

    def close(self) -> None:
        self._drop()


# ---------------------------------------------------------------------- measurer


class Measurer:
    """Builds candidates with a :class:`Builder` and times them with an :class:`RPCRunner`;
    counts every candidate it timed (``measurements``)."""

    def __init__(self, builder: Builder, runner: RPCRunner) -> None:
        self.builder = builder
        self.runner = runner
        self.measurements = 0
        self.builds = 0
        self._built: dict[tuple[int, str, str], dict[str, Any]] = {}
        self._pool: cf.ThreadPoolExecutor | None = None

    def measure(
        self,
        script: str,
        args: KernelArgs,
        candidates: Sequence[Candidate],
        reference: list[np.ndarray] | None = None,
    ) -> tuple[list[Result], list[np.ndarray] | None]:
        """Build then time ``candidates`` (the first is the reference when ``reference`` is None:
        its outputs are what the others must reproduce). Builds run first, all of them, so that
        building never disturbs a timing on this host; runs go to the servers in parallel. A
        candidate built before for the same kernel (see :meth:`forget`) is not built again."""
        built: list[tuple[Candidate, dict[str, Any]]] = []
        for cand in candidates:
            key = (hash(script), cand.template, json.dumps(cand.params, sort_keys=True))
            info = self._built.get(key)
            if info is None:
                info = self.builder.build(script, cand)
                self.builds += 1
                self._built[key] = info
            built.append((cand, info))
        results: list[Result | None] = [None] * len(built)
        todo: list[int] = []
        for i, (cand, info) in enumerate(built):
            if info["status"] != "built":
                results[i] = Result(cand, info["status"], error=info.get("error"))
            else:
                todo.append(i)
        ref = reference
        if ref is None and todo:
            # the reference candidate first, alone
            first = todo.pop(0)
            cand, info = built[first]
            status, ms, outs, err = (
                self._threads().submit(self.runner.run_one, info["path"], args, None).result()
            )
            self.measurements += 1
            results[first] = Result(cand, status, ms, err, info.get("build_s", 0.0))
            ref = outs
            if ref is None:
                # no reference: nothing else can be checked
                for i in todo:
                    results[i] = Result(built[i][0], "run-error", error="no reference output")
                todo = []

        def run(i: int) -> Result:
            cand, info = built[i]
            status, ms, _o, err = self.runner.run_one(info["path"], args, ref)
            return Result(cand, status, ms, err, info.get("build_s", 0.0))

        for i, res in zip(todo, self._threads().map(run, todo)):
            results[i] = res
            self.measurements += 1
        return [r for r in results if r is not None], ref

    def _threads(self) -> cf.ThreadPoolExecutor:
        """One thread per server, kept for the whole run: each holds its RPC session."""
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max(1, self.runner.servers))
        return self._pool

    def forget(self) -> None:
        """Drop the libraries built so far (a kernel's search is over)."""
        for info in self._built.values():
            if info.get("path"):
                try:
                    os.unlink(info["path"])
                except OSError:
                    pass
        self._built.clear()

    def close(self) -> None:
        self.forget()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.runner.close()
        self.builder.close()


# ---------------------------------------------------------------------- local tracker


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> int:
    """Read the child's stdout until ``PREFIX <port>``; the port."""
    result: list[int] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(prefix):
                result.append(int(line.split()[1]))
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise MeasureError(f"{prefix.split('-')[0].lower()} did not start within {timeout:.0f} s")
    return result[0]


def qemu_server_env(root: Path, extra_path: Iterable[str] = ()) -> dict[str, str]:
    """Environment for Debian's arm64 Python under qemu-user with the aarch64 TVM wheel."""
    env = dict(
        os.environ,
        TVM_USE_RUNTIME_LIB="1",
        PYTHONHOME=str(root / "usr"),
        PYTHONPATH=os.pathsep.join([str(root / "opt" / "site-packages"), *extra_path]),
        PYTHONNOUSERSITE="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


class LocalTracker:
    """A TVM RPC tracker and ``servers`` RPC servers under ``key`` on this host (``kind="host"``)
    or under qemu-aarch64 (``kind="qemu-aarch64"``), started as child processes and stopped on
    :meth:`close`. ``address`` is the tracker's (host, port)."""

    def __init__(
        self,
        key: str = "graphopt-local",
        servers: int = 1,
        kind: str = "host",
        start_timeout: float | None = None,
        threads: int | None = None,
    ) -> None:
        self.key = key
        self.kind = kind
        self.procs: list[subprocess.Popen[str]] = []
        timeout = start_timeout or (900.0 if kind != "host" else 180.0)
        env = dict(os.environ)
        if threads:
            env["TVM_NUM_THREADS"] = str(threads)
        try:
            port = free_port()
            tracker = subprocess.Popen(
                [sys.executable, str(RPC_SERVER_SCRIPT), "tracker", "--port", str(port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            self.procs.append(tracker)
            self.address = ("127.0.0.1", _wait_line(tracker, "TRACKER-PORT", timeout))
            for _ in range(servers):
                self.procs.append(self._start_server(env))
        except BaseException:
            self.close()
            raise
        self.start_timeout = timeout

    def _start_server(self, env: dict[str, str]) -> subprocess.Popen[str]:
        args = [
            str(RPC_SERVER_SCRIPT),
            "server",
            "--tracker",
            f"{self.address[0]}:{self.address[1]}",
            "--key",
            self.key,
            "--port",
            str(free_port()),
        ]
        if self.kind == "host":
            cmd = [sys.executable, *args]
        elif self.kind == "qemu-aarch64":
            from graphopt.algorithms.tvm.qemu import ARM64_ROOT, qemu_unavailable_reason  # noqa: PLC0415

            why = qemu_unavailable_reason()
            if why:
                raise MeasureError(why)
            cmd = [
                "qemu-aarch64",
                "-L",
                str(ARM64_ROOT),
                str(ARM64_ROOT / "usr/bin/python3"),
                *args,
            ]
            env = {
                **qemu_server_env(ARM64_ROOT),
                **{k: v for k, v in env.items() if k == "TVM_NUM_THREADS"},
            }
        else:
            raise OptionError(f"unknown local server kind '{self.kind}'")
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=env
        )

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = []

    def __enter__(self) -> LocalTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_measurer(
    spec: BuildSpec,
    rpc: str | None = None,
    key: str | None = None,
    local_kind: str = "host",
    local_servers: int = 1,
    threads: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Measurer, LocalTracker | None]:
    """A measurer on the tracker at ``rpc`` (``HOST:PORT``, servers under ``key``), or on a local
    tracker it starts (returned, to be closed by the caller)."""
    opts = dict(options or {})
    local = None
    if rpc:
        if not key:
            raise OptionError("--rpc needs --key NAME (the device key the servers registered)")
        address = parse_address(rpc)
        wait = float(opts.pop("wait_s", 60.0))
    else:
        local = LocalTracker(key or "graphopt-local", local_servers, local_kind, threads=threads)
        address, key = local.address, local.key
        wait = local.start_timeout
    try:
        runner = RPCRunner(address, key or "", wait_s=wait, **opts)
        return Measurer(Builder(spec), runner), local
    except BaseException:
        if local is not None:
            local.close()
        raise
