"""Source checks of the Triton kernels that the interpreter of the newest Triton cannot catch.

Triton 3.6's interpreter (TRITON_INTERPRET=1, how the Triton backends run on a CPU) turns an
``int`` kernel argument into a 1-element array, and ``range(arg)`` then fails with NumPy >= 2.4
("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 squeezes it. A loop
bound that is a kernel argument must therefore be a ``tl.constexpr``, which every supported
Triton handles (the bounds here are small: channels, stencil pairs, offsets).
"""
import ast
import pathlib

import pytest

import geokernels

TRITON_DIR = pathlib.Path(geokernels.__file__).parent / "triton"
SOURCES = sorted(TRITON_DIR.glob("*.py"))


def _is_jit(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def _is_constexpr(arg: ast.arg) -> bool:
    return arg.annotation is not None and ast.unparse(arg.annotation).endswith("constexpr")


def runtime_loop_bounds(source: str) -> list[str]:
    """'function: name' for every range() bound in a @triton.jit function that is a parameter
    of that function without a tl.constexpr annotation."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not (isinstance(fn, ast.FunctionDef) and _is_jit(fn)):
            continue
        runtime = {a.arg for a in fn.args.args if not _is_constexpr(a)}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "range"):
                names = {n.id for arg in node.args for n in ast.walk(arg)
                         if isinstance(n, ast.Name)}
                found += [f"{fn.name}: {name}" for name in sorted(names & runtime)]
    return found


def test_sources_found():
    assert len(SOURCES) >= 6, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_jit_loop_bounds_are_constexpr(path):
    assert runtime_loop_bounds(path.read_text()) == []


def test_checker_flags_a_runtime_bound():
    bad = (
        "import triton\nimport triton.language as tl\n"
        "@triton.jit\ndef k(x_ptr, N, M: tl.constexpr):\n"
        "    for i in range(0, N + 1):\n        pass\n"
        "    for j in range(M):\n        pass\n"
        "def host(N):\n    for i in range(N):\n        pass\n"
    )
    assert runtime_loop_bounds(bad) == ["k: N"]
