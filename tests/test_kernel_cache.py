"""Tests for the CPU kernel cache of :mod:`cnl.kernels.cpu`: what it trusts, and the eager fallback on every failure."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cnl import kernels
from cnl.kernels import cpu
from cnl.mask import SignReference

needs_cc = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: the fused CPU kernels are not built")
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a file to another user"
)

#: The frozen count every kernel of the planted library returns.
SENTINEL = 424242
PLANTED_C = f"""
#include <stdint.h>
int64_t cnl_sgd(void) {{ return {SENTINEL}; }}
int64_t cnl_momentum(void) {{ return {SENTINEL}; }}
int64_t cnl_adam(void) {{ return {SENTINEL}; }}
uint32_t cnl_get_csr(void) {{ return 0; }}
"""


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A fresh ``CNL_CACHE``, with ``library()`` rebuilt for the test and again after it."""
    monkeypatch.setenv("CNL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CNL_KERNELS", raising=False)
    cpu.library.cache_clear()
    yield tmp_path / "cache"
    cpu.library.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_eager_with_one_warning(caplog: pytest.LogCaptureFixture, *words: str) -> None:
    with caplog.at_level(logging.INFO, logger="cnl.kernels"):
        assert cpu.library() is None
        assert kernels.describe("cpu") == "eager"
        assert cpu.library_path() is None
    records = warnings_of(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].name == "cnl.kernels"
    for word in words:
        assert word in records[0].getMessage()


def masked_sgd_frozen() -> int:
    """A masked SGD update through the fused kernel: the frozen count (checked against the sign conflicts)."""
    gen = torch.Generator().manual_seed(0)
    theta, grad, ref = (torch.randn(1000, generator=gen) for _ in range(3))
    reference = SignReference("bits")
    p = theta.clone()
    reference.set(p, ref)
    frozen = kernels.sgd(p, grad, reference.raw(p), 0.5)
    conflict = ((grad > 0) & (ref < 0)) | ((grad < 0) & (ref > 0))
    if frozen == int(conflict.sum()):
        assert torch.equal(p[conflict], theta[conflict])
    return frozen


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_built_and_recorded(path: Path) -> None:
    st = path.stat()
    assert st.st_uid == os.geteuid() and not st.st_mode & 0o022
    assert sidecar(path).read_text().strip() == sha256(path)


# --- the eager fallback: one warning, library() None -------------------------------------------------------------


def test_missing_source_falls_back(cache, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu, "SOURCE", tmp_path / "missing" / "cpu.c")
    monkeypatch.setattr(cpu, "_compiler", lambda: "cc")  # the source is read whether or not a compiler is there
    assert_eager_with_one_warning(caplog, "cpu.c")


@needs_cc
def test_library_without_a_kernel_falls_back(cache, monkeypatch, tmp_path, caplog):
    source = tmp_path / "no_adam.c"
    source.write_text("\n".join(line for line in PLANTED_C.splitlines() if "cnl_adam" not in line))
    monkeypatch.setattr(cpu, "SOURCE", source)
    assert_eager_with_one_warning(caplog, "cnl_adam")


def fake_compiler(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-cc"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def test_failing_compiler_falls_back(cache, monkeypatch, tmp_path, caplog):
    cc = fake_compiler(tmp_path, 'echo "fake-cc 1.0"\necho "error: this compiler only fails" >&2\nexit 1')
    monkeypatch.setenv("CC", str(cc))
    assert_eager_with_one_warning(caplog, "did not build", "this compiler only fails")
    assert not list(cache.glob("kernels/*.so"))


def test_compiler_that_cannot_run_falls_back(cache, monkeypatch, tmp_path, caplog):
    cc = tmp_path / "not-executable-cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    monkeypatch.setattr(cpu, "_compiler", lambda: str(cc))
    cc.chmod(0o644)  # found by _compiler, then exec fails (PermissionError)
    if os.access(cc, os.X_OK):
        pytest.skip("this user can execute a file without execute permission")
    assert_eager_with_one_warning(caplog, "cannot be run")


@pytest.mark.parametrize("hangs_on", ["--version", "compile"])
def test_hanging_compiler_is_killed_and_falls_back(cache, monkeypatch, tmp_path, caplog, hangs_on):
    """The compiler runs under a timeout; its children (here ``sleep``, holding the pipes) are killed with it."""
    answer = 'if [ "$1" = --version ]; then echo "fake-cc 1.0"; exit 0; fi\n' if hangs_on == "compile" else ""
    monkeypatch.setenv("CC", str(fake_compiler(tmp_path, answer + "sleep 30\nexit 0")))
    monkeypatch.setattr(cpu, "VERSION_TIMEOUT", 0.5)
    monkeypatch.setattr(cpu, "COMPILE_TIMEOUT", 0.5)
    start = time.monotonic()
    assert_eager_with_one_warning(caplog, "0.5 s", "--version" if hangs_on == "--version" else "compiling")
    assert time.monotonic() - start < 4, "the whole process group is killed at the timeout"


def test_no_compiler_and_eager_env(cache, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    assert_eager_with_one_warning(caplog, "no C compiler")
    cpu.library.cache_clear()
    caplog.clear()
    monkeypatch.setenv("CNL_KERNELS", "eager")
    assert cpu.library() is None and not warnings_of(caplog)  # asked for: no warning


# --- what the cache trusts ----------------------------------------------------------------------------------------


def fake_stat(mode: int, uid: int) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "trusted"),
    [
        (stat.S_IFREG | 0o755, 1000, True),
        (stat.S_IFREG | 0o644, 1000, True),
        (stat.S_IFDIR | 0o700, 1000, True),
        (stat.S_IFREG | 0o755, 1001, False),  # someone else's
        (stat.S_IFDIR | 0o700, 0, False),  # root's, and we are not root
        (stat.S_IFREG | 0o775, 1000, False),  # group-writable
        (stat.S_IFREG | 0o757, 1000, False),  # writable by others
        (stat.S_IFDIR | 0o777, 1000, False),
        (stat.S_IFDIR | 0o1777, 1000, False),  # sticky, but still writable by all
    ],
)
def test_trusted_means_ours_and_writable_only_by_us(mode, uid, trusted):
    assert cpu._trusted(fake_stat(mode, uid), 1000) is trusted


@needs_cc
def test_a_good_cache_is_reused_and_private_whatever_the_umask(cache):
    before = os.umask(0o002)
    try:
        path = cpu.library_path()
    finally:
        os.umask(before)
    assert path is not None and path.parent == cache / "kernels"
    assert stat.S_IMODE((cache / "kernels").stat().st_mode) == 0o700
    assert_built_and_recorded(path)
    inode = path.stat().st_ino
    cpu.library.cache_clear()
    assert cpu.library_path() == path and path.stat().st_ino == inode  # loaded, not rebuilt
    assert masked_sgd_frozen() != SENTINEL


def plant(cache: Path, name: str, content: bytes, digest: str | None) -> Path:
    folder = cache / "kernels"
    folder.mkdir(parents=True, mode=0o700)
    target = folder / name
    target.write_bytes(content)
    target.chmod(0o755)
    if digest is not None:
        sidecar(target).write_text(digest + "\n")
    return target


@needs_cc
@pytest.mark.parametrize("case", ["planted, no digest", "planted, wrong digest", "tampered legit library"])
def test_a_library_without_its_digest_is_rebuilt_not_loaded(cache, monkeypatch, tmp_path, caplog, case):
    # the hashed name, from a legitimate build elsewhere (each case plants under a path never loaded before)
    monkeypatch.setenv("CNL_CACHE", str(tmp_path / "elsewhere"))
    legit = cpu.library_path()
    assert legit is not None
    cpu.library.cache_clear()
    monkeypatch.setenv("CNL_CACHE", str(cache))
    if case == "tampered legit library":
        content = bytearray(legit.read_bytes())
        content[len(content) // 2] ^= 0xFF
        planted = plant(cache, legit.name, bytes(content), sidecar(legit).read_text().strip())
    else:
        planted_so = tmp_path / "planted.so"
        source = tmp_path / "planted.c"
        source.write_text(PLANTED_C)
        subprocess.run([cpu._compiler(), "-shared", "-fPIC", str(source), "-o", str(planted_so)], check=True)
        digest = None if case == "planted, no digest" else hashlib.sha256(b"something else").hexdigest()
        planted = plant(cache, legit.name, planted_so.read_bytes(), digest)
    tampered = sha256(planted)
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        assert cpu.library_path() == planted
        assert masked_sgd_frozen() != SENTINEL
    assert not warnings_of(caplog)
    assert_built_and_recorded(planted)
    assert sha256(planted) != tampered


@needs_cc
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_shared_cache_directory_is_not_used(cache, caplog, mode):
    shared = cache / "kernels"
    shared.mkdir(parents=True)
    shared.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        path = cpu.library_path()
    assert path is not None and shared not in path.parents
    assert path.parent.name.startswith("cnl-kernels-") and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not list(shared.iterdir()), "nothing is written into the shared directory"
    records = warnings_of(caplog)
    assert len(records) == 1 and str(shared) in records[0].getMessage()
    assert masked_sgd_frozen() != SENTINEL


@needs_cc
def test_a_cache_path_that_is_a_file_is_not_used(cache, caplog):
    cache.mkdir()
    (cache / "kernels").write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        path = cpu.library_path()
    assert path is not None and path.parent.name.startswith("cnl-kernels-")
    assert len(warnings_of(caplog)) == 1


@needs_cc
def test_a_writable_library_file_is_rebuilt(cache, caplog):
    path = cpu.library_path()
    assert path is not None
    path.chmod(0o666)
    inode = path.stat().st_ino
    cpu.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        assert cpu.library_path() == path
    assert not warnings_of(caplog)
    assert path.stat().st_ino != inode, "replaced, not rewritten in place"
    assert_built_and_recorded(path)


@needs_cc
def test_a_symlinked_library_is_rebuilt(cache, tmp_path):
    path = cpu.library_path()
    assert path is not None
    elsewhere = tmp_path / "elsewhere.so"
    shutil.copy(path, elsewhere)
    path.unlink()
    path.symlink_to(elsewhere)
    cpu.library.cache_clear()
    assert cpu.library_path() == path
    assert not path.is_symlink()
    assert_built_and_recorded(path)


@needs_cc
@needs_root
def test_someone_elses_library_is_rebuilt(cache, caplog):
    path = cpu.library_path()
    assert path is not None
    os.chown(path, 12345, 12345)
    cpu.library.cache_clear()
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        assert cpu.library_path() == path
    assert not warnings_of(caplog)
    assert path.stat().st_uid == os.geteuid()
    assert_built_and_recorded(path)


@needs_cc
@needs_root
def test_someone_elses_cache_directory_is_not_used(cache, caplog):
    shared = cache / "kernels"
    shared.mkdir(parents=True, mode=0o700)
    os.chown(shared, 12345, 12345)
    with caplog.at_level(logging.WARNING, logger="cnl.kernels"):
        path = cpu.library_path()
    assert path is not None and shared not in path.parents
    assert not list(shared.iterdir())
    records = warnings_of(caplog)
    assert len(records) == 1 and str(shared) in records[0].getMessage() and "uid 12345" in records[0].getMessage()
