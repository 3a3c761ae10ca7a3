"""`superopt.optimize`: a function's fusable parts replaced by searched, verified kernels, in the manner of
torch.compile.

    @superopt.optimize                      # or @superopt.optimize(mode=..., budget_s=..., states=..., ...)
    def block(x, w):
        return F.rms_norm(x, (x.shape[-1],), eps=1e-6) @ w

On the first call with given shapes, dtypes and devices (and non-tensor arguments) the function is captured with
torch.export (non-strict) at those shapes, its ATen ops are mapped to the IR (superopt/importers.py), and the
graph is cut into fusable programs: the largest groups of connected mapped ops that torch.fx's capability
partitioner can cut out without a cycle (one op alone stays in torch: there is nothing to fuse). Each program goes
through the pipeline (a cache hit, or a search whose result is cached) and its winner, compiled by
superopt.compile, replaces it; everything else runs as the exported torch code. On CPU tensors the kernels run
under the Triton interpreter (slow, but the same generated code a GPU runs). New shapes capture again and get
their own cache entries; calls with seen shapes run no search.

An op with no IR form gets one warning naming it and runs in torch (strict=True: a SuperoptError instead).
Kernels have no backward: with inputs that require grad under autograd the function runs in torch.
`torch.compile(fn, backend="superopt")` (options= as for optimize) applies the same to each graph dynamo captures.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from superopt.cache import Cache
from superopt.errors import IRError, SuperoptError
from superopt.importers import Unsupported, check_node, from_fx
from superopt.kernels import compile
from superopt.kernels.triton_codegen import use_interpreter
from superopt.pipeline import MODES, Outcome, Settings, optimize_program
from superopt.spec import check_states

log = logging.getLogger("superopt")


@dataclass(frozen=True)
class Options:
    mode: str = "search"  # "search", "offline" (never search) or "require-hit" (a miss is an error)
    budget_s: float | None = None  # search time per program (default: the pipeline's)
    cache_dir: str | Path | None = None
    strict: bool = False
    device: str | None = None  # device class to rank for (default: the GPU present, else h100)
    states: int | None = None  # the enumeration's states budget (default: the preset's): the same result anywhere

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SuperoptError(f"superopt.optimize: unknown mode '{self.mode}' (known: {', '.join(MODES)})")
        if self.states is not None:
            try:
                check_states(self.states)
            except IRError as e:
                raise SuperoptError(f"superopt.optimize: states: {e}") from None


def _flatten(args: tuple, kwargs: dict) -> tuple[list, tuple]:
    """The arguments' leaves, and what a capture depends on: their structure, each tensor's shape, dtype and
    device, every other argument's value (torch.export bakes those in). Plain tensor arguments skip pytree,
    which costs more than a small kernel's launch."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):
        leaves, spec = list(args), len(args)
    else:
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    return leaves, (spec, *((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else repr(x) for x in leaves))


class _Flat:
    """An exported program run on the flat arguments: torch.export's module checks and unflattens its inputs on
    every call (about 100 us on an H100 host); the signature has checked them already."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.out_spec = gm.graph._codegen.pytree_info.out_spec
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":  # shape guards, which the signature covers
                gm.graph.erase_node(node)
        gm.graph._codegen = torch.fx.graph.CodeGen()
        self.gm = torch.fx.GraphModule(gm, gm.graph)  # without export's input-checking hook

    def __call__(self, leaves: list) -> Any:
        return torch.utils._pytree.tree_unflatten(self.gm(*leaves), self.out_spec)


class _AsModule(torch.nn.Module):
    """A plain function as a module, for torch.export; placeholders take the function's parameter names."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.forward = fn


class _Kernels(torch.nn.Module):
    """A fused program's winner in place of its fx submodule: takes the submodule's inputs, returns its outputs."""

    def __init__(self, compiled: Callable[..., Any], feeds: list[tuple[int, bool]]) -> None:
        super().__init__()
        self.compiled, self.feeds = compiled, feeds

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = [args[k].transpose(-1, -2) if transposed else args[k] for k, transposed in self.feeds]
        return self.compiled(*inputs)


class _Support:
    """The nodes the capability partitioner may fuse: those that map to the IR."""

    def __init__(self, supported: set[torch.fx.Node]) -> None:
        self.supported = supported

    def is_node_supported(self, submodules: Any, node: torch.fx.Node) -> bool:
        return node in self.supported


class Optimized:
    """A function with superopt's kernels in its fusable parts; call it as the function. `outcomes` lists the
    pipeline's outcome for every program captured so far (status hit, searched or offline)."""

    def __init__(self, fn: Callable[..., Any], options: Options) -> None:
        functools.update_wrapper(self, fn)
        self.fn, self.options = fn, options
        self.outcomes: list[Outcome] = []
        self._plans: dict[tuple, _Flat | None] = {}
        self._warned: set[str] = set()
        self._pending: list[str] = []
        self._name = getattr(fn, "__name__", type(fn).__name__)

    @property
    def searches(self) -> int:
        return sum(o.status == "searched" for o in self.outcomes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, key = _flatten(args, kwargs)
        plan = None
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves):
            self._unsupported("autograd", "an input requires grad and superopt's kernels have no backward")
        else:
            if key not in self._plans:
                self._plans[key] = self._capture(args, kwargs)
            plan = self._plans[key]
        while self._pending:  # warned here, so that the warning points at the caller
            warnings.warn(self._pending.pop(0), stacklevel=2)
        return plan(leaves) if plan is not None else self.fn(*args, **kwargs)

    def _unsupported(self, what: str, why: str) -> None:
        """Notes (once per `what`) a part that runs in torch; warned when the call returns (strict: raised)."""
        message = f"superopt.optimize({self._name}): {why}; it runs in torch"
        if self.options.strict:
            raise SuperoptError(message.replace("; it runs in torch", " (strict=True)"))
        if what not in self._warned:
            self._warned.add(what)
            self._pending.append(message)

    def _capture(self, args: tuple, kwargs: dict) -> _Flat | None:
        """The exported program with its fusable parts replaced, or None where torch.export cannot capture it."""
        module = self.fn if isinstance(self.fn, torch.nn.Module) else _AsModule(self.fn)
        if not torch.cuda.is_available():
            try:
                use_interpreter()  # before torch.export, which imports triton: Triton chooses its mode then
            except SuperoptError as e:
                self._unsupported("interpreter", str(e))
                return None
        try:
            gm = torch.export.export(module, args, kwargs, strict=False).module()
        except Exception as e:  # noqa: BLE001 (whatever torch.export cannot trace runs as it is)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._unsupported("capture", f"torch.export cannot capture it ({type(e).__name__}: {first[:200]})")
            return None
        flat = _Flat(gm)
        flat.gm = self._replace(flat.gm)
        return flat

    def _replace(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """`gm` with each fusable program replaced by its winner's kernels."""
        supported = set()
        for node in gm.graph.nodes:
            if node.op == "call_function":
                try:
                    check_node(node)
                    supported.add(node)
                except SuperoptError as e:  # Unsupported, or an IRError of the op's shapes
                    self._unsupported(str(node.target), str(e))
        partitions = CapabilityBasedPartitioner(gm, _Support(supported)).propose_partitions()
        if not partitions:
            return gm
        fused = fuse_by_partitions(gm, [p.nodes for p in partitions], prefix="superopt_", always_return_tuple=True)
        for k, name in enumerate(n for n, _ in list(fused.named_children()) if n.startswith("superopt_")):
            sub = getattr(fused, name)
            try:
                kernels = self._program(sub, f"{self._name}_{k}")
            except Unsupported as e:
                self._unsupported(name, f"part {k} does not map as a whole ({e})")
                continue
            setattr(fused, name, kernels)
        fused.recompile()
        return fused

    def _program(self, sub: torch.fx.GraphModule, name: str) -> _Kernels:
        """The winner's kernels for one fused submodule, through the pipeline."""
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        program = from_fx(sub.graph, name)
        graph = program.graph
        settings = Settings.for_graph(
            graph, budget_s=self.options.budget_s, device=self.options.device, states=self.options.states
        )
        cache = Cache(self.options.cache_dir)
        outcome = optimize_program(graph, settings, cache, self.options.mode, say=log.info)
        log.info("superopt.optimize(%s): %s: %s", self._name, name, outcome.note)
        if outcome.result is None:
            raise SuperoptError(f"superopt.optimize({self._name}): {name}: {outcome.note}")
        self.outcomes.append(outcome)
        feeds = [(placeholders.index(program.origin[i][0]), program.origin[i][1]) for i in graph.inputs]
        return _Kernels(compile(outcome.winner, module_dir=cache.kernel_dir), feeds)


def optimize(
    fn: Callable[..., Any] | None = None,
    *,
    mode: str = "search",
    budget_s: float | None = None,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    device: str | None = None,
    states: int | None = None,
) -> Any:
    """Decorates `fn` (bare, or called with options first) so that its fusable parts run as superopt kernels."""
    options = Options(mode, budget_s, cache_dir, strict, device, states)
    if fn is None:
        return lambda f: Optimized(f, options)
    return Optimized(fn, options)


def superopt_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """torch.compile's backend "superopt": each captured graph is optimized on its first real call (dynamo hands
    the backend fake tensors; superopt needs the real ones only for their shapes, but torch.export wants them)."""
    return Optimized(gm, Options(**(options or {})))
