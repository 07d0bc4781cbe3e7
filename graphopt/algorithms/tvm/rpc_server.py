"""TVM's RPC tracker and server, as graphopt's measured schedule search uses them.

Run as a script on the machine that measures (this host, an AArch64 board, or an arm64 Python under
qemu-user); it needs only TVM and imports nothing from graphopt::

    python3 rpc_server.py tracker --host 0.0.0.0 --port 9190
    python3 rpc_server.py server --tracker HOST:9190 --key rk3588 [--host 0.0.0.0] [--port 9090]

Both are TVM's own (``tvm.rpc.tracker``, ``tvm.rpc.server``: the protocol and behaviour of
``python -m tvm.exec.rpc_tracker`` / ``rpc_server``), with three differences:

* they run in this process instead of a ``PopenWorker`` child, so the server also works under
  qemu-user without binfmt_misc (an emulated process cannot exec an aarch64 interpreter);
* a session that dies (a candidate kernel that segfaults) does not stop the server: TVM's own
  server re-raises the child's exit code and exits, so one bad candidate would take a board out of
  the tracker's pool for the rest of the search;
* ``import torch`` is blocked before ``import tvm`` (TVM's FFI probes torch, which takes seconds
  to import and is not used), unless ``GRAPHOPT_RPC_ALLOW_TORCH=1``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # run as a script: sys.path[0] is graphopt/algorithms/tvm/, which must not shadow anything
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import logging

logger = logging.getLogger("graphopt.rpc")


def _block_torch() -> None:
    if os.environ.get("GRAPHOPT_RPC_ALLOW_TORCH") != "1":
        sys.modules.setdefault("torch", None)  # type: ignore[arg-type]


def run_tracker(host: str, port: int, port_end: int) -> None:
    """Serve a tracker until killed; prints ``TRACKER-PORT <n>`` once bound."""
    _block_torch()
    from tvm.rpc import tracker  # noqa: PLC0415

    state = tracker.PopenTrackerServerState(host, port, port_end, silent=True)
    print(f"TRACKER-PORT {state.port}", flush=True)
    state.thread.join()


def run_server(
    host: str, port: int, port_end: int, tracker_addr: tuple[str, int], key: str
) -> None:
    """Serve RPC sessions under ``key`` until killed; prints ``SERVER-PORT <n>`` once bound."""
    _block_torch()
    from tvm.rpc import server  # noqa: PLC0415

    original = server._serving

    def serving(sock, addr, opts, load_library):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        cwd = os.getcwd()
        try:
            original(sock, addr, opts, load_library)
        except RuntimeError as exc:  # the session's process died (a crashing kernel)
            logger.warning("session from %s ended abnormally: %s", addr, exc)
            os.chdir(cwd)
            try:
                sock.close()
            except OSError:
                pass

    server._serving = serving
    state = server.PopenRPCServerState(
        host, port, port_end, False, tracker_addr, key, None, None, silent=True
    )
    print(f"SERVER-PORT {state.port}", flush=True)
    state.thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TVM RPC tracker/server for graphopt tune")
    ap.add_argument("mode", choices=("tracker", "server"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9190)
    ap.add_argument("--port-end", type=int, default=0, help="last port to try (default port+100)")
    ap.add_argument("--tracker", default="", help="HOST:PORT of the tracker (server mode)")
    ap.add_argument("--key", default="", help="the device key the server registers (server mode)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    port_end = ns.port_end or ns.port + 100
    if ns.mode == "tracker":
        run_tracker(ns.host, ns.port, port_end)
        return 0
    thost, _, tport = ns.tracker.rpartition(":")
    if not thost or not tport.isdigit() or not ns.key:
        ap.error("server mode needs --tracker HOST:PORT and --key NAME")
    run_server(ns.host, ns.port, port_end, (thost, int(tport)), ns.key)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
