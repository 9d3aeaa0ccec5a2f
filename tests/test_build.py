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


def test_find_cuda_home_guesses_torchs_cuda_major_then_the_newest(tmp_path, monkeypatch):
    """Among /usr/local/cuda-*, text order picked 9.2 over 12.10 and 13.0, and a cu12 torch got
    the 13.0 toolkit, which torch's builder then refuses."""
    mod = _setup_module()
    find = mod["find_cuda_home"]
    roots = [str(_fake_toolkit(tmp_path / f"cuda-{v}")) for v in ("9.2", "12.9", "12.10", "13.0")]

    class FakeGlob:
        @staticmethod
        def glob(pattern):
            return list(roots) if pattern == "/usr/local/cuda-*" else []

    monkeypatch.setitem(find.__globals__, "glob", FakeGlob)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find() == roots[3]                   # no torch CUDA: the newest
    assert find("12.8") == roots[2]             # torch cu12: the newest 12.x (12.10, not 12.9)
    assert find("13.0") == roots[3]


def test_nvcc_version_is_read_from_the_toolkit(tmp_path):
    mod = _setup_module()
    tk = _fake_toolkit(tmp_path / "tk")
    (tk / "bin" / "nvcc").write_text(
        "#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    assert mod["nvcc_version"](str(tk)) == "12.8"
    (tk / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    assert mod["nvcc_version"](str(tk)) is None


def test_cuda_major_mismatch_builds_cpu_only_with_a_warning(tmp_path):
    """A CUDA 12 toolkit with a cu13 torch failed the install inside torch's builder, with no
    word of GEOKERNELS_NO_CUDA; now a warning and a CPU-only build (an error under FORCE)."""
    if not torch.version.cuda:
        pytest.skip("needs a CUDA build of torch")
    other = "11.8" if torch.version.cuda.split(".")[0] != "11" else "12.8"
    tk = _fake_toolkit(tmp_path / "tk")
    (tk / "bin" / "nvcc").write_text(
        f"#!/bin/sh\necho 'Cuda compilation tools, release {other}, V{other}.1'\n")
    code = f"""
import runpy, sys
mod = runpy.run_path({str(ROOT / 'setup.py')!r}, run_name='geokernels_setup')
seen = {{}}
mod['main'].__globals__['setup'] = lambda **kw: seen.update(kw)
mod['main']()
ext = seen['ext_modules'][0]
print('CUDA' if any(s.endswith('.cu') for s in ext.sources) else 'CPU-ONLY')
"""
    env = dict(os.environ, CUDA_HOME=str(tk))
    env.pop("GEOKERNELS_NO_CUDA", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("CPU-ONLY")
    assert f"is CUDA {other}" in r.stderr and "GEOKERNELS_NO_CUDA=1" in r.stderr
    env["GEOKERNELS_FORCE_CUDA"] = "1"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(ROOT), timeout=300)
    assert r.returncode != 0 and f"is CUDA {other}" in r.stderr


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


def test_extension_for_another_python_is_named():
    code = """
import glob, sys, warnings
real = glob.glob
glob.glob = lambda p: real(p) + ['/pkg/geokernels/_C.cpython-399-x86_64-linux-gnu.so']
sys.modules['geokernels._C'] = None
import torch, geokernels
glob.glob = real
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    geokernels.qc2_loss(torch.rand(1, 1, 4, 4))
print([str(x.message) for x in w if 'reference backend' in str(x.message)][0])
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "built for another Python (_C.cpython-399-x86_64-linux-gnu.so)" in r.stdout


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
    # the full version (it recorded torch/version.h's "2.14.1", which a "2.14.1a0+git..."
    # source build or nightly never equals: such a torch refused even a fresh build)
    assert ext.TORCH_VERSION == torch.__version__
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


def test_cuda_arch_list_parsing_and_compatibility():
    p, runs = geokernels._extension.parse_cuda_archs, geokernels._extension.archs_run_on
    assert p("8.0;9.0+PTX") == [((8, 0), "sass"), ((9, 0), "ptx")]
    assert p(" 7.5 8.6 ") == [((7, 5), "sass"), ((8, 6), "sass")]
    assert p("9.0a") == [((9, 0), "exact")]
    assert p("") is None and p(None) is None and p("Ampere;9.0") is None
    default = p("8.0;9.0+PTX")
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert runs(default, cap), cap
    for cap in ((7, 0), (7, 5)):
        assert not runs(default, cap), cap
    assert not runs(p("8.0"), (9, 0)) and not runs(p("8.6"), (8, 0))
    assert runs(p("9.0a"), (9, 0)) and not runs(p("9.0a"), (10, 0))


def test_gpu_older_than_the_build_falls_back_or_says_how_to_rebuild(monkeypatch):
    """A T4 (sm_75) with the default 8.0;9.0+PTX build failed every op with CUDA's 'no kernel
    image is available'; auto now warns once and uses Triton/the reference, backend='cuda' says
    which TORCH_CUDA_ARCH_LIST to rebuild with."""
    import types

    from torch._subclasses import FakeTensorMode

    from geokernels import _backend, _extension

    monkeypatch.setattr(_extension, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_extension, "_C", types.SimpleNamespace(CUDA_ARCHS="8.0;9.0+PTX"))
    monkeypatch.setattr(_extension, "_ARCH_PROBLEM", {})
    monkeypatch.setattr(_backend, "_ARCH_WARNED", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    with FakeTensorMode():
        u = torch.empty(1, 1, 4, 4, device="cuda")
    with pytest.warns(RuntimeWarning, match=r"cannot run on cuda:0 \(compute capability 7.5\)"):
        chosen = _backend.resolve("qc2_loss", "auto", u)
    assert chosen in ("triton", "torch")
    with pytest.raises(ValueError, match="rebuild with TORCH_CUDA_ARCH_LIST=7.5"):
        _backend.resolve("qc2_loss", "cuda", u)
    monkeypatch.setattr(_extension, "_ARCH_PROBLEM", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert _backend.resolve("qc2_loss", "auto", u) == "cuda"
