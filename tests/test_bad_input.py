"""Bad input, as a new user or an attacker would give it: every case exits 2 with one line on stderr and no
traceback, within 10 s and 1 GB; Ctrl-C exits 130; a closed stdout is one line, not a traceback.

The cases run as the real `superopt` command would: each in its own process (forked from one driver that has
imported superopt once, so the corpus takes seconds), with its own exit code, stdout, stderr, wall time and
peak memory. The driver is this file run as a script (see `drive`).
"""

from __future__ import annotations

import ast
import json
import keyword
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SPEC = """\
name: ok
dims: {B: 2, D: 64, N: 16}
inputs:
  x: {shape: [B, D], dtype: float16}
  w: {shape: [D, N], dtype: float16}
ops:
  - y = rms_norm(x, eps=1e-6)
  - o = matmul(y, w)
outputs: [o]
"""
MODEL = """\
name: tiny
model:
  model_type: llama
  hidden_size: 64
  intermediate_size: 128
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  head_dim: 16
  vocab_size: 256
max_seq: 64
"""
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LIMIT_S = 10.0
LIMIT_BYTES = 2**30


def spec(**replace: str) -> str:
    """SPEC with lines replaced: key -> new text for the line starting with that key."""
    lines = SPEC.splitlines()
    for key, text in replace.items():
        lines = [text if line.lstrip().startswith(key) else line for line in lines]
    return "\n".join(lines) + "\n"


def model(**fields: str) -> str:
    lines = MODEL.splitlines()
    for key, value in fields.items():
        hit = [k for k, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
        if hit:
            lines[hit[0]] = lines[hit[0]].split(":")[0] + f": {value}"
        else:
            lines.insert(2, f"  {key}: {value}")
    return "\n".join(lines) + "\n"


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def onnx_without_shapes() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph).SerializeToString() if onnx else b""


def chain(n: int) -> str:
    ops = ["  - t0 = exp(x)", *(f"  - t{k} = exp(t{k - 1})" for k in range(1, n))]
    return spec(outputs=f"outputs: [t{n - 1}]").replace(
        "  - y = rms_norm(x, eps=1e-6)\n  - o = matmul(y, w)", "\n".join(ops)
    )


def graph_json(name: str, edit) -> str:
    """A hand-fused graph of examples/fused, changed by `edit(doc)` (which may return a replacement)."""
    doc = json.loads((EXAMPLES / "fused" / f"{name}.json").read_text())
    return json.dumps(edit(doc) or doc)


def setter(*path: object, value: object):
    def edit(doc):
        at = doc
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value

    return edit


BLOCK = ("ops", 0, "block")
GRAPHS = {
    "g_inputs_int.json": setter("inputs", value=5),
    "g_ops_str.json": setter("ops", value="x"),
    "g_grid_zero.json": setter(*BLOCK, "grid", value=[0]),
    "g_grid_negative.json": setter(*BLOCK, "grid", value=[-1]),
    "g_grid_str.json": setter(*BLOCK, "grid", value=["a"]),
    "g_grid_huge.json": setter(*BLOCK, "grid", value=[2**40]),
    "g_imap_range.json": setter(*BLOCK, "inputs", 0, "imap", value=[7]),
    "g_fmap_range.json": setter(*BLOCK, "inputs", 0, "fmap", value=9),
    "g_forloop_zero.json": setter(*BLOCK, "forloop_range", value=0),
    "g_forloop_huge.json": setter(*BLOCK, "forloop_range", value=10**9),
    "g_block_size.json": setter(*BLOCK, "block_size", value=-1),
    "g_op_name.json": setter(*BLOCK, "ops", 0, "op", value="__import__"),
    "g_output_missing.json": setter("outputs", value=["nope"]),
    "g_shape_huge.json": setter("inputs", 0, "shape", value=[10**12, 256]),
    "g_shape_str.json": setter("inputs", 0, "shape", value="16x256"),
    "g_name_newline.json": setter("name", value="a\n*/ __global__ void evil(){}"),
    "g_tensor_name.json": setter("inputs", 0, "name", value="1 x"),
    "g_tensor_keyword.json": setter("inputs", 0, "name", value="lambda"),
    "g_attrs_list.json": setter(*BLOCK, "ops", 1, "attrs", value=[1]),
    "g_concat_dim.json": setter(*BLOCK, "ops", 1, "attrs", "dim", value=5),
    "g_dtype.json": setter("inputs", 0, "dtype", value="int4"),
    "g_block_ops_int.json": setter(*BLOCK, "ops", value=3),
}


# name -> (files to write: name -> text or bytes, the arguments after `superopt`). "{d}" is the case's folder.
FILES = {
    "binary.yaml": random.Random(0).randbytes(4000),
    "binary.json": random.Random(1).randbytes(4000),
    "latin1.yaml": SPEC.encode().replace(b"ok", b"\xe9t\xe9"),
    "nul.yaml": SPEC.encode().replace(b"name: ok", b"name: o\x00k"),
    "nested.json": nested_json(100_000),
    "nested.yaml": nested_json(100_000),
    "laughs.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    + SPEC,
    "eps_nan.yaml": spec(**{"- y =": "  - y = rms_norm(x, eps=1e999 - 1e999)"}),
    "eps_inf.yaml": spec(**{"- y =": "  - y = rms_norm(x, eps=1e999)"}),
    "eps_negative.yaml": spec(**{"- y =": "  - y = rms_norm(x, eps=-1e-6)"}),
    "eps_zero.yaml": spec(**{"- y =": "  - y = rms_norm(x, eps=0.0)"}),
    "scalar_inf.yaml": spec(**{"- o =": "  - o = mul_scalar(y, 1e999)"}),
    "rank0.yaml": spec(**{"x:": "  x: {shape: [], dtype: float16}"}),
    "dim_huge.yaml": spec(dims="dims: {B: 1000000000000, D: 64, N: 16}"),
    "dim_elements.yaml": spec(dims="dims: {B: 2000000, D: 2000000, N: 16}"),
    "dim_float.yaml": spec(dims="dims: {B: 1.5, D: 64, N: 16}"),
    "dim_negative.yaml": spec(dims="dims: {B: -2, D: 64, N: 16}"),
    "dim_zero.yaml": spec(dims="dims: {B: 0, D: 64, N: 16}"),
    "dim_digits.yaml": spec(dims="dims: {B: " + "9" * 5000 + ", D: 64, N: 16}"),
    "literal_digits.yaml": spec(**{"- o =": "  - o = mul_scalar(y, " + "9" * 5000 + ")"}),
    "chain1500.yaml": chain(1500),
    "unknown_op.yaml": spec(**{"- o =": "  - o = frobnicate(y, w)"}),
    "arity.yaml": spec(**{"- o =": "  - o = matmul(y)"}),
    "shapes.yaml": spec(**{"- o =": "  - o = matmul(w, w)"}),
    "undefined_output.yaml": spec(outputs="outputs: [nope]"),
    "injection.yaml": spec(**{"- o =": "  - o = __import__('os').system('touch {d}/pwned')"}),
    "lambda.yaml": spec(**{"- o =": "  - o = (lambda: y)()"}),
    "attribute.yaml": spec(**{"- o =": "  - o = y.__class__"}),
    "empty.yaml": "",
    "list.yaml": "- a\n- b\n",
    "no_inputs.yaml": SPEC.replace("inputs:", "inputz:"),
    "dtype.yaml": spec(**{"x:": "  x: {shape: [B, D], dtype: float128}"}),
    "duplicate.yaml": spec(**{"- o =": "  - y = matmul(y, w)"}),
    "budget_negative.yaml": SPEC + "search: {budget_s: -5}\n",
    "budget_nan.yaml": SPEC + "search: {budget_s: .nan}\n",
    "budget_inf.yaml": SPEC + "search: {budget_s: .inf}\n",
    "preset.yaml": SPEC + "search: {preset: nope}\n",
    "device.yaml": SPEC + "search: {device: tpu}\n",
    "seed.yaml": SPEC + "search: {seed: 1180591620717411303424}\n",
    "states_fraction.yaml": SPEC + "search: {states: 1.5}\n",
    "states_zero.yaml": SPEC + "search: {states: 0}\n",
    "graph_types.json": json.dumps({"name": "g", "inputs": 5, "ops": "x", "outputs": []}),
    "graph_map.json": json.dumps(
        {
            "name": "g",
            "inputs": [{"name": "x", "shape": [2, 4], "dtype": "float32"}],
            "ops": [{"op": "graph_def", "inputs": ["x"], "outputs": ["o"], "block": {"grid": [2], "inputs": 7}}],
            "outputs": ["o"],
        }
    ),
    "notes.txt": SPEC,
    "garbage.onnx": random.Random(2).randbytes(3000),
    "empty.onnx": b"",
    "shapeless.onnx": onnx_without_shapes(),
    "garbage.pt2": random.Random(3).randbytes(3000),
    "empty.pt2": b"PK\x05\x06" + b"\x00" * 18,
    "ok.yaml": SPEC,
    "ok_model.yaml": MODEL,
    "model_binary.yaml": random.Random(4).randbytes(2000),
    "model_hidden_str.yaml": model(hidden_size='"abc"'),
    "model_heads_negative.yaml": model(num_attention_heads="-4"),
    "model_heads_zero.yaml": model(num_key_value_heads="0"),
    "model_layers_huge.yaml": model(num_hidden_layers="10000000000000"),
    "model_eps_nan.yaml": model(rms_norm_eps=".nan"),
    "model_type.yaml": model(model_type="gpt9"),
    "model_type_list.yaml": model(model_type="[1, 2]"),
    "model_rope.yaml": model(rope_scaling="[1, 2]"),
    "model_act.yaml": model(hidden_act="swish9"),
    "model_act_list.yaml": model(model_type="gemma", hidden_activation="[gelu]"),
    "model_window.yaml": model(model_type="mistral", sliding_window="-3"),
    "model_window_str.yaml": model(model_type="mistral", sliding_window='"8"'),
    "model_qwen2_window.yaml": model(model_type="qwen2", use_sliding_window="true"),
    "model_rope_factor.yaml": model(rope_scaling="{rope_type: llama3, factor: abc}"),
    "model_max_seq.yaml": MODEL.replace("max_seq: 64", "max_seq: -1"),
    "model_max_seq_huge.yaml": MODEL.replace("max_seq: 64", "max_seq: 1000000000000"),
    "model_name_list.yaml": MODEL.replace("name: tiny", "name: [1, 2]"),
    "model_name_newline.yaml": MODEL.replace("name: tiny", 'name: "a\\n__global__ void evil(){}"'),
    "model_config_path.yaml": MODEL.split("model:")[0] + "model: binary.json\n",
    "model_weights_list.yaml": MODEL + "weights: [a, b]\n",
    "model_unknown_key.yaml": MODEL + "wieghts: x\n",
    "model_nested.yaml": nested_json(100_000),
    "import_binary.json": random.Random(5).randbytes(2000),
    "import_nested.json": '{"format": "superopt.cache-export/1", "entries": ' + nested_json(100_000) + "}",
    "import_key.json": json.dumps({"format": "superopt.cache-export/1", "entries": [{"key": "../../x"}]}),
    "import_nan.json": '{"format": "superopt.cache-export/1", "entries": [{"key": NaN}]}',
    "a_file": "not a folder",
    "g_eps_nan.json": graph_json("rmsnorm_linear_bs1", lambda doc: doc)
    .replace('"eps": 1e-06', '"eps": NaN')
    .replace('"eps":1e-06', '"eps":NaN'),
    **{name: graph_json("lora", edit) for name, edit in GRAPHS.items()},
}
SEARCH = ["search", "--progress", "none", "--cache-dir", "{d}/cache"]
CASES = {
    **{
        f"validate {name}": ["validate", f"{{d}}/{name}"]
        for name in FILES
        if not name.startswith(("ok", "import", "model", "a_", "chain"))
    },
    "run eps_nan": ["run", "{d}/eps_nan.yaml"],
    "run dim_elements": ["run", "{d}/dim_elements.yaml"],
    "run dim_huge": ["run", "{d}/dim_huge.yaml"],
    "run scale -1": ["run", "{d}/ok.yaml", "--scale", "-1"],
    "run scale nan": ["run", "{d}/ok.yaml", "--scale", "nan"],
    "run seed 2^70": ["run", "{d}/ok.yaml", "--seed", str(2**70)],
    "run seed -1": ["run", "{d}/ok.yaml", "--seed", "-1"],
    "show dot missing folder": ["show", "{d}/ok.yaml", "--dot", "{d}/missing/g.dot"],
    "search dim_huge": [*SEARCH, "{d}/dim_huge.yaml"],
    "search budget -5": [*SEARCH, "{d}/ok.yaml", "--budget", "-5"],
    "search budget 0": [*SEARCH, "{d}/ok.yaml", "--budget", "0"],
    "search budget nan": [*SEARCH, "{d}/ok.yaml", "--budget", "nan"],
    "search budget inf": [*SEARCH, "{d}/ok.yaml", "--budget", "inf"],
    "search seed 2^70": [*SEARCH, "{d}/ok.yaml", "--seed", str(2**70)],
    "search device empty": [*SEARCH, "{d}/ok.yaml", "--device", ""],
    "search device tpu": [*SEARCH, "{d}/ok.yaml", "--device", "tpu"],
    "search preset": [*SEARCH, "{d}/ok.yaml", "--preset", "nope"],
    "search out missing folder": [*SEARCH, "{d}/ok.yaml", "--out", "{d}/missing/r.json"],
    "search cache-dir is a file": ["search", "--progress", "none", "--cache-dir", "{d}/a_file", "{d}/ok.yaml"],
    "search cache-dir under a file": ["search", "--progress", "none", "--cache-dir", "{d}/a_file/c", "{d}/ok.yaml"],
    "search spec budget_nan": [*SEARCH, "{d}/budget_nan.yaml"],
    "search no spec": ["search"],
    "search unknown option": [*SEARCH, "{d}/ok.yaml", "--frobnicate"],
    "unknown command": ["frobnicate"],
    "verify tests 0": ["verify", "{d}/ok.yaml", "{d}/ok.yaml", "--tests", "0"],
    "verify tests 1e9": ["verify", "{d}/ok.yaml", "{d}/ok.yaml", "--tests", "1e9"],
    "verify tests 10^9": ["verify", "{d}/ok.yaml", "{d}/ok.yaml", "--tests", str(10**9)],
    "verify seed 2^70": ["verify", "{d}/ok.yaml", "{d}/ok.yaml", "--seed", str(2**70)],
    "verify binary": ["verify", "{d}/binary.yaml", "{d}/ok.yaml"],
    "cache clear -1": ["cache", "--cache-dir", "{d}/cache", "clear", "--older-than", "-1"],
    "cache clear nan": ["cache", "--cache-dir", "{d}/cache", "clear", "--older-than", "nan"],
    "cache show path": ["cache", "--cache-dir", "{d}/cache", "show", "../../etc"],
    "cache show empty": ["cache", "--cache-dir", "{d}/cache", "show", ""],
    "cache export missing folder": ["cache", "--cache-dir", "{d}/cache", "export", "{d}/missing/x.json"],
    "cache import binary": ["cache", "--cache-dir", "{d}/cache", "import", "{d}/import_binary.json"],
    "cache import nested": ["cache", "--cache-dir", "{d}/cache", "import", "{d}/import_nested.json"],
    "cache import key": ["cache", "--cache-dir", "{d}/cache", "import", "{d}/import_key.json"],
    "cache import nan": ["cache", "--cache-dir", "{d}/cache", "import", "{d}/import_nan.json"],
    **{
        f"megakernel {name}": ["megakernel", f"{{d}}/{name}", "--emit", "{d}/emit"]
        for name in FILES
        if name.startswith("model_")
    },
    "megakernel sms 0": ["megakernel", "{d}/ok_model.yaml", "--emit", "{d}/emit", "--sms", "0"],
    "megakernel emit under a file": ["megakernel", "{d}/ok_model.yaml", "--emit", "{d}/a_file/out"],
}


def drive(cases: dict[str, dict], out: Path) -> None:
    """Runs each case's `superopt` arguments in a forked child: stdout and stderr to files, killed after LIMIT_S;
    records exit code (signal: negative), wall time and the child's peak resident memory."""
    from superopt.cli.main import main

    results = {}
    for name, case in cases.items():
        stdout, stderr = out / f"{len(results)}.out", out / f"{len(results)}.err"
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: the command, as the console script runs it
            with open(stdout, "wb") as o, open(stderr, "wb") as e:
                os.dup2(o.fileno(), 1)
                os.dup2(e.fileno(), 2)
            if case.get("closed_stdout"):
                r, w = os.pipe()
                os.close(r)
                os.dup2(w, 1)
            signal.alarm(int(LIMIT_S) + 2)
            if case.get("interrupt_after"):
                signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
                signal.setitimer(signal.ITIMER_REAL, case["interrupt_after"])
            try:
                main(case["args"], prog_name="superopt")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 (an escape is what the test looks for)
                import traceback

                traceback.print_exc()
                code = 99
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        results[name] = {
            "code": code,
            "seconds": time.monotonic() - start,
            "max_rss": usage.ru_maxrss * 1024,
            "stdout": stdout.read_text(errors="replace"),
            "stderr": stderr.read_text(errors="replace"),
        }
    (out / "results.json").write_text(json.dumps(results))


def run_cases(tmp_path: Path, cases: dict[str, dict]) -> dict[str, dict]:
    for name, text in FILES.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with open(tmp_path / "huge.yaml", "wb") as f:  # sparse: larger than a spec may be, no disk used
        f.truncate(65 * 2**20)
    formatted = {n: c | {"args": [a.format(d=tmp_path) for a in c["args"]]} for n, c in cases.items()}
    (tmp_path / "cases.json").write_text(json.dumps(formatted))
    out = tmp_path / "out"
    out.mkdir()
    env = os.environ | {"HOME": str(tmp_path), "SUPEROPT_CACHE_DIR": str(tmp_path / "default-cache")}
    subprocess.run([sys.executable, __file__, str(tmp_path / "cases.json"), str(out)], env=env, check=True, timeout=900)
    return json.loads((out / "results.json").read_text())


CORPUS = {name: {"args": args} for name, args in CASES.items()} | {
    "validate huge": {"args": ["validate", "{d}/huge.yaml"]},
    "validate closed stdout": {"args": ["validate", "{d}/ok.yaml"], "closed_stdout": True},
    "show closed stdout": {"args": ["show", "{d}/chain1500.yaml"], "closed_stdout": True},
}


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return root, run_cases(root, CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input_is_one_line_and_exit_2(corpus, name):
    root, results = corpus
    r = results[name]
    lines = r["stderr"].strip().splitlines()
    assert r["code"] == 2, (name, r)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, r["stderr"])
    assert "Traceback" not in r["stderr"] + r["stdout"]
    assert r["seconds"] < LIMIT_S and r["max_rss"] < LIMIT_BYTES, (name, r["seconds"], r["max_rss"])
    assert not (root / "pwned").exists()


def test_a_long_chain_is_a_program_not_an_error(tmp_path):
    """1500 ops nest an expression 1500 deep: every walk over it (validate, show, the search's abstract
    expressions) works without recursion."""
    from superopt.search_space import search
    from superopt.spec import parse_spec

    results = run_cases(tmp_path, {c: {"args": [c, "{d}/chain1500.yaml"]} for c in ("validate", "show")})
    assert [r["code"] for r in results.values()] == [0, 0], results
    assert "1500 kernel ops" in results["validate"]["stdout"] and "t1499" in results["show"]["stdout"]
    found = search(parse_spec(chain(1500)), budget_s=1, progress="none")
    assert found.candidates[0].kernels == 1500


HOSTILE_NAMES = [
    "*/ __global__ void evil(){} /*",
    "x\\\nvoid evil()",
    "if",
    "9lives",
    "\u00e9t\u00e9 \u2603",
    "a" * 190,
    "import os; os.system('x')",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_never_reach_generated_source(tmp_path, name):
    """A model's or a graph's name reaches generated CUDA and Triton only through `identifier`: the emitted
    source declares only its own kernels, and a Triton module is named and defined safely and runs."""
    import torch

    import superopt
    from superopt.kernels import compile
    from superopt.kernels.megakernel import source
    from superopt.kernels.taskgraph import build
    from superopt.model import load_spec

    tiny = (EXAMPLES / "models" / "tiny-llama.yaml").read_text()
    (tmp_path / "m.yaml").write_text(tiny.replace("name: tiny-llama", f"name: {json.dumps(name)}"))
    if not name.isprintable():  # a line break could end the comment it is pasted into: refused outright
        with pytest.raises(superopt.SpecError, match="'name' must be one printable line"):
            load_spec(tmp_path / "m.yaml")
        return
    ms = load_spec(tmp_path / "m.yaml")
    assert ms.name == name
    cuda = source(build(ms.config, 8), ms.name, ms.max_seq, ms.max_seq)
    first, *rest = cuda.splitlines()
    assert re.fullmatch(r"// superopt megakernel: \w+ \(llama\), 8 SMs, \d+ tasks a step", first, re.ASCII), first
    assert "evil" not in "\n".join(rest)

    g = superopt.Graph(name)
    x = g.input("x", (2, 8), "float32")
    g.output(g.exp(x))
    fn = compile(g, module_dir=tmp_path / "kernels")
    (kernel,) = fn.kernels
    assert re.fullmatch(r"[A-Za-z_]\w{0,90}", kernel.code.name, re.ASCII) and not keyword.iskeyword(kernel.code.name)
    defs = [n.name for n in ast.parse(kernel.code.source).body if isinstance(n, ast.FunctionDef)]
    assert kernel.code.name in defs and name not in kernel.code.source.replace(kernel.code.name, "")
    t = torch.randn(2, 8)
    assert torch.allclose(fn(t)[0], t.exp())
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [f"{kernel.code.name}.py"]


def test_generated_modules_go_into_the_cache_dir_given(tmp_path):
    """`--cache-dir` holds the results and the Triton modules; nothing lands in $HOME or the default cache."""
    (tmp_path / "ok.yaml").write_text(SPEC)
    results = run_cases(tmp_path, {"search": {"args": [*SEARCH, "{d}/ok.yaml", "--budget", "2"]}})
    assert results["search"]["code"] == 0, results
    assert list((tmp_path / "cache" / "triton").glob("*.py")) and list((tmp_path / "cache" / "results").glob("*.json"))
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "default-cache").exists()


def test_ctrl_c_exits_130(tmp_path):
    (result,) = run_cases(
        tmp_path,
        {"search": {"args": [*SEARCH, str(EXAMPLES / "gated_mlp.yaml"), "--budget", "60"], "interrupt_after": 2.0}},
    ).values()
    assert result["code"] == 130 and result["stderr"].strip().splitlines()[-1] == "interrupted", result


if __name__ == "__main__":
    drive(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
