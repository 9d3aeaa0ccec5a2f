"""Build and packaging behaviour: CUDA toolkit discovery, the import-time torch check, the
reference fallback when the extension is missing, and the `geokernels info` command."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import geokernels

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="geokernels_setup")  # main() not run


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_find_cuda_home_follows_wrapper_script(tmp_path, monkeypatch):
    mod = _setup_module()
    toolkit = _fake_toolkit(tmp_path / "cuda-13.7")
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert mod["find_cuda_home"]() == str(toolkit)


def test_find_cuda_home_prefers_valid_env(tmp_path, monkeypatch):
    mod = _setup_module()
    toolkit = _fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert mod["find_cuda_home"]() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))  # invalid: ignored, not trusted
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert mod["find_cuda_home"]() != str(tmp_path / "missing")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=300)


def test_missing_extension_falls_back_to_reference_with_one_warning():
    code = """
import sys, warnings
sys.modules['geokernels._C'] = None          # as if the extension had never been built
import torch, geokernels
from geokernels import reference
u = torch.rand(1, 1, 8, 9, dtype=torch.float64)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    a = geokernels.qc2_loss(u)
    b = geokernels.qc2_loss(u)
msgs = [str(x.message) for x in w if 'reference backend' in str(x.message)]
assert len(msgs) == 1, msgs
assert 'not built' in msgs[0] and 'pip install' in msgs[0]
assert torch.equal(a, reference.qc2_loss(u)) and torch.equal(a, b)
print('ok')
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_torch_version_mismatch_is_a_clear_import_error():
    code = """
import sys, types
fake = types.ModuleType('geokernels._C')
fake.TORCH_VERSION = '1.0.0'
sys.modules['geokernels._C'] = fake
try:
    import geokernels
except ImportError as e:
    print('ERR:', e)
"""
    r = _run(code)
    assert "ERR:" in r.stdout, (r.stdout, r.stderr)
    msg = r.stdout
    assert "built against torch 1.0.0" in msg and torch.__version__ in msg
    assert "--no-build-isolation" in msg


def test_extension_matches_running_torch():
    ext = geokernels._extension.extension()
    assert ext is not None, "geokernels._C is not built"
    assert ext.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert torch.ops.geokernels.cuda_compiled() == ext.cuda_compiled()


def test_info_command_json():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "geokernels", "info", "--json"], capture_output=True,
                       text=True, env=env, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["geokernels"] == geokernels.__version__
    assert info["extension_built"] is True
    assert "qc2_loss" in info["ops"]
    assert info["ops"]["qc2_loss"]["cpu"][0] == "cpu"  # what auto picks on CPU tensors


def test_backend_env_var(monkeypatch):
    u = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    monkeypatch.setenv("GEOKERNELS_BACKEND", "torch")
    assert geokernels._backend.resolve("qc2_loss", "auto", u) == "torch"
    monkeypatch.setenv("GEOKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable GEOKERNELS_BACKEND must be one of"):
        geokernels.qc2_loss(u)


def test_set_checks_switch():
    bad = torch.full((1, 1, 3, 3), float("nan"))
    try:
        geokernels.set_checks("never")
        geokernels.qc2_loss(bad)  # no scan: the caller opted out
        with pytest.raises(ValueError, match="mode"):
            geokernels.set_checks("sometimes")
    finally:
        geokernels.set_checks("cpu")
    with pytest.raises(ValueError, match="u contains NaN"):
        geokernels.qc2_loss(bad)


def test_stale_extension_is_a_clear_import_error():
    # a _C built from an older checkout (lacking ops this tree declares) must say "rebuild"
    code = """
import torch, geokernels
from geokernels import _extension
try:
    _extension.require_ops("qc2_loss_forward", "an_op_from_the_future")
except ImportError as e:
    print('ERR:', e)
"""
    r = _run(code)
    assert "ERR:" in r.stdout and "out of date" in r.stdout and "an_op_from_the_future" in r.stdout, r.stdout


def test_sdist_holds_every_build_input(tmp_path):
    """`pip install geokernels-*.tar.gz` (and `python -m build`, which builds the wheel from the
    sdist) compiles from the sdist alone: every C++/CUDA source and header, the bindings and the
    shipped assets must be in it (setuptools packs the listed sources, not the headers)."""
    import shutil
    import tarfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.egg-info")
    for name in ("csrc", "python", "geokernels", "tests", "docs", "benchmarks"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=skip)
    env = dict(os.environ, GEOKERNELS_NO_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar",
                           "-d", str(tmp_path / "dist")], cwd=str(src), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = (tmp_path / "dist").glob("geokernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {p.relative_to(ROOT).as_posix() for pattern in (
        "csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.cu", "python/*.cpp",
        "geokernels/assets/*", "tests/*.py") for p in ROOT.glob(pattern)}
    assert any(n.startswith("csrc/include/") for n in needed)
    assert not needed - packed, sorted(needed - packed)
