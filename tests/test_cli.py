"""The CLI and spec loading: good runs, and every kind of bad input as one line on stderr with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import superopt
from superopt.cli.main import main

SPEC = """\
name: rmsnorm_linear
dims: {B: 2, D: 64, N: 96}
inputs:
  x: {shape: [B, D], dtype: float16}
  w: {shape: [D, N], dtype: float16}
ops:
  - y = rms_norm(x, eps=1e-6)
  - o = matmul(y, w)
outputs: [o]
search: {preset: mlp, budget_s: 120}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_run_prints_shape_dtype_and_checksums_deterministically(tmp_path):
    spec = write(tmp_path, SPEC)
    first, second, other = invoke("run", str(spec)), invoke("run", str(spec)), invoke("run", str(spec), "--seed", "1")
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith("o: shape=[2, 96] dtype=float16 sum=")
    assert first.stdout == second.stdout != other.stdout


def test_show_and_validate(tmp_path):
    spec = write(tmp_path, SPEC)
    shown = invoke("show", str(spec), "--dot", str(tmp_path / "g.dot"))
    assert shown.exit_code == 0
    assert "    y: float16[2, 64] = rms_norm(x, eps=1e-06)" in shown.stdout.splitlines()
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith('digraph "rmsnorm_linear"') and '"k:y"' in dot
    checked = invoke("validate", str(spec))
    assert checked.exit_code == 0
    assert f"hash {superopt.graph_hash(superopt.load(spec))[:16]}" in checked.stdout


def test_spec_dims_override_and_search_section(tmp_path):
    g = superopt.load(write(tmp_path, SPEC), dims={"D": 16})
    assert g.tensors["w"].shape == (16, 96)
    assert g.search_settings == {"preset": "mlp", "budget_s": 120}
    with pytest.raises(superopt.SpecError, match="cannot override dim 'K'"):
        superopt.load(write(tmp_path, SPEC), dims={"K": 4})


def test_operator_sugar_builds_the_same_program(tmp_path):
    sugared = SPEC.replace("  - o = matmul(y, w)\n", "  - o = (y @ w) * 2 - 1\n")
    explicit = SPEC.replace(
        "  - o = matmul(y, w)\n", "  - m = matmul(y, w)\n  - d = mul_scalar(m, 2)\n  - o = add_scalar(d, -1)\n"
    )
    a, b = superopt.load(write(tmp_path, sugared, "a.yaml")), superopt.load(write(tmp_path, explicit, "b.yaml"))
    assert superopt.graph_hash(a) == superopt.graph_hash(b)


def test_json_files_load_like_specs(tmp_path):
    g = superopt.load(write(tmp_path, SPEC))
    superopt.serialize.dump(g, tmp_path / "g.json")
    assert invoke("run", str(tmp_path / "g.json")).stdout == invoke("run", str(tmp_path / "spec.yaml")).stdout


BAD = [
    ("unknown op", ("  - o = matmul(y, w)", "  - o = softmax(y)"), ":8: op 'o = softmax(y)': unknown op 'softmax'"),
    ("wrong arity", ("  - o = matmul(y, w)", "  - o = matmul(y)"), ":8: op 'o = matmul(y)': matmul takes 2 tensor"),
    (
        "unknown keyword",
        ("eps=1e-6", "ep=1e-6"),
        ":7: op 'y = rms_norm(x, ep=1e-6)': unknown keyword 'ep' for rms_norm",
    ),
    ("shape mismatch", ("matmul(y, w)", "matmul(y, x)"), ":8: op 'o = matmul(y, x)': matmul: inner dims differ"),
    (
        "bad dtype",
        ("w: {shape: [D, N], dtype: float16}", "w: {shape: [D, N], dtype: float64}"),
        ":5: input 'w': bad dtype",
    ),
    ("YAML syntax", ("outputs: [o]", "outputs: [o"), ": YAML syntax error"),
    ("output never computed", ("outputs: [o]", "outputs: [o, z]"), ":9: output 'z' is never computed"),
    ("input missing", ("matmul(y, w)", "matmul(y, h)"), ":8: op 'o = matmul(y, h)': unknown name 'h'"),
    (
        "code in an op line",
        ("  - o = matmul(y, w)", "  - o = __import__('os')"),
        ":8: op 'o = __import__('os')': unknown op",
    ),
    ("attribute access", ("  - o = matmul(y, w)", "  - o = y.__class__"), "'y.__class__' is not allowed in an op line"),
    ("a statement", ("  - o = matmul(y, w)", "  - import os"), ":8: op 'import os': expected one assignment"),
    ("unknown dim", ("[D, N]", "[D, M]"), ":5: input 'w': unknown dim 'M'"),
    ("unknown section", ("search:", "serch:"), ":10: unknown key 'serch'"),
    (
        "no inputs section",
        ("inputs:\n  x: {shape: [B, D], dtype: float16}\n  w: {shape: [D, N], dtype: float16}\n", ""),
        ": the spec has no 'inputs'",
    ),
]


@pytest.mark.parametrize("case, edit, message", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_is_one_line_exit_2(tmp_path, case, edit, message):
    assert edit[0] in SPEC
    spec = write(tmp_path, SPEC.replace(edit[0], edit[1]))
    for command in ("run", "validate", "show"):
        result = invoke(command, str(spec))
        assert result.exit_code == 2, (case, result.stdout)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"error: {spec}")
        assert message in result.stderr


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("missing.yaml", None, "cannot read"),
        ("g.json", "{nope", "g.json:1: JSON syntax error"),
        ("g.json", json.dumps({"format": "other"}), "not a superopt graph"),
        ("g.txt", "x", "unknown file type '.txt'"),
        (
            "g.json",
            json.dumps(
                {
                    "format": "superopt.graph/1",
                    "name": "p",
                    "inputs": [{"name": "x", "shape": [2, 3], "dtype": "float16"}],
                    "ops": [{"op": "matmul", "inputs": ["x", "x"], "outputs": ["y"]}],
                    "outputs": ["y"],
                }
            ),
            "g.json: ops[0] (matmul -> y): matmul: inner dims differ",
        ),
    ],
)
def test_bad_files_are_one_line_exit_2(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    result = invoke("validate", str(path))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_console_script_exits_2_without_traceback(tmp_path):
    spec = write(tmp_path, SPEC.replace("softmax", "x").replace("matmul(y, w)", "softmax(y)"))
    proc = subprocess.run([sys.executable, "-m", "superopt.cli.main", "run", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("unknown op 'softmax'") and "Traceback" not in proc.stderr


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_are_eleven_examples():
    assert len(EXAMPLES) == 11


@pytest.mark.parametrize("spec", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_run_every_example(spec):
    result = invoke("run", str(spec))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("o: shape=") and "non-finite" not in result.stdout
