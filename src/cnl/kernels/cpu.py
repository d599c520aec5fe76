"""The CPU kernels of :mod:`cnl.kernels`: ``cpu.c`` compiled once per machine, called through ctypes.

The C file has no dependency beyond libm, so it builds in a fraction of a second with the system C
compiler (``$CC``, else ``cc``/``gcc``/``clang``) into ``<cache>/kernels/<key>.so``; the key hashes the
source, the flags, the compiler's version and the CPU's flags, so a shared home directory used by
different machines never runs a library built for another CPU. The build is atomic (a temporary
directory, then ``os.replace``) and locked.

The cache is trusted only as far as it is ours, since loading a library runs its code:

- ``<cache>/kernels`` is created with mode 0700; an existing one must be a directory owned by the
  current user and not writable by group or others. Otherwise it is not used: one warning names it
  and this process builds into a fresh private directory (``tempfile.mkdtemp``, removed at exit).
- a library there is loaded only when it is a regular file owned by the current user, not writable
  by group or others, and its sha256 matches the digest recorded next to it (``<key>.so.sha256``,
  written after the library is in place). Anything else is rebuilt and atomically replaced.

``cc --version`` may take :data:`VERSION_TIMEOUT` seconds and one compile :data:`COMPILE_TIMEOUT`;
a compiler that hangs is killed with its process group. Every failure (no compiler, a compile that
fails or times out, a missing ``cpu.c``, a library without one of the kernels) gives one warning on
the ``cnl.kernels`` logger, :func:`library` returns None and cnl uses the eager rules (slower, same
numbers). :func:`library` is cached, so that happens once per process.

A call on a large tensor is split into ranges run by a thread pool of ``torch.get_num_threads()``
workers (ctypes releases the GIL), each worker using the caller's floating-point control word.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import signal
import stat
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
#: Seconds allowed to ``cc --version`` and to one compile before the compiler is killed (eager fallback).
VERSION_TIMEOUT = 10.0
COMPILE_TIMEOUT = 60.0
#: The file the loaded library came from (None while none is loaded).
LOADED_FROM: Path | None = None
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
    "cnl_moment_ladder": [_p, _p, _i64, _i64, _i, _f, _f, _i, _p, _p, _u32],
    "cnl_adam_band": [_p, _p, _p, _p, _p, _i64, _i64, _i64, *[_f] * 9, _i, _f, _f, _p, _u32],
    "cnl_momentum_band": [_p, _p, _p, _p, _i64, _i64, _i64, _f, _f, _i, _f, _f, _p, _u32],
    "cnl_adam_settle": [_p, _p, _p, _p, _i64, _f, _f, _f, _f, _f, _i, _f],
    "cnl_momentum_settle": [_p, _p, _p, _i64, _f, _f],
}
#: Rungs of the threshold ladder of ``cnl_moment_ladder`` (LADDER in cpu.c).
LADDER = 8


class _Unavailable(Exception):
    """Why the CPU kernels cannot be used: the text of the one warning before the eager fallback."""


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


def _uid() -> int | None:
    """The user whose files the cache may hold (None where the system has no user ids)."""
    return os.geteuid() if hasattr(os, "geteuid") else None


def _trusted(st: os.stat_result, uid: int | None) -> bool:
    """Whether a file or directory of status ``st`` is owned by ``uid`` and writable by nobody else."""
    if uid is None:
        return True
    return st.st_uid == uid and not st.st_mode & 0o022


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}"


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` in its own process group, all of which is killed at the timeout.

    (A compiler driver's children inherit the pipes: killing the driver alone would leave
    ``communicate`` waiting for them.)
    """
    with subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if hasattr(os, "killpg"):
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _version(cc: str) -> str:
    try:
        return _run([cc, "--version"], VERSION_TIMEOUT).stdout
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"`{cc} --version` did not answer within {VERSION_TIMEOUT:g} s") from None
    except OSError as e:
        raise _Unavailable(f"the C compiler {cc!r} cannot be run ({e})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _digest_path(library: Path) -> Path:
    return library.with_name(f"{library.name}.sha256")


def _cache_folder(uid: int | None) -> Path:
    """``<cache>/kernels`` when it is ours alone (created 0700), else a fresh private directory (one warning)."""
    from ..models import cache_root

    folder = cache_root() / "kernels"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)  # whatever the umask
        st = os.stat(folder)
    except OSError as e:
        why = f"cannot be created ({e})"
    else:
        if stat.S_ISDIR(st.st_mode) and _trusted(st, uid):
            return folder
        why = f"is not a directory that only you can write ({_describe(st)}; fix: chmod 700, or set CNL_CACHE)"
    private = Path(tempfile.mkdtemp(prefix="cnl-kernels-"))
    atexit.register(shutil.rmtree, private, True)
    log.warning("the kernel cache %s %s: this process builds the CPU kernels into %s instead", folder, why, private)
    return private


def _usable(path: Path, uid: int | None) -> bool:
    """Whether the library at ``path`` may be loaded: our regular file, writable only by us, digest as recorded."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode) or not _trusted(st, uid):
        log.info("rebuilding %s: not a regular file that only you can write (%s)", path, _describe(st))
        return False
    try:
        recorded = _digest_path(path).read_text().strip()
    except OSError:
        recorded = ""
    if recorded != _sha256(path):
        log.info("rebuilding %s: its sha256 is %s", path, "not recorded" if not recorded else "not the recorded one")
        return False
    return True


def _try_build(cc: str, flags: list[str], out: Path) -> str | None:
    """Build into ``out`` (atomically replaced, then its digest recorded); None on success, else the error."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / out.name
        cmd = [cc, *flags, str(SOURCE), "-o", str(target), "-lm"]
        try:
            proc = _run(cmd, COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise _Unavailable(
                f"compiling the CPU kernels took more than {COMPILE_TIMEOUT:g} s: {' '.join(cmd)}"
            ) from None
        except OSError as e:
            raise _Unavailable(f"the C compiler {cc!r} cannot be run ({e})") from None
        if proc.returncode != 0 or not target.is_file():
            log.info("building the CPU kernels failed: %s\n%s", " ".join(cmd), proc.stderr[-2000:])
            return (proc.stderr.strip() or f"exit status {proc.returncode}")[-500:]
        os.chmod(target, 0o755)  # whatever the umask: a group-writable library would not be trusted
        digest = _sha256(target)
        os.replace(target, out)
        fd, sidecar = tempfile.mkstemp(dir=tmp)
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(sidecar, _digest_path(out))
    return None


def _load() -> tuple[ctypes.CDLL, Path]:
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler found (set CC)")
    try:
        source = SOURCE.read_text()
    except OSError as e:
        raise _Unavailable(f"the C source of the CPU kernels cannot be read ({e})") from None
    from ..io import exclusive

    version = _version(cc)
    key = hashlib.sha256("\0".join([source, " ".join(_FLAGS + _NATIVE), version, _cpu_flags()]).encode())
    uid = _uid()
    folder = _cache_folder(uid)
    path = folder / f"cpu-{key.hexdigest()[:16]}.so"
    with exclusive(folder / f"{path.name}.lock"):
        if not _usable(path, uid):
            error = _try_build(cc, _FLAGS + _NATIVE, path)
            if error is not None:
                error = _try_build(cc, _FLAGS, path)  # without -march=native
            if error is not None:
                raise _Unavailable(f"the CPU kernels did not build with {cc!r} ({error})")
        lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise _Unavailable(f"the library {path} has no function {name}") from None
        fn.argtypes = argtypes
        fn.restype = _i64
    try:
        get_csr = lib.cnl_get_csr
    except AttributeError:
        raise _Unavailable(f"the library {path} has no function cnl_get_csr") from None
    get_csr.restype = _u32
    get_csr.argtypes = []
    return lib, path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it cannot be built (eager fallback).

    Every failure gives one warning (logger ``cnl.kernels``); the result is cached for the process.
    """
    global LOADED_FROM
    LOADED_FROM = None
    if os.environ.get("CNL_KERNELS", "").lower() == "eager":
        return None
    try:
        lib, LOADED_FROM = _load()
    except _Unavailable as e:
        log.warning("%s: cnl uses its eager update rules (slower, same numbers)", e)
        return None
    except Exception as e:  # an optional speed-up must never stop a run
        log.warning(
            "the CPU kernels are unavailable (%s: %s): cnl uses its eager update rules (slower, same numbers)",
            type(e).__name__,
            e,
        )
        return None
    return lib


def library_path() -> Path | None:
    """The file of the loaded kernel library (loading it first); None with the eager fallback."""
    library()
    return LOADED_FROM


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
    return sum(_in_ranges(lib, n, lambda r, a, b, csr: fn(*pointers, a, b, *scalars, csr)))


def _in_ranges(lib: ctypes.CDLL, n: int, call: Any) -> list[int]:
    """``call(r, start, stop, csr)`` for each range r of ``n`` elements (one range below the parallel threshold
    or with one thread; else one per worker, on block boundaries, run by the pool and the caller); the results
    in range order."""
    workers = max(1, torch.get_num_threads())
    threshold = PARALLEL_MIN_IN_BACKWARD if getattr(_local, "in_backward", False) else PARALLEL_MIN
    if n < threshold or workers == 1:
        return [int(call(0, 0, n, 0))]
    csr = lib.cnl_get_csr()
    per = -(-n // workers)
    per = -(-per // BLOCK) * BLOCK
    ranges = [(a, min(a + per, n)) for a in range(0, n, per)]
    futures = [_pool(workers).submit(call, r, a, b, csr) for r, (a, b) in enumerate(ranges) if r]
    first = int(call(0, *ranges[0], 0))  # the caller takes the first range itself
    return [first, *(int(f.result()) for f in futures)]


# ------------------------------------------------------------------------------- MoFO's top fraction
def moment_ladder(
    grad: torch.Tensor, mom: torch.Tensor, kind: int, a1: float, b1: float, first: bool, ladder: list[float]
) -> list[int]:
    """How many elements have |new first moment| >= each rung of ``ladder`` (``cnl_moment_ladder``)."""
    lib = library()
    assert lib is not None and len(ladder) == LADDER
    t = torch.tensor(ladder, dtype=torch.float32)
    parts: list[torch.Tensor] = []

    def call(r: int, a: int, b: int, csr: int) -> int:
        return lib.cnl_moment_ladder(grad.data_ptr(), mom.data_ptr(), a, b, kind, a1, b1, int(first),
                                     t.data_ptr(), parts[r].data_ptr(), csr)  # fmt: skip

    parts.extend(torch.zeros(LADDER, dtype=torch.int64) for _ in range(max(1, torch.get_num_threads())))
    _in_ranges(lib, grad.numel(), call)
    return [int(c) for c in torch.stack(parts).sum(0)]


def band(
    name: str, tensors: list[torch.Tensor], scalars: list[Any], lo: float, hi: float, listed: int
) -> tuple[int, torch.Tensor] | None:
    """The fused update with a band (``cnl_adam_band``/``cnl_momentum_band``): ``(moved, listed positions)``, or
    None when a range listed more than ``listed`` elements (then nothing may be trusted)."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, name)
    n = tensors[0].numel()
    pointers = [t.data_ptr() for t in tensors]
    workers = max(1, torch.get_num_threads())
    cap = max(1, listed)
    idx = [torch.empty(cap, dtype=torch.int32) for _ in range(workers)]
    out = torch.zeros(workers, dtype=torch.int64)

    def call(r: int, a: int, b: int, csr: int) -> int:
        return fn(*pointers, idx[r].data_ptr(), cap, a, b, *scalars, lo, hi, out[r:].data_ptr(), csr)

    counts = _in_ranges(lib, n, call)
    if any(c > cap for c in counts):
        return None
    return int(out.sum()), torch.cat([idx[r][:c] for r, c in enumerate(counts)])


def settle(name: str, tensors: list[torch.Tensor], idx: torch.Tensor, scalars: list[Any]) -> int:
    """Move the listed band elements at or above the exact threshold (``cnl_*_settle``); how many moved."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, name)
    return int(fn(*(t.data_ptr() for t in tensors), idx.data_ptr(), idx.numel(), *scalars))
