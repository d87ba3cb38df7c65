"""Builds a C++ XLA FFI kernel on first use and registers it with JAX's CPU backend.

Shared by the CPU kernels (`effjax.attention.cpu_decode`, `effjax.ops.few_row_matmul`): `g++` (or
`$CXX`) compiles the source once per source/flags/jaxlib/CPU combination into
`$EFFJAX_KERNEL_CACHE` (default `~/.cache/effjax/kernels`), in a few seconds, with `-march=native`
(so the library is keyed by the CPU's feature flags too). Callers fall back to XLA when
`load` returns a reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import jax

# Headers shared by the kernels (parallel_for.h); on the include path of every build, and part of
# every library's cache key.
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels")

BASE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
              *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64")
                else ()))


def _cpu_signature() -> str:
  """The CPU's feature flags: a library built with -march=native runs only where they match."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith("flags")), "")
  except OSError:
    flags = ""
  return platform.machine() + flags


def library_path(source: str, flags: Sequence[str]) -> str:
  import jaxlib
  digest = hashlib.sha1(jaxlib.__version__.encode() + " ".join(flags).encode()
                        + _cpu_signature().encode())
  headers = sorted(name for name in os.listdir(INCLUDE_DIR) if name.endswith(".h"))
  for path in [source] + [os.path.join(INCLUDE_DIR, name) for name in headers]:
    with open(path, "rb") as f:
      digest.update(f.read())
  key = digest.hexdigest()[:16]
  cache = os.environ.get("EFFJAX_KERNEL_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "effjax", "kernels"))
  stem = os.path.splitext(os.path.basename(source))[0]
  return os.path.join(cache, f"effjax_{stem}_{key}.so")


def _build(source: str, flags: Sequence[str], path: str) -> None:
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  cmd = [compiler, *flags, "-w", f"-I{INCLUDE_DIR}", f"-I{jax.ffi.include_dir()}", source,
         "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
  os.replace(tmp, path)  # Atomic: concurrent builders (pytest-xdist workers) never see half a file.


def load(source: str, flags: Sequence[str], symbol: str, target: str,
         what: str) -> Optional[str]:
  """Builds `source` (once) and registers its handler `symbol` as FFI `target` on CPU.

  Returns None on success, else why the kernel is unavailable (callers cache the answer).
  """
  try:
    path = library_path(source, flags)
    if not os.path.exists(path):
      logging.info("building the %s into %s", what, path)
      _build(source, flags, path)
    library = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    return f"the {what} could not be built or loaded: {e}"
  return None


def disabled(env_var: str) -> bool:
  return os.environ.get(env_var, "1").lower() in ("0", "false", "no")
