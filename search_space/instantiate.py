"""Sizes for a symbolic plan: the concrete µGraph at given sizes, the best sizes on a device, the small instance.

A plan's dims are monomials over class symbols (the program's dims) and free symbols: g{i}_{a}, grid axis a of
graph-defined kernel i, and f{i}, its loop range (a loop over an upstream kernel's partials takes that kernel's
grid symbol). `Sizer.best` picks the free symbols for a device: each takes a value v > 1 dividing its class's
size N with v or N / v a power of two (tiles are powers of two; codegen pads to them), every dim must come out a
whole number, and each kernel must fit the device (`fits`: grid, threads, and shared memory with tile lifetimes).
The cost model ranks what fits. A kernel's cost depends only on its own symbols and its input shapes, so symbols
shared between kernels are enumerated jointly and the rest kernel by kernel, memoized across plans.

`small_env` instantiates the same structure small (every free symbol 2, each class just large enough), for
verification: the finite-field check runs on that instance of the plan against the program at the same dims.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from superopt.errors import IRError
from superopt.ir import BlockGraph, KernelGraph, Tensor, thread_graphs
from superopt.kernels.cost import dram_bandwidth, kernel_cost
from superopt.kernels.device import DeviceSpec
from superopt.kernels.lower import lower
from superopt.ops import ACCUMULATORS, DTYPES, TensorType
from superopt.search_space.dims import Dim, domain, is_cat, value
from superopt.search_space.enumerator import BlockPlan, KernelOp, Plan, Problem, tied_symbol

BLOCK_SIZE = 128  # threads per block of a graph-defined kernel
ACCUM_BYTES = 4  # accumulators keep float32 state


def dim_size(d: Dim, env: dict[str, int]) -> int | None:
    """The size of `d` at `env`, or None where it is not a positive whole number."""
    v = value(d, env)
    return int(v) if v.denominator == 1 and v >= 1 else None


def _shape(dims: tuple[Dim, ...], env: dict[str, int]) -> tuple[int, ...] | None:
    sizes = tuple(dim_size(d, env) for d in dims)
    return None if None in sizes else sizes  # type: ignore[return-value]


def block_graph(bp: BlockPlan, inputs: list[TensorType | Tensor], env: dict[str, int], block_size: int) -> BlockGraph:
    """The block graph of `bp` at `env`; raises IRError where a split does not divide."""
    grid = [env[s] for s in bp.grid_syms()]
    block = BlockGraph(grid, env[bp.loop_sym] if bp.loop_sym else 1, block_size)
    tiles = [block.input(src, bi.imap, bi.fmap) for src, bi in zip(inputs, bp.inputs)]
    for bop in bp.ops:
        tiles.append(block.op(bop.op, *(tiles[i] for i in bop.operands), **dict(bop.attrs)))
    for bo in bp.outputs:
        tile = tiles[bo.tile]
        block.output(tile if bp.loop_sym else block.accum_sum(tile), bo.omap)  # loop-free: the identity accumulator
    return block


def concrete(problem: Problem, plan: Plan, env: dict[str, int], block_size: int = BLOCK_SIZE) -> KernelGraph:
    """The µGraph of `plan` at `env`, with the program's input and output names."""
    prog = problem.graph
    g = KernelGraph(prog.name)
    names = {k: n for k, n in enumerate(prog.inputs)}
    for name in prog.inputs:
        g.input(name, _shape(problem.shapes[name], env) or (), prog.tensors[name].dtype)
    out_names = {t: prog.outputs[j] for j, t in enumerate(plan.outputs)}

    def fresh(k: int) -> str:  # an intermediate's name: none of the program's outputs, no tensor's yet
        name = f"t{k}"
        while name in g.tensors or name in prog.outputs:
            name += "_"
        return name

    k = len(prog.inputs)
    for op in plan.ops:
        args = [Tensor(g, names[i]) for i in op.inputs]
        if op.block is None:
            names[k] = g.op(op.op, *args, out=out_names.get(k) or fresh(k), **dict(op.attrs)).name
            k += 1
            continue
        block = block_graph(op.block, args, env, block_size)
        outs = [out_names.get(k + j) or fresh(k + j) for j in range(len(op.block.outputs))]
        for t in g.graph_def(block, outs=outs):
            names[k] = t.name
            k += 1
    for name in prog.outputs:
        g.output(name)
    return g


def resize(problem: Problem, env: dict[str, int]) -> KernelGraph:
    """The program with every class at its size in `env` (its ops replayed through the builder)."""
    prog = problem.graph
    g = KernelGraph(prog.name)
    for name in prog.inputs:
        g.input(name, _shape(problem.shapes[name], env) or (), prog.tensors[name].dtype)
    for op in prog.ops:
        g.op(op.op, *op.inputs, out=op.outputs[0], **op.attrs)
    for name in prog.outputs:
        g.output(name)
    return g


def small_env(problem: Problem, plan: Plan) -> dict[str, int]:
    """Every free symbol 2; each class a distinct small size (2, 3, 5, ...: dims that would be confused with one
    another differ) times the largest power of two any of the plan's dims divides it by, and even where rope
    rotates it."""
    dims: list[Dim] = []
    for t in plan.tensors:
        dims += t.shape
    for op in plan.ops:
        if op.block:
            for t in op.block.tiles:
                dims += t.shape
    flat: list[tuple] = []
    while dims:
        d = dims.pop()
        if is_cat(d):
            dims += [d[1], d[2]]
        else:
            flat.append(d)
    env: dict[str, int] = {}
    for k, c in enumerate(sorted(problem.sizes)):
        splits = max((-sum(e for _, e in d if e < 0) for d in flat if dict(d).get(c, 0) > 0), default=0)
        env[c] = (2, 3, 5)[k % 3] * 2**splits
        if c in problem.even and env[c] % 2:  # rope's halves
            env[c] *= 2
    for op in plan.ops:
        if op.block:
            env.update({s: 2 for s in op.block.grid_syms()})
            if op.block.loop_sym and op.block.loop_sym not in env:
                env[op.block.loop_sym] = 2
    return env


# --- device limits ----------------------------------------------------------------------------------------------


def smem_bytes(block: BlockGraph) -> int:
    """Peak shared memory of one block over its timeline (the loop body and accumulators in order, then the
    epilogue): a tile occupies it from the op that makes it (a block input: its first use) to its last use (a
    block output: the end); loop-invariant inputs and accumulator state (float32) stay for the whole loop; results
    kept in registers inside a thread graph take none."""
    registers = {block.ops[i].outputs[0] for group in thread_graphs(block) for i in group[:-1]}
    accums = {op.outputs[0] for op in block.ops if op.op in ACCUMULATORS}
    epilogue = [op for op in block.ops if block.after_loop[op.outputs[0]] and op.outputs[0] not in accums]
    timeline = [op for op in block.ops if op not in epilogue] + epilogue
    loop_end = len(timeline) - len(epilogue) - 1
    first: dict[str, int] = {}
    last: dict[str, int] = {o.name: len(timeline) for o in block.outputs}
    for p, op in enumerate(timeline):
        for i in op.inputs:
            first.setdefault(i, p)
            last[i] = max(last.get(i, p), p)
        first.setdefault(op.outputs[0], p)
    whole_loop = accums | {bi.name for bi in block.inputs if bi.fmap is None}
    spans = {}
    for name, start in first.items():
        if name not in registers:
            stop = last.get(name, start)
            spans[name] = (0, max(stop, loop_end)) if name in whole_loop else (start, stop)

    def size(name: str) -> int:
        ty = block.tensors[name]
        return math.prod(ty.shape) * (ACCUM_BYTES if name in accums else DTYPES[ty.dtype].bytes)

    return max(sum(size(n) for n, (a, b) in spans.items() if a <= p <= b) for p in range(len(timeline) + 1))


def fits(block: BlockGraph, device: DeviceSpec) -> bool:
    """Whether the device can run the block graph: grid axes, threads per block, shared memory per block."""
    return (
        all(g <= limit for g, limit in zip(block.grid, device.max_grid))
        and block.block_size <= device.max_threads_per_block
        and smem_bytes(block) <= device.smem_per_block
    )


# --- choosing sizes -----------------------------------------------------------------------------------------------


@dataclass
class KernelChoice:
    us: float
    values: tuple[int, ...]  # of the kernel's private symbols, in order


@dataclass
class Sizer:
    """Best sizes of plans on one device; `rejected` counts size choices that break a device limit."""

    problem: Problem
    device: DeviceSpec
    block_size: int = BLOCK_SIZE
    rejected: int = 0
    _kernels: dict = field(default_factory=dict)
    _named: set = field(default_factory=set)

    def _own(self, op: KernelOp) -> dict[str, str]:
        """The free symbols a kernel op chooses, with the class each splits."""
        if op.block is None:
            return {}
        bp = op.block
        own = {s: c for s, c in zip(bp.grid_syms(), bp.axes) if not tied_symbol(c)}
        if bp.loop is not None and not bp.loop.startswith("g"):
            own[bp.loop_sym] = bp.loop
        return own

    def lower_bound(self, plan: Plan) -> float:
        """No instance of the plan predicts less: each kernel moves its inputs and outputs of known size (those
        without free symbols) at least once at the achievable bandwidth (kernels/cost.py), plus its launch."""
        sizes = self.problem.sizes
        dtype = DTYPES[self.problem.graph.tensors[self.problem.graph.inputs[0]].dtype].bytes
        known = [
            _shape(t.shape, sizes) if all(s in sizes for d in t.shape for s in _symbols(d)) else None
            for t in plan.tensors
        ]
        total = 0
        k = len(self.problem.inputs)
        for op in plan.ops:
            outs = range(k, k + (len(op.block.outputs) if op.block else 1))
            total += sum(math.prod(known[i]) for i in (*op.inputs, *outs) if known[i] is not None)
            k += len(outs)
        return total * dtype / dram_bandwidth(self.device) * 1e6 + len(plan.ops) * self.device.launch_overhead_us

    def best(self, plan: Plan) -> tuple[float, dict[str, int]] | None:
        """The predicted microseconds and sizes of the plan's fastest instance that fits, or None."""
        owns = [self._own(op) for op in plan.ops]
        home = {s: c for own in owns for s, c in own.items()}
        used = []  # the free symbols each kernel's cost depends on
        for op, own in zip(plan.ops, owns):
            syms = set(own)
            for i in op.inputs:
                syms |= {s for d in plan.tensors[i].shape for s in _symbols(d) if s in home}
            if op.block is not None:
                syms |= {s for s in (*op.block.grid_syms(), op.block.loop_sym) if s in home}  # tied ones too
            used.append(syms)
        shared = sorted(s for s in home if sum(s in u for u in used) > 1)
        best: tuple[float, dict[str, int]] | None = None
        for values in itertools.product(*(domain(self.problem.sizes[home[s]]) for s in shared)):
            env = dict(self.problem.sizes) | dict(zip(shared, values))
            total = len(plan.ops) * self.device.launch_overhead_us
            for op, own in zip(plan.ops, owns):
                choice = self._kernel(plan, op, own, [s for s in own if s not in shared], env, home)
                if choice is None:
                    break
                total += choice.us
                env |= dict(zip([s for s in own if s not in shared], choice.values))
            else:
                if best is None or total < best[0]:
                    best = (total, env)
        return best

    def _kernel(self, plan: Plan, op: KernelOp, own: dict, private: list[str], env: dict, home: dict):
        """The best private sizes of one kernel given the shared ones in `env` (memoized), or None."""
        shapes = [_shape(plan.tensors[i].shape, env) for i in op.inputs]
        if None in shapes:
            return None
        dtype = self.problem.graph.tensors[self.problem.graph.inputs[0]].dtype
        types = tuple(TensorType(s, dtype) for s in shapes)  # type: ignore[arg-type]
        fixed = tuple((k, env[s]) for k, s in enumerate(own) if s not in private)  # by position: kernels alike share
        bp = op.block
        tied = tuple(env[s] for s in (*bp.grid_syms(), bp.loop_sym) if s and s not in own) if bp else ()
        key = (op.op, op.attrs, _structure(bp) if bp else (), types, fixed, tied)
        named = (key, op.inputs, bp.loop if bp else None)
        if key not in self._kernels:
            before = self.rejected
            self._kernels[key] = self._new_kernel(op, list(types), private, env, home), self.rejected - before
        elif named not in self._named:  # `rejected` counts each kernel over its own tensors once, as if sized again
            self.rejected += self._kernels[key][1]
        self._named.add(named)
        return self._kernels[key][0]

    def _new_kernel(self, op: KernelOp, types: list[TensorType], private: list[str], env: dict, home: dict):
        """The cheapest private sizes that build and fit."""
        if op.block is None:
            g = KernelGraph()
            args = [g.input(f"i{k}", t.shape, t.dtype) for k, t in enumerate(types)]
            g.op(op.op, *args, **dict(op.attrs))
            cost = kernel_cost(lower(g, g.ops[0]), self.device)
            return KernelChoice(cost.us, ()) if cost.feasible else None
        best = None
        for values in itertools.product(*(domain(self.problem.sizes[home[s]]) for s in private)):
            trial = env | dict(zip(private, values))
            try:
                block = block_graph(op.block, types, trial, self.block_size)
            except IRError:
                continue  # a split that does not divide
            if not fits(block, self.device):
                self.rejected += 1
                continue
            cost = kernel_cost(block, self.device)
            if not cost.feasible:
                self.rejected += 1
            elif best is None or cost.us < best.us:
                best = KernelChoice(cost.us, values)
        return best


def _structure(bp: BlockPlan) -> tuple:
    """What a kernel's sizes depend on besides its input types and symbols' values: its block graph, not which
    tensors it reads nor which kernel's grid a tied loop takes (so kernels alike in different plans share them)."""
    loop = "tied" if bp.loop and bp.loop.startswith("g") else bp.loop
    return (bp.axes, loop, tuple((bi.imap, bi.fmap) for bi in bp.inputs), bp.ops, bp.outputs)


def _symbols(d: Dim) -> list[str]:
    return _symbols(d[1]) + _symbols(d[2]) if is_cat(d) else [s for s, _ in d]
