"""The CPU kernels of :mod:`cnl.kernels`: ``cpu.c`` compiled once per machine, called through ctypes.

The C file has no dependency beyond libm, so it builds in a fraction of a second with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) into ``<cache>/kernels/<key>.so``; the key hashes the
source, the flags, the compiler's version and the CPU's flags, so a shared home directory used by
different machines never runs a library built for another CPU. The build is atomic and locked. When
no compiler is found or the build fails, :func:`library` returns None and cnl uses the eager rules.

A call on a large tensor is split into ranges run by a thread pool of ``torch.get_num_threads()``
workers (ctypes releases the GIL), each worker using the caller's floating-point control word.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cnl.kernels")

NAME = "cpu: fused C kernel"

SOURCE = Path(__file__).with_name("cpu.c")
#: Elements per sign block of the ``bits`` storage (ranges given to the kernels start on a block).
BLOCK = 256
#: Below this many elements a tensor is updated by the calling thread alone (a pool hand-off costs more).
PARALLEL_MIN = 1 << 16
#: The same threshold while updates run inside the backward pass (:func:`in_backward`). There each
#: update follows the op that produced its gradient, whose OpenMP workers keep spinning for a while,
#: so a pool thread handed a range competes with them for the cores. Measured on 2 cores (SmolLM2-135M,
#: in training, per step): the masked SGD updates took 101 ms split from 64K elements and 71-73 ms
#: split only from 1M or 4M (unmasked: 38 ms), AdamW's 163 ms and 142 ms. With 16 MB of float32 and
#: more, a tensor (SmolLM2's embedding) is still split.
PARALLEL_MIN_IN_BACKWARD = 1 << 22
_local = threading.local()


@contextlib.contextmanager
def in_backward() -> Iterator[None]:
    """Mark the updates in the block as running inside a backward pass (see PARALLEL_MIN_IN_BACKWARD)."""
    before = getattr(_local, "in_backward", False)
    _local.in_backward = True
    try:
        yield
    finally:
        _local.in_backward = before


_FLAGS = ["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_NATIVE = ["-march=native", "-mprefer-vector-width=512"]

_f, _i64, _u32, _i, _p = ctypes.c_float, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, list[Any]] = {
    "cnl_sgd": [_p, _p, _p, _i, _i64, _i64, _f, _u32],
    "cnl_momentum": [_p, _p, _p, _p, _i, _i64, _i64, _f, _f, _i, _u32],
    "cnl_adam": [_p, _p, _p, _p, _p, _i, _i64, _i64, _f, _f, _f, _f, _f, _f, _f, _f, _f, _i, _u32],
}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _try_build(cc: str, flags: list[str], out: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [cc, *flags, str(SOURCE), "-o", str(target), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log.info("building the CPU kernels failed: %s\n%s", " ".join(cmd), proc.stderr[-2000:])
            return False
        os.replace(target, out)
    return True


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it cannot be built (eager fallback)."""
    if os.environ.get("CNL_KERNELS", "").lower() == "eager":
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): cnl uses its eager update rules (slower, same numbers)")
        return None
    from ..io import exclusive
    from ..models import cache_root

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(_FLAGS + _NATIVE), version, _cpu_flags()]).encode())
    folder = cache_root() / "kernels"
    path = folder / f"cpu-{key.hexdigest()[:16]}.so"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with exclusive(folder / f"{path.name}.lock"):
            if not path.exists() and not (_try_build(cc, _FLAGS + _NATIVE, path) or _try_build(cc, _FLAGS, path)):
                log.warning("the CPU kernels did not build: cnl uses its eager update rules (slower, same numbers)")
                return None
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("the CPU kernels are unavailable (%s): cnl uses its eager update rules", e)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = _i64
    lib.cnl_get_csr.restype = _u32
    lib.cnl_get_csr.argtypes = []
    return lib


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _pool(size: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or size != _POOL_SIZE:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL, _POOL_SIZE = ThreadPoolExecutor(size, thread_name_prefix="cnl-kernel"), size
    return _POOL


def run(name: str, n: int, tensors: list[torch.Tensor | None], storage: int, scalars: list[Any]) -> int:
    """Call kernel ``name`` on ``n`` elements, in parallel ranges for large tensors; return the frozen count.

    ``tensors`` (the signs last, None without a mask) and the ``storage`` code precede the range in the
    C signature; ``scalars`` are the arguments between the range and the control word.
    """
    lib = library()
    assert lib is not None
    fn = getattr(lib, name)
    pointers = [0 if t is None else t.data_ptr() for t in tensors] + [storage]
    workers = max(1, torch.get_num_threads())
    threshold = PARALLEL_MIN_IN_BACKWARD if getattr(_local, "in_backward", False) else PARALLEL_MIN
    if n < threshold or workers == 1:
        return int(fn(*pointers, 0, n, *scalars, 0))
    csr = lib.cnl_get_csr()
    per = -(-n // workers)
    per = -(-per // BLOCK) * BLOCK
    ranges = [(a, min(a + per, n)) for a in range(0, n, per)]
    futures = [_pool(workers).submit(fn, *pointers, a, b, *scalars, csr) for a, b in ranges[1:]]
    frozen = int(fn(*pointers, *ranges[0], *scalars, 0))  # the caller takes the first range itself
    return frozen + sum(int(f.result()) for f in futures)
