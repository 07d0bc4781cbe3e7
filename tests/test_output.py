"""graphopt.core.output: atomic single files, refused output paths, and model + external data
published so that a reader never sees a model with another write's data."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import GraphoptError, OutputPathError
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.output import (
    atomic_output,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_output_path,
    check_outputs,
    clean_stale_temporaries,
    data_file_pattern,
    staged_files,
)
from graphopt.core.saver import save
from graphopt.fixtures import fixture_path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".graphopt-"))


# ------------------------------------------------------------------------------ single files


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(tmp_path / "a.txt", "second")  # replaces
    assert (tmp_path / "a.txt").read_text() == "second"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_output_exception_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(dest, "w") as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "new.bin") as f:
        f.write(b"x")
        raise KeyboardInterrupt
    assert not (tmp_path / "new.bin").exists() and _leftovers(tmp_path) == []


def test_atomic_path_for_writers_that_want_a_name(tmp_path: Path) -> None:
    dest = tmp_path / "outs.npz"
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and not dest.exists()
        np.savez(tmp, y=np.arange(3))
    with np.load(dest) as z:
        assert z["y"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []
    with (
        pytest.raises(OutputPathError, match="nothing was written"),
        atomic_path(tmp_path / "never.png") as tmp,
    ):
        tmp.unlink()
    assert not (tmp_path / "never.png").exists()


def test_write_error_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="cannot write"):
        atomic_write_text(blocker / "inside.txt", "y")  # a file where a folder should be


# ---------------------------------------------------------------------------------- refusals


def test_check_outputs_refuses_the_input_through_links(tmp_path: Path) -> None:
    inp = tmp_path / "in.onnx"
    inp.write_bytes(b"model")
    (tmp_path / "sym.onnx").symlink_to(inp)
    os.link(inp, tmp_path / "hard.onnx")
    for out in (inp, tmp_path / "sym.onnx", tmp_path / "hard.onnx", tmp_path / "." / "in.onnx"):
        with pytest.raises(OutputPathError, match="is the input"):
            check_outputs(inputs=[inp], outputs=[out])
    assert check_outputs(inputs=[inp, None], outputs=[tmp_path / "o.onnx", None]) == [
        tmp_path / "o.onnx"
    ]
    assert isinstance(OutputPathError("x"), GraphoptError) and OutputPathError.exit_code == 2


def test_check_outputs_refuses_non_regular_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for out, word in ((tmp_path, "folder"), (fifo, "FIFO"), (Path("/dev/null"), "device")):
        with pytest.raises(OutputPathError, match=word):
            check_output_path(out)
        with pytest.raises(OutputPathError, match=word):
            atomic_write_bytes(out, b"x")
    assert Path("/dev/null").is_char_device() and fifo.is_fifo()


def test_check_outputs_refuses_two_outputs_on_one_file(tmp_path: Path) -> None:
    a = tmp_path / "a.onnx"
    with pytest.raises(OutputPathError, match="also the output"):
        check_outputs(outputs=[a, tmp_path / "x" / ".." / "a.onnx"])
    a.write_text("x")
    (tmp_path / "b.html").symlink_to(a)
    with pytest.raises(OutputPathError, match="also the output"):
        check_outputs(outputs=[a, tmp_path / "b.html"])
    assert check_outputs(outputs=[a, tmp_path / "c.html"]) == [a, tmp_path / "c.html"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    proc = mp.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    dead = proc.pid
    (tmp_path / f".graphopt-{dead}-abc").mkdir()
    (tmp_path / f".graphopt-{dead}-abc" / "m.onnx").write_bytes(b"partial")
    (tmp_path / f".graphopt-{dead}-def.npz").write_bytes(b"partial")
    (tmp_path / f".graphopt-{os.getpid()}-live").mkdir()  # a live process's: kept
    (tmp_path / ".graphopt-notapid").mkdir()  # not ours: kept
    assert clean_stale_temporaries(tmp_path) == 2
    assert _leftovers(tmp_path) == [f".graphopt-{os.getpid()}-live", ".graphopt-notapid"]


# ----------------------------------------------------------------------- model + external data


def _mlp(value: float, n: int = 64) -> Model:
    """y = x @ W with every weight equal to ``value`` (tagged in metadata), external data."""
    w = numpy_helper.from_array(np.full((n, n), value, np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(proto, {"tag": str(value)})
    return Model.from_onnx(proto)


def _data_files(folder: Path, name: str) -> list[str]:
    pat = data_file_pattern(name)
    return sorted(p.name for p in folder.iterdir() if pat.match(p.name))


def test_save_external_unique_data_name_and_old_data_removed(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    save(_mlp(1.0), out, external=True)
    first = _data_files(tmp_path, "m.onnx")
    assert len(first) == 1 and first[0] != "m.onnx.data"
    save(_mlp(2.0), out, external=True)
    second = _data_files(tmp_path, "m.onnx")
    assert len(second) == 1 and second != first  # the replaced model's data is gone
    m = load(out)
    assert m.metadata["tag"] == "2.0"
    assert float(np.asarray(m.graph.tensors()["w"].values).max()) == 2.0
    save(_mlp(3.0), out, external=False)  # embedded: the external data goes too
    assert _data_files(tmp_path, "m.onnx") == []
    assert _leftovers(tmp_path) == []


def test_save_removes_data_of_a_write_killed_between_its_renames(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.0123456789ab.data").write_bytes(b"\0" * 64)  # published, model never was
    (tmp_path / "m.onnx.data").write_bytes(b"unrelated")  # fixed name, not used by m.onnx: kept
    save(_mlp(1.0), out, external=True)
    files = _data_files(tmp_path, "m.onnx")
    assert "m.onnx.0123456789ab.data" not in files and "m.onnx.data" in files and len(files) == 2


def test_save_refuses_input_and_keeps_input_data(tmp_path: Path) -> None:
    src = tmp_path / "ext.onnx"
    save(load(fixture_path("external_data.onnx")), src)
    data = _data_files(tmp_path, "ext.onnx")
    m = load(src)
    with pytest.raises(OutputPathError, match="input"):
        save(m, src)
    os.link(src, tmp_path / "hard.onnx")
    with pytest.raises(OutputPathError, match="input"):
        save(m, tmp_path / "hard.onnx")
    with pytest.raises(OutputPathError, match="folder"):
        save(m, tmp_path)
    assert _data_files(tmp_path, "ext.onnx") == data
    onnx.checker.check_model(str(src))


def _writer(path: str, value: float, rounds: int) -> None:
    for _ in range(rounds):
        save(_mlp(value, 128), path, external=True)


def test_concurrent_writers_never_leave_a_mixed_model(tmp_path: Path) -> None:
    """Two processes write the same output with external data, again and again; a reader loads it
    meanwhile. Every load is a complete model whose weights are its own write's; at the end one
    data file is left."""
    out = tmp_path / "m.onnx"
    save(_mlp(0.0, 128), out, external=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(out), v, 15)) for v in (1.0, 2.0)]
    for p in procs:
        p.start()
    checked = 0
    while any(p.is_alive() for p in procs) or checked == 0:
        try:
            proto = onnx.load(str(out))  # model, then its data
        except (FileNotFoundError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError):
            continue  # the data was replaced between the two reads: an error, never a mix
        except RuntimeError as exc:  # onnx's C++ side: "filesystem error: ... No such file"
            if "No such file" not in str(exc):
                raise
            continue
        tag = float({p.key: p.value for p in proto.metadata_props}["tag"])
        w = numpy_helper.to_array(proto.graph.initializer[0])
        assert np.all(w == tag), f"model tagged {tag} holds weights {np.unique(w)}"
        checked += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert len(_data_files(tmp_path, "m.onnx")) == 1
    assert _leftovers(tmp_path) == []
    assert load(out).metadata["tag"] in ("1.0", "2.0")


def test_new_files_get_default_permissions_and_replaced_files_keep_theirs(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
        assert p.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0600
        p.chmod(0o640)
        atomic_write_text(p, "y")
        assert p.stat().st_mode & 0o777 == 0o640
        m = save(_mlp(1.0), tmp_path / "m.onnx", external=True)
        assert m.stat().st_mode & 0o777 == 0o644
        assert all(
            (tmp_path / d).stat().st_mode & 0o777 == 0o644 for d in _data_files(tmp_path, "m.onnx")
        )
    finally:
        os.umask(old)


def test_staged_files_publish_together_or_not_at_all(tmp_path: Path) -> None:
    lib, man = tmp_path / "m.so", tmp_path / "m.so.json"
    lib.write_bytes(b"old lib")
    man.write_text("old manifest")
    with pytest.raises(RuntimeError):
        with staged_files(lib, man) as (t_lib, t_man):
            assert t_lib.parent == t_man.parent and t_lib.parent.name.startswith(
                f".graphopt-{os.getpid()}-"
            )
            assert t_lib.name == lib.name and t_man.name == man.name
            t_lib.write_bytes(b"new lib")
            raise RuntimeError("verification failed")
    assert lib.read_bytes() == b"old lib" and man.read_text() == "old manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so", "m.so.json"]
    with staged_files(lib, man) as (t_lib, t_man):
        t_lib.write_bytes(b"new lib")
        t_man.write_text("new manifest")
    assert lib.read_bytes() == b"new lib" and man.read_text() == "new manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so", "m.so.json"]


def test_staged_files_refuse_a_missing_file_and_a_split_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="beside"):
        with staged_files(tmp_path / "a.so", tmp_path / "sub" / "a.so.json"):
            pass
    with pytest.raises(OutputPathError, match="nothing was written"):
        with staged_files(tmp_path / "a.so", tmp_path / "a.so.json") as (t_lib, _):
            t_lib.write_bytes(b"lib only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_staged_files_clean_a_killed_runs_folder(tmp_path: Path) -> None:
    dead = tmp_path / ".graphopt-999999999-leftover"  # no such pid
    dead.mkdir()
    (dead / "m.so").write_bytes(b"partial")
    with staged_files(tmp_path / "m.so") as (t,):
        t.write_bytes(b"lib")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.so"]
