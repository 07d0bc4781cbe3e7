#!/usr/bin/env bash
# Install what graphopt's TVM tests need beyond the Python packages:
#   * apache-tvm into the project's virtualenv (the `tvm` extra: apache-tvm-ffi pinned to the ABI of
#     the apache-tvm binary, tornado for TVM's RPC tracker used by `graphopt tune`, psutil),
#   * Debian's AArch64 cross compiler (gcc-aarch64-linux-gnu) and qemu-user, so that the AArch64 artifact
#     can be built on x86 and run under emulation,
#   * an arm64 sysroot under $GRAPHOPT_ARM64_ROOT (default /opt/graphopt-arm64): Debian's arm64 Python 3
#     unpacked from its .deb files, plus PyPI's manylinux aarch64 wheels of apache-tvm (with the same
#     apache-tvm-ffi pin) and numpy. The AArch64 library test runs graphopt/algorithms/tvm/runner.py
#     there, and the RPC test runs graphopt/algorithms/tvm/rpc_server.py there as TVM RPC servers.
#
# Idempotent and quick when everything is already there. It never fails the CI run: whatever cannot be
# installed (no network, no root, no arm64 packages) is reported, and tests/test_tvm.py skips the tests that
# need it with a reason.
set -u
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT_DIR/.venv/bin/python}"
ARM64_ROOT="${GRAPHOPT_ARM64_ROOT:-/opt/graphopt-arm64}"
TVM_SPEC="${GRAPHOPT_TVM_SPEC:-apache-tvm>=0.27,<0.28}"
# apache-tvm 0.27.0.post1's binary segfaults with apache-tvm-ffi 0.1.15 when it serializes IR
# (Schedule.tensorize, MetaSchedule); keep in step with pyproject.toml's `tvm` extra
FFI_SPEC="${GRAPHOPT_TVM_FFI_SPEC:-apache-tvm-ffi==0.1.14.post1}"
log() { echo "[install-tvm-deps] $*" >&2; }

# 1. apache-tvm (+ the pinned FFI, tornado, psutil) in the virtualenv
ffi_want="${FFI_SPEC#*==}"
ffi_have="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))' 2>/dev/null)"
if ! "$PY" -c "import tvm, tornado, psutil" >/dev/null 2>&1 || [ "$ffi_have" != "$ffi_want" ]; then
  log "installing $TVM_SPEC $FFI_SPEC tornado psutil into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install -q "$TVM_SPEC" "$FFI_SPEC" "tornado>=6.1" "psutil>=5.9" \
    || log "WARNING: could not install $TVM_SPEC $FFI_SPEC; TVM tests will skip"
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    log "not root and no passwordless sudo: skipping Debian packages (AArch64 tests will skip)"; exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get (not Debian/Ubuntu): skipping Debian packages (AArch64 tests will skip)"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive

# 2. cross compiler and qemu-user
need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || log "WARNING: apt-get install ${need[*]} failed; AArch64 tests will skip"
fi

# 3. arm64 sysroot: Debian's arm64 python3 unpacked (not installed) + aarch64 wheels
if [ -x "$ARM64_ROOT/usr/bin/python3" ] && [ -f "$ARM64_ROOT/.complete" ] \
   && ls "$ARM64_ROOT"/opt/site-packages/apache_tvm_ffi-"$ffi_want".dist-info >/dev/null 2>&1; then
  log "arm64 sysroot ready at $ARM64_ROOT"; exit 0
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64 || { log "WARNING: cannot add arm64 architecture"; exit 0; }
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
fi
pyver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
debpy="$(apt-cache show python3-minimal:arm64 2>/dev/null | sed -n 's/^Depends:.*python3\.\([0-9]*\)-minimal.*/3.\1/p' | head -1)"
debpy="${debpy:-3.11}"
pkgs=(python${debpy}-minimal:arm64 libpython${debpy}-minimal:arm64 libpython${debpy}-stdlib:arm64
      libc6:arm64 libgcc-s1:arm64 libstdc++6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64
      libbz2-1.0:arm64 liblzma5:arm64 libssl3:arm64 libuuid1:arm64 libsqlite3-0:arm64 libtinfo6:arm64
      libncursesw6:arm64 libreadline8:arm64 libmpdec3:arm64 libdb5.3:arm64 libgdbm6:arm64
      libnsl2:arm64 libtirpc3:arm64 libcrypt1:arm64 libgssapi-krb5-2:arm64 libkrb5-3:arm64
      libk5crypto3:arm64 libkrb5support0:arm64 libcom-err2:arm64 libkeyutils1:arm64)
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
( cd "$tmp" && apt-get download "${pkgs[@]}" >/dev/null 2>&1 ) || \
  ( cd "$tmp" && for p in "${pkgs[@]}"; do apt-get download "$p" >/dev/null 2>&1 || true; done )
if ! ls "$tmp"/python${debpy}-minimal_*_arm64.deb >/dev/null 2>&1; then
  log "WARNING: could not download Debian's arm64 python${debpy}; AArch64 run test will skip"; exit 0
fi
$SUDO mkdir -p "$ARM64_ROOT"
for d in "$tmp"/*.deb; do $SUDO dpkg-deb -x "$d" "$ARM64_ROOT"; done
$SUDO ln -sf "python${debpy}" "$ARM64_ROOT/usr/bin/python3"
site="$ARM64_ROOT/opt/site-packages"
tvmver="$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm"))' 2>/dev/null)"
$SUDO mkdir -p "$site"
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
      --python-version "$debpy" -d "$tmp/wheels" "apache-tvm${tvmver:+==$tvmver}" "$FFI_SPEC" \
      "numpy<2.4" ml_dtypes typing_extensions; then
  log "WARNING: could not download aarch64 wheels of apache-tvm/numpy; AArch64 run test will skip"; exit 0
fi
$SUDO rm -rf "$site"/apache_tvm_ffi-*.dist-info "$site"/tvm_ffi
for w in "$tmp"/wheels/*.whl; do $SUDO "$PY" -m zipfile -e "$w" "$site"; done
$SUDO touch "$ARM64_ROOT/.complete"
log "arm64 sysroot ready at $ARM64_ROOT (python $debpy, wheels in $site)"
