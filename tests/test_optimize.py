"""superopt.optimize and torch.compile(backend="superopt"): captured at real shapes, fusable parts searched (or hit
in the cache) and run as Triton kernels (under the interpreter here), the rest in torch."""

from __future__ import annotations

import warnings
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

import superopt
from superopt import pipeline
from superopt.cache import Cache
from superopt.capture import optimize, superopt_backend
from superopt.errors import SuperoptError
from superopt.kernels.device import get_device
from superopt.kernels.timing import TOLERANCE, relative_error
from superopt.search_space import SearchResult, program_candidate

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
BUDGET = 2


def rmsnorm_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6) @ w


def with_cumsum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(rmsnorm_linear(x, w), dim=-1) * 0.5


def inputs(b: int = 4, d: int = 64, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=gen).half(),
        (torch.randn(d, n, generator=gen) / d**0.5).half(),
    )


def float64_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) @ w.double()


@pytest.fixture(autouse=True)
def kernels_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(tmp_path / "cache"))


def test_rmsnorm_matmul_equals_the_original_and_the_second_call_runs_no_search(tmp_path, monkeypatch):
    fn = optimize(budget_s=BUDGET, cache_dir=tmp_path / "cache")(rmsnorm_linear)
    x, w = inputs()
    out = fn(x, w)
    assert [o.status for o in fn.outcomes] == ["searched"] and fn.searches == 1
    assert out.dtype == torch.float16 and out.shape == (4, 16)
    expected = rmsnorm_linear(x, w)
    assert relative_error(out, expected.double()) < TOLERANCE["float16"]
    assert relative_error(out, float64_reference(x, w)) < TOLERANCE["float16"]

    def no_search(*args, **kwargs):
        raise AssertionError("the second call must not search")

    monkeypatch.setattr(pipeline, "search", no_search)
    x2, _ = inputs(seed=1)  # same shapes, new values
    assert relative_error(fn(x2, w), float64_reference(x2, w)) < TOLERANCE["float16"]
    assert fn.searches == 1 and len(fn.outcomes) == 1
    # a fresh process (here: a fresh decorator) finds the result in the cache
    again = optimize(budget_s=BUDGET, cache_dir=tmp_path / "cache")(rmsnorm_linear)
    assert torch.equal(again(x, w), out) and [o.status for o in again.outcomes] == ["hit"]


def test_new_shapes_get_new_entries(tmp_path):
    fn = optimize(mode="offline", cache_dir=tmp_path / "cache")(rmsnorm_linear)
    for b in (2, 4):
        x, w = inputs(b=b)
        assert relative_error(fn(x, w), float64_reference(x, w)) < TOLERANCE["float16"]
    assert [o.status for o in fn.outcomes] == ["offline", "offline"]
    assert len({o.key for o in fn.outcomes}) == 2


def test_unsupported_op_warns_once_and_runs_in_torch(tmp_path):
    fn = optimize(mode="offline", cache_dir=tmp_path / "cache")(with_cumsum)
    x, w = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [fn(x, w), fn(x, w), fn(*inputs(b=2))]
    messages = [str(c.message) for c in caught if "superopt" in str(c.message)]
    assert len(messages) == 1 and "aten.cumsum" in messages[0] and "runs in torch" in messages[0]
    expected = torch.cumsum(float64_reference(x, w), dim=-1) * 0.5
    assert relative_error(outs[0], expected) < TOLERANCE["float16"]
    assert [o.status for o in fn.outcomes] == ["offline", "offline"]  # the rms_norm + matmul part was fused


def test_strict_makes_an_unsupported_op_an_error(tmp_path):
    fn = optimize(mode="offline", cache_dir=tmp_path / "cache", strict=True)(with_cumsum)
    with pytest.raises(SuperoptError, match="aten.cumsum.*strict"):
        fn(*inputs())


def test_require_hit_mode_raises_on_a_miss(tmp_path):
    fn = optimize(mode="require-hit", cache_dir=tmp_path / "cache")(rmsnorm_linear)
    with pytest.raises(SuperoptError, match="require-hit"):
        fn(*inputs())
    with pytest.raises(SuperoptError, match="unknown mode"):
        optimize(mode="fast")


def test_bare_decorator_and_a_linear_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    monkeypatch.setattr(pipeline, "search", lambda *a, **k: seen.append(a) or _nothing_found(*a, **k))

    @optimize
    def block(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.silu(F.linear(x, weight)) * 2.0

    x, w = inputs()
    weight = w.t().contiguous()  # nn.Linear's layout: [out, in]
    out = block(x, weight)
    assert len(seen) == 1 and seen[0][0].inputs[1].endswith("_t")  # the program reads the weight's transpose
    expected = F.silu(x.double() @ weight.double().t()) * 2.0
    assert relative_error(out, expected) < TOLERANCE["float16"]
    assert Cache(tmp_path / "cache").results.is_dir()


def _nothing_found(graph: superopt.KernelGraph, device: str, **settings) -> SearchResult:
    """What a search returns that finds nothing: the program itself."""
    return SearchResult([program_candidate(graph, get_device(device))])


def test_torch_compile_backend(tmp_path):
    compiled = torch.compile(
        with_cumsum, backend=superopt_backend, options={"mode": "offline", "cache_dir": str(tmp_path / "cache")}
    )
    x, w = inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cumsum's warning
        out = compiled(x, w)
    expected = torch.cumsum(float64_reference(x, w), dim=-1) * 0.5
    assert relative_error(out, expected) < TOLERANCE["float16"]


@pytest.mark.skipif(
    "superopt" not in metadata.entry_points(group="torch_dynamo_backends").names,
    reason="the torch_dynamo_backends entry point is not installed (pip install -e .)",
)
def test_torch_compile_backend_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "search", _nothing_found)
    compiled = torch.compile(rmsnorm_linear, backend="superopt")
    x, w = inputs()
    assert relative_error(compiled(x, w), float64_reference(x, w)) < TOLERANCE["float16"]


def test_inputs_that_require_grad_run_in_torch(tmp_path):
    fn = optimize(mode="offline", cache_dir=tmp_path / "cache")(rmsnorm_linear)
    x, w = inputs()
    w.requires_grad_(True)
    with pytest.warns(UserWarning, match="requires grad.*runs in torch"):
        out = fn(x, w)
    out.float().sum().backward()
    assert w.grad is not None and fn.outcomes == []
    with torch.no_grad():  # without autograd the kernels run
        assert relative_error(fn(x, w), float64_reference(x, w.detach())) < TOLERANCE["float16"]
    assert [o.status for o in fn.outcomes] == ["offline"]
