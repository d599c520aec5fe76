"""A normal (non-editable) install works: the wheel, installed into a fresh virtual environment and run
from outside the source tree, builds and uses the fused CPU kernel and runs ``cnl --help``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cnl.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]

#: Run by the fresh environment's interpreter: a masked SGD update through the fused CPU kernel.
KERNEL_CHECK = """
import json, sys
import torch
import cnl
from cnl import kernels
from cnl.kernels import cpu
from cnl.mask import BLOCK, SignReference

gen = torch.Generator().manual_seed(0)
n = 3 * BLOCK + 5
theta, grad, ref = (torch.randn(n, generator=gen) for _ in range(3))
reference = SignReference("bits")
p = theta.clone()
reference.set(p, ref)
frozen = kernels.sgd(p, grad, reference.raw(p), 0.5)
conflict = ((grad > 0) & (ref < 0)) | ((grad < 0) & (ref > 0))
json.dump({
    "cnl": cnl.__file__,
    "source": str(cpu.SOURCE),
    "describe": kernels.describe("cpu"),
    "name": cpu.NAME,
    "library": str(cpu.library_path()),
    "frozen": frozen,
    "conflicts": int(conflict.sum()),
    "frozen_kept": bool(torch.equal(p[conflict], theta[conflict])),
    "others_moved": bool(torch.equal(p[~conflict], (theta - 0.5 * grad)[~conflict])),
}, sys.stdout)
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | dict[str, str]]:
    """The wheel built offline and installed (no dependencies) into a fresh venv that sees this one's packages."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy of the tree, so that the build leaves nothing (build/, egg-info) in the checkout
    tree = tmp / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", str(tree), "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")], env=pip_env)
    (wheel,) = (tmp / "dist").glob("cnl-*.whl")
    assert "cnl/kernels/cpu.c" in zipfile.ZipFile(wheel).namelist()

    venv = tmp / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    run([base, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], env=pip_env)
    # then this environment's packages (torch...) as plain path lines: the .pth files there (the editable
    # install of cnl) are not processed, so cnl comes from the wheel
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "zz-test-dependencies.pth").write_text("".join(f"{path}\n" for path in ours))

    work = tmp / "work"  # outside the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "CNL_KERNELS")}
    env.update(CNL_CACHE=str(tmp / "cache"), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    return {"venv": venv, "python": python, "purelib": purelib, "work": work, "cache": tmp / "cache", "env": env}


def test_cnl_comes_from_the_wheel_and_its_cli_runs(installed):
    python, purelib, work, env = installed["python"], installed["purelib"], installed["work"], installed["env"]
    where = run([str(python), "-c", "import cnl; print(cnl.__file__)"], cwd=work, env=env).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    assert not Path(where).is_relative_to(ROOT)
    proc = run([str(installed["venv"] / "bin" / "cnl"), "--help"], cwd=work, env=env)
    assert proc.stdout.startswith("usage: cnl") and "train" in proc.stdout


@pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: the installed package cannot build its kernel")
def test_the_installed_package_builds_and_uses_its_cpu_kernel(installed):
    python, purelib, work, env = installed["python"], installed["purelib"], installed["work"], installed["env"]
    proc = run([str(python), "-c", KERNEL_CHECK], cwd=work, env=env)
    result = json.loads(proc.stdout)
    assert Path(result["cnl"]).is_relative_to(purelib)
    assert Path(result["source"]).is_relative_to(purelib) and Path(result["source"]).is_file()
    assert result["describe"] == result["name"], proc.stderr
    assert Path(result["library"]).parent == installed["cache"] / "kernels"
    assert result["frozen"] == result["conflicts"] > 0
    assert result["frozen_kept"] and result["others_moved"]
    assert "eager" not in proc.stderr, proc.stderr
