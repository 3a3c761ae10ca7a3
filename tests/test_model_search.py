"""`superopt search MODEL.yaml`: every layer program of a tiny decoder searched, verified and cached once, the plan
stored under the model's key and served again (re-verified), `--require-hit` and `--offline` for models, a
tampered plan never served; `superopt megakernel` built from the plan: every GEMV task body lowered from the
winners, its source compiles, its replay (the lowered stages by the reference interpreter's rules) equals the
reference decoder, the build report names each winner."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import superopt
from superopt.cache import Cache
from superopt.cli.megakernel_cmd import megakernel_command
from superopt.cli.search_cmd import search_command
from superopt.kernels import taskgraph
from superopt.kernels.cuda_codegen import elementwise_steps, emit_elementwise
from superopt.kernels.megakernel import Generation, agrees_with_replay, build_report, replay, source
from superopt.kernels.megakernel.lowering import KINDS
from superopt.model import Decoder, ProgramDecoder, is_model_spec, layer_programs, load_spec
from superopt.model_search import search_model
from superopt.pipeline import Settings

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
TINY = ("tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-gemma", "tiny-mistral")
BUDGET = ["--budget", "10", "--states", "2000", "--progress", "none"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """Each tiny model searched once through the CLI: name -> (cache folder, the --json output)."""
    out = {}
    for name in TINY:
        cache = tmp_path_factory.mktemp(name)
        result = CliRunner().invoke(
            search_command, [str(MODELS / f"{name}.yaml"), "--json", "--cache-dir", str(cache), *BUDGET]
        )
        assert result.exit_code == 0, result.output
        out[name] = cache, json.loads(result.stdout[result.stdout.index("{") :])
    return out


def test_model_specs_are_told_from_programs():
    assert all(is_model_spec(MODELS / f"{n}.yaml") for n in TINY)
    assert is_model_spec(MODELS / "tiny-qwen3.json")  # an HF config.json
    assert not is_model_spec(MODELS.parent / "lora.yaml") and not is_model_spec(MODELS.parent / "fused" / "lora.json")


@pytest.mark.parametrize("name", TINY)
def test_every_layer_program_is_searched_verified_and_cached_once(searched, name):
    cache, doc = searched[name]
    spec = load_spec(MODELS / f"{name}.yaml")
    programs = layer_programs(spec.config, spec.max_seq)
    assert doc["cache"]["status"] == "searched" and set(doc["programs"]) == set(programs)
    for pname, result in doc["programs"].items():
        assert result["program_hash"] == superopt.graph_hash(programs[pname])
        assert result["best"]["verify"]["method"] in ("identity", "proved", "tested")
        assert result["best"]["status"] == "ok"  # run under the Triton interpreter against the reference
    plan = doc["plan"]
    assert [p["name"] for p in plan["programs"]] == list(programs)
    assert Cache(cache).plan_path(plan["key"]).exists()
    # Translation validation: every program a task body is lowered from, its lowering verified against it.
    lowered = {"attn_in", "attn_out", "mlp", "lm_head", "qk_rope", "attention"}
    assert set(doc["lowering"]) == lowered and all(v["equivalent"] for v in doc["lowering"].values())


@pytest.mark.parametrize("name", TINY)
def test_a_second_search_hits_and_require_hit_exits_0_then_1(searched, name, tmp_path):
    cache, doc = searched[name]
    spec = str(MODELS / f"{name}.yaml")
    again = CliRunner().invoke(search_command, [spec, "--require-hit", "--cache-dir", str(cache), *BUDGET])
    assert again.exit_code == 0 and "plan hit" in again.output and "cache: 1 hit, 0 misses" in again.output
    empty = CliRunner().invoke(search_command, [spec, "--require-hit", "--cache-dir", str(tmp_path), *BUDGET])
    assert empty.exit_code == 1 and "plan miss" in empty.output
    offline = CliRunner().invoke(search_command, [spec, "--offline", "--cache-dir", str(tmp_path / "o"), *BUDGET])
    assert offline.exit_code == 0 and "offline, the unfused programs" in offline.output
    assert not list((tmp_path / "o").rglob("plans/*.json"))


def test_a_tampered_plan_or_program_entry_is_never_served(searched, tmp_path):
    cache, doc = searched["tiny-llama"]
    spec = load_spec(MODELS / "tiny-llama.yaml")
    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    settings = Settings(budget_s=2)
    plan_file = Cache(root).plan_path(doc["plan"]["key"])
    bad = json.loads(plan_file.read_text())
    bad["programs"][0]["winner_hash"] = "0" * 64  # names a winner the cache does not hold
    plan_file.write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="not cached with the winner it names"):
        assert search_model(spec, settings, Cache(root), "require-hit").status == "miss"
    assert (root / "results" / "quarantine" / plan_file.name).exists()
    renamed = json.loads(json.dumps(doc["plan"]))
    renamed["programs"][0]["name"] = "not_a_program"  # the plan's key does not cover the names
    plan_file.write_text(json.dumps(renamed))
    with pytest.warns(UserWarning, match="not the model's layer programs"):
        assert search_model(spec, settings, Cache(root), "require-hit").status == "miss"


@pytest.mark.parametrize("name", TINY)
def test_the_winners_compute_the_reference_decoder(searched, name):
    """The decode step run through the plan's winners (by the reference interpreter, in float64) against the
    reference decoder in float32, teacher-forced on the decoder's own tokens: the winners are the model."""
    cache, _ = searched[name]
    spec = load_spec(MODELS / f"{name}.yaml")
    planned = search_model(spec, Settings(budget_s=2), Cache(cache), "require-hit", 132)
    winners = {n: o.winner for n, o in planned.programs.items()}
    assert any(op.block is not None for g in winners.values() for op in g.ops)  # some part of the step is fused
    model = spec.load()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # past tiny-mistral's sliding window of 8
    tokens, logits = Decoder(model, "float32").generate(prompt, 4)
    _, replayed = ProgramDecoder(model, winners).generate(prompt, 4, forced=tokens[len(prompt) :])
    assert torch.allclose(replayed, logits, atol=1e-4, rtol=1e-4)
    assert replayed.argmax(-1).tolist() == tokens[len(prompt) :]


@pytest.mark.parametrize("name", TINY)
def test_megakernel_from_the_plan_replays_as_the_reference_decoder_and_compiles(searched, name, tmp_path):
    cache, doc = searched[name]
    spec = load_spec(MODELS / f"{name}.yaml")
    planned = search_model(spec, Settings(budget_s=2), Cache(cache), "require-hit", 132)
    assert planned.status == "hit"
    programs = {n: o.winner for n, o in planned.programs.items()}
    model = spec.load()
    tg = taskgraph.build(spec.config, 8, 2)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # past tiny-mistral's sliding window of 8
    bodies = {row["kind"]: row["body"] for row in build_report(tg, programs=programs)}
    assert all(bodies[k.name] == "generated" for k in KINDS)  # every GEMV body lowered from the plan's winners
    out = replay(model, tg, prompt, 6, programs=programs)
    # The winners round where they round (a fused norm divides after the GEMV), not where HF does: the float32
    # decoder, the function both approximate, is the reference; equal tokens up to a bf16 near tie.
    reference = Generation(*Decoder(model, "float32").generate(prompt, 6))
    assert agrees_with_replay(out, reference, len(prompt))["ok"]
    if shutil.which("nvcc") is not None:
        src = tmp_path / "mk.cu"
        src.write_text(source(tg, spec.name, spec.max_seq, spec.max_seq, programs=programs))
        proc = subprocess.run(
            ["nvcc", "-arch=sm_90a", "-c", "-o", str(tmp_path / "mk.o"), str(src)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_megakernel_emit_uses_the_cached_plan_and_reports_each_winner(searched, tmp_path):
    cache, doc = searched["tiny-qwen3"]
    args = [str(MODELS / "tiny-qwen3.yaml"), "--emit", str(tmp_path), "--sms", "132", "--cache-dir", str(cache)]
    result = CliRunner().invoke(megakernel_command, args)
    assert result.exit_code == 0, result.output
    assert "plan hit" in result.output
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert report["plan"] == doc["plan"]["key"] and report["plan_status"] == "hit"
    winners = {p["name"]: p["winner_hash"] for p in doc["plan"]["programs"]}
    for kind in report["kinds"]:
        for c in kind["computes"]:
            assert c["winner_hash"] == winners[c["program"]] and c["verification"]["method"]
            assert c["lowered_from"] == "winner"
            assert c["program"] in ("embed_scale", "kv_append") or c["lowering_verification"]["equivalent"]
    bodies = {k["kind"]: (k["body"], k.get("generated_from")) for k in report["kinds"]}
    assert bodies["gateup"] == ("generated", "mlp (stage 0)") and bodies["down"] == ("generated", "mlp (stage 1)")
    assert all(body == "generated" for body, _ in bodies.values())
    assert bodies["attn"][1].startswith("qk_rope") and "task_qkv" in (tmp_path / "megakernel.cu").read_text()
    graph = json.loads((tmp_path / "taskgraph.json").read_text())
    assert graph["n_sms"] == 132 and 'extern "C" __global__' in (tmp_path / "megakernel.cu").read_text()
    if not torch.cuda.is_available():
        result = CliRunner().invoke(megakernel_command, [str(MODELS / "tiny-qwen3.yaml"), "--cache-dir", str(cache)])
        assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_a_lowering_that_does_not_compute_its_program_is_never_built(searched, tmp_path, monkeypatch):
    """A lowering bug (the O projection's residual dropped from its stage, as if the cut lost it): translation
    validation finds the lowered program not equivalent to the winner, and the megakernel is not built from it:
    one line naming the program, exit 2, nothing written."""
    from superopt.kernels.megakernel import lowering

    real = lowering.stages_graph

    def dropped_residual(program, stages):
        if program.name == "attn_out":
            stages = [dataclasses.replace(st, epilogue=[], output=st.results[0]) for st in stages]
        return real(program, stages)

    monkeypatch.setattr(lowering, "stages_graph", dropped_residual)
    monkeypatch.setattr("superopt.kernels.megakernel.bodies.stages_graph", dropped_residual)
    cache, _ = searched["tiny-llama"]
    args = [
        str(MODELS / "tiny-llama.yaml"),
        "--emit",
        str(tmp_path / "out"),
        "--cache-dir",
        str(cache),
        "--budget",
        "2",
    ]
    result = CliRunner().invoke(megakernel_command, args)
    assert result.exit_code == 2 and not (tmp_path / "out" / "megakernel.cu").exists()
    assert "attn_out: not equivalent" in result.output and "Traceback" not in result.output


def test_a_fused_winner_lowers_to_the_same_device_function():
    """A graph-defined winner of silu(g) * u (one loop-free block) lowers to the unfused program's element steps."""
    program = layer_programs(load_spec(MODELS / "tiny-llama.yaml").config)["mlp_act"]
    g = superopt.Graph("mlp_act")
    gt, ut = g.input("g", (1, 512), "bfloat16"), g.input("u", (1, 512), "bfloat16")
    b = g.block_graph(grid=(4,), forloop_range=1)
    x, y = b.input(gt, imap=(1,)), b.input(ut, imap=(1,))
    b.output(b.accum_sum(b.mul(b.silu(x), y)), omap=(1,))
    (out,) = g.graph_def(b)
    g.output(out)
    assert superopt.verify(program, g).equivalent
    steps, _ = elementwise_steps(g)
    assert [s[0] for s in steps] == ["silu", "mul"]
    assert emit_elementwise(g, "f").replace("o.", "").count("rbf(") == emit_elementwise(program, "f").count("rbf(") == 2
