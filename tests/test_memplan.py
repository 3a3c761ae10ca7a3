"""The memory plan (kernels/megakernel/memplan.py) against plans worked out by hand from a small model's shapes, and
`superopt megakernel --vram-budget` writing it into the build report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from superopt.cli.main import main
from superopt.errors import SuperoptError
from superopt.kernels.megakernel.memplan import (
    HOST,
    RESIDENT,
    STREAMED,
    MemoryPlan,
    plan_memory,
    ring_depth,
    weight_bytes,
)
from superopt.model import BF16, ModelConfig, weight_format

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"

# A Llama of 4 layers: hidden 256, intermediate 512, 4 heads and 2 KV heads of 64, vocab 1024, untied.
CFG = ModelConfig("llama", 256, 512, 4, 4, 2, 64, 1024, 1e-5, 10000.0)
H, INTER, V = 256, 512, 1024
# q, k, v, o, gate, up, down: 1179648
LAYER = 2 * (H * H + 128 * H + 128 * H + H * H + INTER * H + INTER * H + H * INTER)
TABLE = 2 * V * H  # the embedding, and the untied LM head: 524288
NORMS = 2 * (4 * 2 * H + H)  # two a layer and the final one: 4608
KV_POS = 2 * 2 * 64 * 2  # k and v of 2 KV heads of 64, bf16: 512 bytes a layer and position
MAX_SEQ = 64
KV = 4 * MAX_SEQ * KV_POS  # 131072
ROW = 2 * H  # the embedding row a step gathers
READ = 4 * LAYER + TABLE + NORMS + ROW + KV  # what a step reads: 5379072
WS = 100_000  # the workspace, given
# Priced at 10 GB/s from the host (1e4 bytes a us), 1000 GB/s on the device (1e6 bytes a us), 2 us a hop.
PRICES = {"h2d_gbps": 10.0, "dram_gbps": 1000.0, "hop_us": 2.0}


def plan(budget: int, cfg: ModelConfig = CFG, **kw: Any) -> MemoryPlan:
    return plan_memory(cfg, kw.pop("fmt", BF16), kw.pop("head", BF16), budget, MAX_SEQ, WS, **(PRICES | kw))


def wheres(p: MemoryPlan) -> list[str]:
    return [layer.where for layer in p.layers]


def test_everything_fits() -> None:
    p = plan(8_000_000)
    assert wheres(p) == [RESIDENT] * 4 and p.head.where == RESIDENT and p.embedding.where == RESIDENT
    assert (p.ring_depth, p.ring_bytes, p.host_bytes, p.copies, p.kv.device_bytes) == (0, 0, 0, 0, KV)
    assert p.device_bytes == WS + 4 * LAYER + 2 * TABLE + KV == 5_998_240
    assert p.device_read_bytes == READ
    assert p.floor_us == pytest.approx(5.379072) and p.predicted_us == pytest.approx(5.379072)
    assert not p.streams and p.to_json()["gpu_run"].startswith("supported")


def test_one_byte_short_moves_the_embedding_to_host_memory_first() -> None:
    p = plan(WS + 4 * LAYER + 2 * TABLE + KV - 1)
    assert wheres(p) == [RESIDENT] * 4 and p.head.where == RESIDENT and p.embedding.where == HOST
    assert (p.ring_depth, p.host_bytes, p.copies, p.device_bytes) == (0, ROW, 1, WS + 4 * LAYER + TABLE + KV)
    assert p.predicted_us == pytest.approx((READ - ROW) / 1e6 + 2.0)
    assert p.streams and p.to_json()["gpu_run"].startswith("not supported yet")


def test_half_the_layers_stream() -> None:
    """5 MB: two layers resident, beside a ring of two layer slots (the third and fourth layers, then the head, in
    a piece of its own); keeping the head instead of a layer would stream more (3 layers > 2 layers + the head)."""
    p = plan(5_000_000)
    assert wheres(p) == [RESIDENT, RESIDENT, STREAMED, STREAMED]
    assert p.head.where == STREAMED and p.embedding.where == HOST
    assert (p.ring_depth, p.ring_slot_bytes) == (2, LAYER)
    assert p.device_bytes == WS + KV + 2 * LAYER + 2 * LAYER == 4_949_664
    assert p.host_bytes == 2 * LAYER + TABLE + ROW == 2_884_096
    assert p.copies == 2 + 1 + 1  # two layers, the head, the embedding row
    assert p.floor_us == pytest.approx(288.4096) and p.predicted_us == pytest.approx(296.4096)
    j = p.to_json()
    assert [(x["layer"], x["where"], x["bytes"]) for x in j["layers"]] == [
        (0, RESIDENT, LAYER),
        (1, RESIDENT, LAYER),
        (2, STREAMED, LAYER),
        (3, STREAMED, LAYER),
    ]
    assert j["ring"] == {"depth": 2, "slot_bytes": LAYER, "bytes": 2 * LAYER}
    assert j["predicted_us_per_step"] == 296.41 and j["floor_us"] == 288.41


def test_a_budget_for_the_ring_the_kv_cache_and_the_workspace_streams_every_weight() -> None:
    p = plan(2_600_000)
    assert wheres(p) == [STREAMED] * 4 and p.head.where == STREAMED and p.embedding.where == HOST
    assert (p.ring_depth, p.ring_slot_bytes, p.kv.device_bytes, p.kv.host_bytes) == (2, LAYER, KV, 0)
    assert p.device_bytes == WS + KV + 2 * LAYER == 2_590_368
    assert p.host_bytes == 4 * LAYER + TABLE + ROW == 5_243_392
    assert p.copies == 6 and p.predicted_us == pytest.approx(524.3392 + 12.0)


def test_the_kv_cache_spills_its_oldest_blocks_only_when_every_weight_streams() -> None:
    """Each spilled block (16 positions, 8192 bytes a layer) saves 4 layers' blocks on the device and costs one in
    each of the 2 ring slots: 16384 bytes a block, so 2.56 MB needs 2 blocks a layer spilled."""
    p = plan(2_560_000)
    assert wheres(p) == [STREAMED] * 4 and p.head.where == STREAMED
    assert (p.kv.spilled_blocks, p.kv.spilled_positions) == (2, 32)
    assert p.kv.device_bytes == 4 * 32 * KV_POS and p.kv.host_bytes == 4 * 32 * KV_POS
    assert p.ring_slot_bytes == LAYER + 32 * KV_POS and p.ring_depth == 2
    assert p.device_bytes == WS + 4 * 32 * KV_POS + 2 * (LAYER + 32 * KV_POS) == 2_557_600
    assert p.host_bytes == 4 * LAYER + TABLE + ROW + 4 * 32 * KV_POS
    assert p.copies == 4 + 4 + 1 + 1  # the layers, their KV blocks, the head, the row
    assert p.predicted_us == pytest.approx(530.8928 + 20.0)
    assert p.to_json()["kv_cache"]["spilled_positions_per_layer"] == 32
    assert plan(WS + 4 * 48 * KV_POS + 2 * (LAYER + 16 * KV_POS)).kv.spilled_blocks == 1  # no more than needed


def test_a_budget_below_the_smallest_working_set_is_one_line_saying_by_how_much() -> None:
    """The least: every weight streamed, every layer's KV but its newest block spilled (3 of 4 blocks)."""
    least = WS + 4 * 16 * KV_POS + 2 * (LAYER + 48 * KV_POS)
    assert least == 2_541_216
    with pytest.raises(SuperoptError) as e:
        plan(2_500_000)
    message = str(e.value)
    assert "\n" not in message and "below the smallest working set, 2.54 MB (41.22 kB short)" in message
    assert "ring 2 x 1.20 MB" in message and "KV cache's minimum 32.77 kB" in message
    plan(least)  # exactly the least fits


def test_ring_depth_covers_the_hand_over() -> None:
    # a slot copies in 117.96 us and is read in 1.18 us: one slot ahead covers a 2 us hop, not a 200 us one
    assert ring_depth(LAYER, 6, 10.0, 1000.0, 2.0) == 2
    assert ring_depth(LAYER, 6, 10.0, 1000.0, 200.0) == 3
    assert ring_depth(LAYER, 1, 10.0, 1000.0, 200.0) == 1  # no more slots than copies


def test_int4_counts_packed_values_and_scales() -> None:
    """int4 g64: a row of 256 inputs is 128 bytes of values and 4 bf16 scales (136), of 512 inputs 272; asymmetric
    adds as many zeros."""
    int4 = weight_format("int4", 64)
    layer4 = (256 + 128 + 128 + 256 + 512 + 512) * 136 + 256 * 272  # q, k, v, o, gate, up; down
    assert layer4 == 313_344
    assert weight_bytes(CFG, int4, int4) == ([layer4] * 4, V * 136, TABLE, NORMS)
    assert weight_bytes(CFG, int4, BF16) == ([layer4] * 4, TABLE, TABLE, NORMS)
    asym = weight_format("int4", 64, symmetric=False)
    assert weight_bytes(CFG, asym, asym)[0] == [(256 + 128 + 128 + 256 + 512 + 512) * 144 + 256 * 288] * 4
    p = plan(2_000_000, fmt=int4, head=int4)
    assert [x.bytes for x in p.layers] == [layer4] * 4 and p.head.bytes == V * 136
    assert p.device_read_bytes == 4 * layer4 + V * 136 + NORMS + KV  # the row is read from the host
    assert p.device_bytes == WS + 4 * layer4 + V * 136 + KV and p.embedding.where == HOST


def test_a_tied_head_is_the_table_unless_it_is_quantized() -> None:
    tied = ModelConfig("llama", 256, 512, 4, 4, 2, 64, 1024, 1e-5, 10000.0, tie_embeddings=True)
    assert weight_bytes(tied, BF16, BF16) == ([LAYER] * 4, TABLE, 0, NORMS)
    int4 = weight_format("int4", 64)
    assert weight_bytes(tied, int4, int4)[1:3] == (V * 136, TABLE)  # the head's own copy beside the bf16 table
    p = plan(2_600_000, cfg=tied)
    assert p.embedding is None and p.head.where == STREAMED
    assert p.host_bytes == 4 * LAYER + TABLE + ROW  # the row comes from the table in host memory


def test_batch_scales_the_kv_cache() -> None:
    assert plan(8_000_000, batch=2).kv.bytes == 2 * KV


def test_the_plan_is_deterministic() -> None:
    assert plan(5_000_000) == plan(5_000_000)
    assert json.dumps(plan(2_560_000).to_json()) == json.dumps(plan(2_560_000).to_json())


# The CLI: tiny-llama (tied, 2 layers as CFG's, max_seq 32): a layer LAYER, the head the 512 x 256 table.
TINY = [str(MODELS / "tiny-llama.yaml"), "--offline"]


def cli(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["megakernel", *TINY, "--cache-dir", str(tmp_path / "cache"), *args])


def test_cli_writes_a_resident_plan_into_the_build_report(tmp_path: Path) -> None:
    result = cli(tmp_path, "--emit", str(tmp_path / "e"), "--vram-budget", "1")
    assert result.exit_code == 0, result.output
    assert "memory plan: budget 1.00 GB" in result.output and "GPU run: supported" in result.output
    mp = json.loads((tmp_path / "e" / "build_report.json").read_text())["memory_plan"]
    assert mp["layers"] == [{"layer": i, "where": RESIDENT, "bytes": LAYER} for i in range(2)]
    assert mp["lm_head"] == {"where": RESIDENT, "bytes": 2 * 512 * 256}
    assert mp["kv_cache"]["bytes"] == 2 * 32 * KV_POS and mp["kv_cache"]["host_bytes"] == 0
    assert mp["budget_bytes"] == 10**9 and mp["ring"]["depth"] == 0 and mp["gpu_run"].startswith("supported")


def test_cli_emits_a_streaming_plan_and_does_not_run_it(tmp_path: Path) -> None:
    result = cli(tmp_path, "--emit", str(tmp_path / "e"), "--vram-budget", "0.0026", "--h2d-gbps", "25")
    assert result.exit_code == 0, result.output
    assert "not run: the plan reads weights from host memory" in result.stderr
    mp = json.loads((tmp_path / "e" / "build_report.json").read_text())["memory_plan"]
    assert [x["where"] for x in mp["layers"]] == [STREAMED] * 2 and mp["lm_head"]["where"] == STREAMED
    assert mp["ring"] == {"depth": 2, "slot_bytes": LAYER, "bytes": 2 * LAYER}
    assert mp["h2d_gbps"] == 25.0 and mp["per_step"]["host_bytes"] == 2 * LAYER + 2 * 512 * 256 + ROW
    assert mp["gpu_run"].startswith("not supported yet")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vram-budget", "0.0026"], "running it on the GPU is not supported yet"),
        (["--vram-budget", "0.0026", "--emit", "{e}", "--bench"], "running it on the GPU is not supported yet"),
        (
            ["--vram-budget", "0.0001", "--emit", "{e}"],
            "--vram-budget 0.0001 GB: a device budget of 100.00 kB is below",
        ),
        (["--vram-budget", "0"], "Invalid value for '--vram-budget'"),
        (["--h2d-gbps", "20"], "--h2d-gbps prices a memory plan: add --vram-budget GB"),
    ],
)
def test_cli_refuses_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = cli(tmp_path, *[a.format(e=tmp_path / "e") for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and message in result.stderr
    assert not (tmp_path / "e" / "build_report.json").exists()
