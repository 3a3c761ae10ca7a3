"""The depth-first µGraph enumerator: kernel graphs of predefined and graph-defined ops, block graphs inside.

Everything here is symbolic (search_space/dims.py): a graph-defined op is chosen as its inputs, the dim class
each grid axis splits, and the class or upstream grid axis its forloop splits; sizes come later
(search_space/instantiate.py). Maps follow the classes: a grid axis over class C splits, in every block input,
the dim of class C (an input without one is replicated), and so does the loop; the omap of a grid axis is the
output dim its split reached, or, where a reduction consumed it (partial sums, e.g. split-KV), a free dim the
partials are concatenated along. A loop may also split a dim an upstream kernel concatenated partials along; it
then has that grid axis's size (the combine kernel of split-K and split-KV). Grid axes split the classes of the
program's outputs (and, where the preset allows partial results, reduced classes); loops split reduced classes.
A grid axis may also be tied to an upstream one over the same class (`tied_symbol`), to read the copies of a
partial its blocks wrote one per block (split-K's sums of squares, one per column block).

Ops are added in canonical order, so each graph is built once: an op's rank is (its newest operand, its operands,
its type, its attributes), and each new op ranks above the previous one. Every new tensor or tile must pass the
abstract-expression check (unless pruning is off); shapes and labels (which grid axes and loop split each tile
dim) must line up. A block graph closes when no tile inside the loop is left unconsumed; the tiles left after the
loop are its outputs. A block graph without a loop gets one accum_sum per output (the identity) when built.

The kernel level is searched by iterative deepening (`depth` kernels at a time, by the caller), so the cheap
few-kernel candidates are all found before the budget goes to deeper ones. Block graphs are memoized per
(inputs, maps), op results per (op, operand tiles), and the op attempts on each tile of a block graph (Moves)
are shared by all its descendants: a block graph met again under another kernel prefix costs a lookup, and
counts the states it took to build (so a state count is the same in any process).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.ops import OPS
from superopt.search_space import abstract_expr as ae
from superopt.search_space.dims import UNIT, Dim, ddiv, dim_classes, dmul, is_cat, sym
from superopt.search_space.presets import Preset, usable

OP_ORDER = {name: k for k, name in enumerate(OPS)}
COMMUTATIVE = {"add", "mul"}
LOOP = "loop"  # the label of a tile dim split by the forloop


@dataclass(frozen=True, eq=False)
class Tile:
    """A tensor of the search: a kernel tensor, or a block tile (with labels and its side of the loop)."""

    shape: tuple[Dim, ...]
    value: ae.Value
    labels: tuple[frozenset, ...]
    after: bool = False

    def __post_init__(self) -> None:  # tiles key the caches: hash once
        object.__setattr__(self, "_hash", hash((self.shape, self.value, self.labels, self.after)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:  # the hash first: most tiles compared (a block's, a cache's) differ
        return self is other or (
            isinstance(other, Tile)
            and self._hash == other._hash
            and (self.shape, self.value, self.labels, self.after)
            == (other.shape, other.value, other.labels, other.after)
        )

    def __reduce__(self) -> tuple:  # rehash where unpickled: string hashes differ between processes
        return (Tile, (self.shape, self.value, self.labels, self.after))


@dataclass(frozen=True, order=True)  # ordered: block plans rank against each other
class BlockInputPlan:
    """A block input: the kernel tensor it reads, the tensor dim each grid axis splits (imap) and the loop's."""

    tensor: int
    imap: tuple[int | None, ...]
    fmap: int | None


@dataclass(frozen=True, order=True)  # ordered: block plans rank against each other
class BlockOpPlan:
    """A block op: its name, its operand tiles, and its attributes as (name, value) items."""

    op: str
    operands: tuple[int, ...]
    attrs: tuple


@dataclass(frozen=True, order=True)  # ordered: block plans rank against each other
class BlockOutputPlan:
    """A block output: the tile it writes and the output dim each grid axis concatenates along (omap)."""

    tile: int
    omap: tuple[int, ...]


@dataclass(frozen=True)
class BlockPlan:
    """A block graph, symbolically. Grid axis a has size symbol g{index}_{a} (a tied one, its upstream axis's);
    the loop has `loop_sym`."""

    index: int
    axes: tuple[str, ...]  # the class symbol each grid axis splits; "C@g{j}_{b}": class C in upstream blocks (tied)
    loop: str | None  # the class the loop splits, an upstream grid symbol (tied), or None (no loop)
    inputs: tuple[BlockInputPlan, ...]
    ops: tuple[BlockOpPlan, ...]
    tiles: tuple[Tile, ...]
    outputs: tuple[BlockOutputPlan, ...] = ()

    @property
    def loop_sym(self) -> str | None:
        return None if self.loop is None else self.loop if self.loop.startswith("g") else f"f{self.index}"

    def grid_syms(self) -> tuple[str, ...]:
        return tuple(tied_symbol(c) or f"g{self.index}_{a}" for a, c in enumerate(self.axes))

    def key(self) -> tuple:
        """Its structure without the abstract values: deterministic in every process (hash seeds aside)."""
        return (self.axes, self.loop or "", self.inputs, self.ops, self.outputs)


def tied_symbol(axis: str) -> str | None:
    """The upstream grid symbol a tied grid axis takes its size from (None: the axis has a symbol of its own).

    A tied axis "C@g{j}_{b}" splits class C into the blocks of axis b of kernel j, and also splits a dim of
    g{j}_{b} alone: where kernel j wrote one copy of a partial result per block along C (a block writes its own
    place, so a result its blocks along C share, such as a row's partial sum of squares, is written once by
    each), block n here reads the copy block n there wrote, beside its share of C."""
    return axis.partition("@")[2] or None


def axis_class(axis: str) -> str:
    """The class a grid axis splits."""
    return axis.partition("@")[0]


@dataclass(frozen=True)
class KernelOp:
    op: str
    inputs: tuple[int, ...]
    attrs: tuple
    block: BlockPlan | None = None


@dataclass(frozen=True)
class OpChoice:
    """A first-level (or any kernel-level) choice: a predefined op over kernel tensors."""

    op: str
    inputs: tuple[int, ...]
    attrs: tuple


@dataclass(frozen=True)
class BlockChoice:
    """A kernel-level choice: a graph-defined op over kernel tensors, with its grid axes' classes and its loop."""

    inputs: tuple[int, ...]
    axes: tuple[str, ...]
    loop: str | None


Choice = OpChoice | BlockChoice


@dataclass(frozen=True)
class Plan:
    """A candidate µGraph, symbolically: kernel ops over tensors numbered program inputs first."""

    ops: tuple[KernelOp, ...]
    tensors: tuple[Tile, ...]
    outputs: tuple[int, ...]

    def key(self) -> tuple:
        return tuple((o.op, o.inputs, o.attrs, o.block.key() if o.block else ()) for o in self.ops) + (self.outputs,)


@dataclass
class Counts:
    """What the enumerator saw: states visited, and the op attempts each check turned down."""

    states: int = 0
    pruned_abstract: int = 0  # the result cannot be part of an expression equivalent to the program's
    pruned_shape: int = 0  # shapes or split labels do not line up, or too many tensors are left to consume
    pruned_redundant: int = 0  # a tile abstractly equal to one the block graph already has
    plans: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Found:
    """What one run of the enumerator found: its plans in DFS order, the run's state count when it found each
    (`at`), its counts, and the budget that cut it short: "states" (its state limit), "time" (the deadline) or ""."""

    plans: list[Plan]
    at: list[int]
    counts: Counts
    cut: str = ""


class BudgetExhausted(Exception):
    """A run's budget ran out; args[0] says which: "states" or "time"."""


# --- shapes and labels ----------------------------------------------------------------------------------------


def _broadcast(a: Tile, b: Tile) -> tuple[tuple[Dim, ...], tuple[frozenset, ...]] | None:
    n = max(len(a.shape), len(b.shape))
    shape: list[Dim] = []
    labels: list[frozenset] = []
    for k in range(1, n + 1):
        da = a.shape[-k] if k <= len(a.shape) else None
        db = b.shape[-k] if k <= len(b.shape) else None
        la = a.labels[-k] if da is not None else frozenset()
        lb = b.labels[-k] if db is not None else frozenset()
        if da is None or da == UNIT:
            shape.append(db if db is not None else UNIT)
            labels.append(lb)
        elif db is None or db == UNIT or (db == da and lb == la):
            shape.append(da)
            labels.append(la)
        else:
            return None
    return tuple(reversed(shape)), tuple(reversed(labels))


def _no_repeated_axis(labels: tuple[frozenset, ...]) -> bool:
    seen: set = set()
    for ls in labels:
        axes = {x for x in ls if x != LOOP}
        if axes & seen:
            return False
        seen |= axes
    return True


Shaped = tuple[tuple[Dim, ...], tuple[frozenset, ...]] | None  # an op's output shape and labels, or None


def _same(args: list[Tile], attrs: dict) -> Shaped:
    return args[0].shape, args[0].labels


def _binary(args: list[Tile], attrs: dict) -> Shaped:
    return _broadcast(args[0], args[1])


def _matmul(args: list[Tile], attrs: dict) -> Shaped:
    a, b = args
    if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[-1] != b.shape[-2] or a.labels[-1] != b.labels[-2]:
        return None
    batch = _broadcast(Tile(a.shape[:-2], a.value, a.labels[:-2]), Tile(b.shape[:-2], b.value, b.labels[:-2]))
    if batch is None:
        return None
    labels = batch[1] + (a.labels[-2], b.labels[-1])
    return (batch[0] + (a.shape[-2], b.shape[-1]), labels) if _no_repeated_axis(labels) else None


def _reduce(args: list[Tile], attrs: dict) -> Shaped:
    a, d = args[0], attrs["dim"]
    if attrs["keepdim"]:
        return a.shape[:d] + (UNIT,) + a.shape[d + 1 :], a.labels[:d] + (frozenset(),) + a.labels[d + 1 :]
    return a.shape[:d] + a.shape[d + 1 :], a.labels[:d] + a.labels[d + 1 :]


def _concat(args: list[Tile], attrs: dict) -> Shaped:
    (a, b), d = args, attrs["dim"]
    if len(a.shape) != len(b.shape):
        return None
    if any((a.shape[k], a.labels[k]) != (b.shape[k], b.labels[k]) for k in range(len(a.shape)) if k != d):
        return None
    shape = a.shape[:d] + (("cat", a.shape[d], b.shape[d]),) + a.shape[d + 1 :]
    return shape, a.labels[:d] + (a.labels[d] | b.labels[d],) + a.labels[d + 1 :]


def _rope(args: list[Tile], attrs: dict) -> Shaped:
    """x's shape, cos and sin broadcast to it; the last dim whole in a tile (its halves pair up)."""
    x = args[0]
    if x.labels[-1]:
        return None
    for t in args[1:]:
        out = _broadcast(x, t)
        if out is None or out != (x.shape, x.labels):
            return None
    return x.shape, x.labels


def _after_loop(labels: tuple[frozenset, ...]) -> tuple[frozenset, ...]:
    return tuple(ls - {LOOP} for ls in labels)


def _accum(args: list[Tile], attrs: dict) -> Shaped:
    """Over loop iterations: the tile's shape, no longer split by the loop."""
    return args[0].shape, _after_loop(args[0].labels)


def _accum_last(args: list[Tile], attrs: dict) -> Shaped:
    """Over loop iterations and the tile's last dim (which must be one piece, not a concatenation)."""
    a = args[0]
    if is_cat(a.shape[-1]):
        return None
    return a.shape[:-1] + (UNIT,), _after_loop(a.labels)[:-1] + (frozenset(),)


def _rescaled_sum(args: list[Tile], attrs: dict) -> Shaped:
    out = _broadcast(args[0], args[1])
    return None if out is None or out[0] != args[0].shape else _accum(args, attrs)


def _dequant(args: list[Tile], attrs: dict) -> Shaped:
    """Never inside a block graph yet: an int4 row is half as many bytes as values, and a row's scales one a
    group, sizes the dim classes (dims.py) do not relate to the values' dim. A program's dequant stays a kernel
    of its own."""
    return None


# The shape rule of each op the search may add: rule(operand tiles, attrs) -> its output shape and labels.
SHAPES: dict[str, Callable[[list[Tile], dict], Shaped]] = {
    **{name: _same for name, d in OPS.items() if d.kind in ("unary", "scalar", "norm")},
    **{name: _binary for name, d in OPS.items() if d.kind == "binary"},
    **{name: _reduce for name, d in OPS.items() if d.kind == "reduce"},
    "matmul": _matmul,
    "rope": _rope,
    "concat": _concat,
    "dequant": _dequant,
    "accum_sum": _accum,
    "accum_max": _accum,
    "accum_sum_last": _accum_last,
    "accum_mean_last": _accum_last,
    "accum_rms_last": _accum_last,
    "accum_rescaled_sum": _rescaled_sum,
}


def infer(op: str, args: list[Tile], attrs: dict) -> Shaped:
    """Symbolic output shape and labels of `op`, or None where the operands do not line up."""
    return SHAPES[op](args, attrs)


# --- the program ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """The program to search for, in the search's symbolic terms."""

    graph: KernelGraph
    shapes: dict[str, tuple[Dim, ...]]  # symbolic shape of every program tensor
    inputs: tuple[Tile, ...]
    target: ae.Target
    target_shapes: tuple[tuple[Dim, ...], ...]
    sizes: dict[str, int]  # class symbol -> size
    eps: tuple[float, ...]  # eps values of the program's norms
    constants: tuple[float, ...]  # c values of its scalar ops, eps values of its norms
    keepdims: tuple[bool, ...]  # keepdim values of its reductions: True, and False where one drops its dim
    kernel_ops: tuple[str, ...]  # predefined ops that may appear at kernel level
    kept: frozenset[str]  # classes of the outputs' dims
    reduced: frozenset[str]  # classes some op reduces (contracts, sums, normalizes over)
    even: frozenset[str] = frozenset()  # classes rope rotates: their size stays even in any instance


def make_problem(graph: KernelGraph) -> Problem:
    shapes, sizes = dim_classes(graph)
    values: dict[str, ae.Value] = {n: ae.leaf(n) for n in graph.inputs}
    reduced: set[str] = set()
    for op in graph.ops:
        if op.block is not None:
            raise SuperoptError(
                f"search: '{graph.name}' has graph-defined ops; search takes a program of predefined ops"
            )
        ins = tuple(shapes[i] for i in op.inputs)
        v = ae.apply(op.op, tuple(values[i] for i in op.inputs), ae.Ctx(ins, op.attrs, UNIT))
        if v is None:
            raise SuperoptError(f"search: op '{op.op}' of '{graph.name}' has no abstract expression")
        values[op.outputs[0]] = v
        dim = {"matmul": -1, "norm": -1, "reduce": op.attrs.get("dim")}.get(OPS[op.op].kind)
        if dim is not None:
            reduced.update(s for s, _ in ins[0][dim])
    return Problem(
        graph=graph,
        shapes=shapes,
        inputs=tuple(Tile(shapes[n], values[n], tuple(frozenset() for _ in shapes[n])) for n in graph.inputs),
        target=ae.Target([values[o] for o in graph.outputs]),
        target_shapes=tuple(shapes[o] for o in graph.outputs),
        sizes=sizes,
        eps=tuple(dict.fromkeys(op.attrs["eps"] for op in graph.ops if "eps" in op.attrs))
        or tuple(dict.fromkeys(op.attrs["c"] for op in graph.ops if op.op == "add_scalar" and op.attrs["c"] > 0))
        or (1e-6,),  # a hand-written norm's eps is the constant it adds to the mean square
        # a norm's eps among them: a norm computed by hand (its mean square combined from partials) adds it
        constants=tuple(dict.fromkeys(v for op in graph.ops for k, v in op.attrs.items() if k in ("c", "eps"))),
        keepdims=(True, False) if any(op.attrs.get("keepdim") is False for op in graph.ops) else (True,),
        kernel_ops=tuple(dict.fromkeys(op.op for op in graph.ops)),
        kept=frozenset(s for o in graph.outputs for d in shapes[o] for s, _ in d),
        reduced=frozenset(reduced),
        even=frozenset(s for op in graph.ops if op.op == "rope" for s, _ in shapes[op.inputs[0]][-1]),
    )


# --- the search -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelState:
    tensors: tuple[Tile, ...]
    uses: tuple[int, ...]
    origin: tuple[int, ...]  # producing kernel op of each tensor, -1 for inputs
    ops: tuple[KernelOp, ...]
    last_rank: tuple = ()

    @property
    def graph_defs(self) -> int:
        return sum(op.block is not None for op in self.ops)


# An op attempt in a block graph: (rank, op, operands, attrs, its tile or the counter it is pruned under).
Move = tuple[tuple, str, tuple[int, ...], tuple, "Tile | str"]


@dataclass(frozen=True)
class Moves:
    """The op attempts whose newest operand is one tile, in DFS order: they depend only on the tiles up to it, so
    a block graph's descendants, which keep its tiles, reuse them instead of trying each op again. `made` holds
    the attempts that make a tile, each after the counts of the prunings tried before it (shape, abstract);
    `rest`, those after the last."""

    tried: tuple[Move, ...]
    made: tuple[tuple[int, int, Move], ...]
    rest: tuple[int, int]


@dataclass(frozen=True)
class BlockState:
    plan: BlockPlan
    uses: tuple[int, ...]
    last_rank: tuple = ()
    moves: tuple[Moves, ...] = ()  # of its first tiles as the newest operand; the rest made when first needed


def _rank(inputs: tuple[int, ...], op: str, attrs: tuple) -> tuple:
    return (max(inputs), inputs, OP_ORDER[op], attrs)


@dataclass
class Searcher:
    """The DFS for plans of exactly `depth` kernels under a preset's limits (`run` one first-level choice at a
    time; the caches carry over between runs); `roots` splits its first level for a process pool. A run stops
    past `deadline` (monotonic seconds) or at its state limit.

    A run's state count does not depend on what the caches already hold: a memoized block graph counts the
    states (and prunings) it took to build, as if built again. So a run's plans and count are a function of its
    first-level choice alone, whichever process runs it after whichever others, and a states budget cut at a
    global count is the same for any number of processes (search_space/api.py)."""

    problem: Problem
    preset: Preset
    depth: int = 1
    deadline: float = float("inf")
    prune: bool = True
    on_state: Callable[[Counts], None] | None = None  # progress, every 256 states visited
    counts: Counts = field(default_factory=Counts)
    limit: int = 10**18  # states the current run may count
    _visits: int = 0  # states really visited (memo hits aside), for the clock and progress checks
    _blocks_memo: dict = field(default_factory=dict)
    _results: dict = field(default_factory=dict)
    _operand_memo: dict = field(default_factory=dict)
    _tiles: dict = field(default_factory=dict)
    _attrs: dict = field(default_factory=dict)
    _leaf_memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        functions, program_ops = self.problem.target.functions, set(self.problem.kernel_ops)
        self.kernel_op_names = usable(self.problem.kernel_ops, functions, program_ops)
        self.block_op_names = usable(self.preset.block_op_names, functions, program_ops)

    def initial(self) -> KernelState:
        n = len(self.problem.inputs)
        return KernelState(self.problem.inputs, (0,) * n, (-1,) * n, ())

    def _visit(self, states: int = 1) -> None:
        """Counts `states` states (one visited, or a memoized block graph's); BudgetExhausted past a budget."""
        self.counts.states += states
        if self.counts.states >= self.limit:
            raise BudgetExhausted("states")
        self._visits += 1
        if self._visits % 64 == 0 and time.monotonic() > self.deadline:
            raise BudgetExhausted("time")
        if self.on_state is not None and self._visits % 256 == 0:
            self.on_state(self.counts)

    # -- kernel level --

    def roots(self, depth: int) -> list[Choice]:
        """The first-level choices of plans of `depth` kernels, the units a process pool shares out."""
        self.depth = depth
        return list(self._kernel_choices(self.initial()))

    def run(self, depth: int, root: Choice, limit: int = 10**18) -> Found:
        """The plans of exactly `depth` kernels under one first-level choice, in DFS order, with what the walk
        counted; a budget that runs out (`limit` states, or the deadline) cuts it short (`cut`), keeping what was
        found until then."""
        self.depth, self.counts, self.limit = depth, Counts(), limit
        found = Found([], [], self.counts)
        try:
            self._expand(self.initial(), root, found)
        except BudgetExhausted as e:
            found.cut = e.args[0]
        return found

    def _expand(self, state: KernelState, choice: Choice, found: Found) -> None:
        if isinstance(choice, OpChoice):
            nxt = self._add_kernel_op(state, KernelOp(choice.op, choice.inputs, choice.attrs))
            if nxt is not None:
                self._kernel_dfs(nxt, found)
            return
        for block in self._block_plans(state, choice):
            nxt = self._add_graph_def(state, block)
            if nxt is not None:
                self._kernel_dfs(nxt, found)

    def _kernel_dfs(self, state: KernelState, found: Found) -> None:
        self._visit()
        plan = self._complete(state)
        if plan is not None:
            if len(plan.ops) == self.depth:  # shallower plans were found at their own depth
                self.counts.plans += 1
                found.plans.append(plan)
                found.at.append(self.counts.states)
            return
        if len(state.ops) < self.depth:
            for choice in self._kernel_choices(state):
                self._expand(state, choice, found)

    def _kernel_choices(self, state: KernelState) -> Iterator[Choice]:
        n = len(state.tensors)
        reads = self._reads_enough(state)
        for op in self.kernel_op_names:
            d = OPS[op]
            for inputs in itertools.product(range(n), repeat=d.arity):
                if d.arity == 2 and (inputs[0] == inputs[1] or (op in COMMUTATIVE and inputs[0] > inputs[1])):
                    continue
                if not reads(inputs):
                    continue
                for attrs in self._attr_choices(op, len(state.tensors[inputs[0]].shape)):
                    if _rank(inputs, op, attrs) > state.last_rank:
                        yield OpChoice(op, inputs, attrs)
        if state.graph_defs >= self.preset.graph_defs:
            return
        dangling = {k for k in range(len(self.problem.inputs), n) if state.uses[k] == 0}
        for size in range(1, self.preset.block_inputs + 1):
            for inputs in itertools.combinations(range(n), size):
                if not dangling <= set(inputs) or _rank(inputs, "graph_def", ())[:3] < state.last_rank[:3]:
                    continue
                if not reads(inputs):
                    continue
                for axes, loop in self._maps_choices(state, inputs):
                    yield BlockChoice(inputs, axes, loop)

    def _reads_enough(self, state: KernelState) -> Callable[[tuple[int, ...]], bool]:
        """Whether a kernel over the given tensors may be the state's next: the last kernel must read, through
        them, every program input that an output the state lacks reads (else it cannot compute that output)."""
        if len(state.ops) < self.depth - 1:
            return lambda inputs: True
        target = self.problem.target
        needed = frozenset().union(
            *(
                self._leaves(v)
                for v, shape in zip(target.outputs, self.problem.target_shapes)
                if not any(t.value == v and t.shape == shape for t in state.tensors)
            )
        )
        return lambda inputs: needed <= frozenset().union(*(self._leaves(state.tensors[i].value) for i in inputs))

    def _leaves(self, value: ae.Value) -> frozenset[str]:
        hit = self._leaf_memo.get(value)
        if hit is None:
            hit = self._leaf_memo[value] = ae.leaves(value)
        return hit

    def _attr_choices(self, op: str, rank: int) -> list[tuple]:
        """The attributes tried for `op` on a first operand of rank `rank`."""
        hit = self._attrs.get((op, rank))
        if hit is None:
            hit = self._attrs[op, rank] = self._new_attr_choices(op, rank)
        return hit

    def _new_attr_choices(self, op: str, rank: int) -> list[tuple]:
        d = OPS[op]
        if d.kind == "concat":
            return [(("dim", k),) for k in range(rank)]
        if d.kind == "reduce":
            return [(("dim", k), ("keepdim", keep)) for k in range(rank) for keep in self.problem.keepdims]
        if "eps" in dict(d.attrs):
            return [(("eps", e),) for e in self.problem.eps]
        if "c" in dict(d.attrs):
            return [(("c", c),) for c in self.problem.constants]
        return [()]

    def _check(self, value: ae.Value | None) -> str:
        """'' if `value` may stay, else the counter it is pruned under."""
        if value is None:
            return "pruned_shape"
        if self.prune and not self.problem.target.may_be_subexpr(value):
            return "pruned_abstract"
        return ""

    def _add_kernel_op(self, state: KernelState, op: KernelOp) -> KernelState | None:
        args = [state.tensors[i] for i in op.inputs]
        attrs = dict(op.attrs)
        shaped = infer(op.op, args, attrs)
        value = None
        if shaped is not None:
            value = ae.apply(op.op, tuple(a.value for a in args), ae.Ctx(tuple(a.shape for a in args), attrs, UNIT))
        why = self._check(value)
        if why:
            setattr(self.counts, why, getattr(self.counts, why) + 1)
            return None
        return self._append(state, op, [Tile(shaped[0], value, shaped[1])], _rank(op.inputs, op.op, op.attrs))

    def _append(self, state: KernelState, op: KernelOp, outs: list[Tile], rank: tuple) -> KernelState | None:
        uses = list(state.uses)
        for i in set(op.inputs):
            uses[i] += 1
        new = KernelState(
            state.tensors + tuple(outs),
            tuple(uses) + (0,) * len(outs),
            state.origin + (len(state.ops),) * len(outs),
            state.ops + (op,),
            rank,
        )
        dangling = sum(1 for k in range(len(self.problem.inputs), len(new.tensors)) if new.uses[k] == 0)
        if dangling - len(self.problem.target.outputs) > self.depth - len(new.ops):
            self.counts.pruned_shape += 1
            return None
        return new

    def _add_graph_def(self, state: KernelState, block: BlockPlan) -> KernelState | None:
        outs = []
        g = block.grid_syms()
        for bo in block.outputs:
            tile = block.tiles[bo.tile]
            shape = list(tile.shape)
            for a, d in enumerate(bo.omap):
                shape[d] = dmul(shape[d], sym(g[a]))
            outs.append(Tile(tuple(shape), tile.value, tuple(frozenset() for _ in shape)))
        op = KernelOp("graph_def", tuple(bi.tensor for bi in block.inputs), (), block)
        rank = _rank(op.inputs, "graph_def", block.key())
        if rank <= state.last_rank:
            return None
        return self._append(state, op, outs, rank)

    def _complete(self, state: KernelState) -> Plan | None:
        outputs = []
        for value, shape in zip(self.problem.target.outputs, self.problem.target_shapes):
            match = [k for k, t in enumerate(state.tensors) if t.value == value and t.shape == shape]
            if not match:
                return None
            outputs.append(match[-1])
        live = set()
        stack = [state.origin[o] for o in outputs]
        while stack:
            k = stack.pop()
            if k >= 0 and k not in live:
                live.add(k)
                stack.extend(state.origin[i] for i in state.ops[k].inputs)
        if len(live) != len(state.ops):
            return None
        return Plan(state.ops, state.tensors, tuple(outputs))

    # -- block level --

    def _maps_choices(
        self, state: KernelState, inputs: tuple[int, ...]
    ) -> Iterator[tuple[tuple[str, ...], str | None]]:
        symbols = sorted({s for i in inputs for d in state.tensors[i].shape if not is_cat(d) for s, e in d if e > 0})
        p = self.problem
        loops: list[str | None] = [None] if self.preset.allow_no_loop else []
        if self.preset.allow_loop:
            loops += [s for s in symbols if s in p.reduced or s.startswith("g")]
        classes = [s for s in symbols if s in p.kept or (self.preset.split_reductions and s in p.reduced)]
        tied = self._tied_axes(state, inputs) if self.preset.tied_axes else []
        # an axis over a class that inputs hold copies along is tied: an untied one leaves the copies whole in every
        # block, which no op can take (a sum over them has the wrong size, and they broadcast with nothing)
        classes = [c for c in classes if not any(axis_class(a) == c for a in tied)]
        for n_axes in range(1, self.preset.grid_axes + 1):
            for axes in itertools.combinations(classes + tied, n_axes):
                if len({axis_class(a) for a in axes}) < n_axes:
                    continue  # two axes over one class would split the same dims
                for loop in loops:
                    yield axes, loop

    def _tied_axes(self, state: KernelState, inputs: tuple[int, ...]) -> list[str]:
        """The tied grid axes a kernel over `inputs` may have: one per dim of an upstream grid symbol alone (a
        kernel's copies of a partial result, one per block along a class the outputs keep), sorted."""
        axes = {op.block.index: op.block.axes for op in state.ops if op.block is not None}
        tied = set()
        for i in inputs:
            for d in state.tensors[i].shape:
                if is_cat(d) or len(d) != 1 or d[0][1] != 1 or not d[0][0].startswith("g"):
                    continue
                kernel, axis = (int(x) for x in d[0][0][1:].split("_"))
                cls = axis_class(axes[kernel][axis])
                if cls in self.problem.kept:
                    tied.add(f"{cls}@{d[0][0]}")
        return sorted(tied)

    @staticmethod
    def _split_dim(shape: tuple[Dim, ...], symbol: str) -> int | None | bool:
        """The one dim of `shape` that `symbol` splits (None if none; False if it cannot: several dims hold it,
        or it is not the outer factor of its dim). A dim with two factors holds an upstream kernel's partials,
        concatenated with its grid axis outermost: only a loop over that axis may split it."""
        found = [k for k, d in enumerate(shape) if not is_cat(d) and dict(d).get(symbol, 0) > 0]
        if len(found) > 1:
            return False
        if not found:
            return None
        factors = [s for s, e in shape[found[0]] if e > 0]
        return found[0] if len(factors) == 1 or (len(factors) == 2 and symbol.startswith("g")) else False

    @classmethod
    def _axis_dim(cls, shape: tuple[Dim, ...], axis: str) -> int | None | bool:
        """The dim of `shape` a grid axis splits, as _split_dim says; a tied axis splits its upstream grid
        symbol's dim where `shape` has one, else its class's."""
        tie = tied_symbol(axis)
        found = cls._split_dim(shape, tie) if tie else None
        return cls._split_dim(shape, axis_class(axis)) if found is None else found

    def _block_plans(self, state: KernelState, choice: BlockChoice) -> list[BlockPlan]:
        """Every closed block graph over the choice's inputs with its maps (memoized)."""
        key = (choice, tuple(state.tensors[i] for i in choice.inputs), state.graph_defs)
        hit = self._blocks_memo.get(key)
        if hit is not None:
            plans, spent = hit
            self.counts.add(replace(spent, states=0))
            if spent.states:
                self._visit(spent.states)
            return plans
        before = replace(self.counts)
        plans = list(self._open_block(state, choice.inputs, choice.axes, choice.loop))
        spent = Counts(**{f.name: getattr(self.counts, f.name) - getattr(before, f.name) for f in fields(Counts)})
        self._blocks_memo[key] = plans, spent
        return plans

    def _open_block(self, state: KernelState, inputs: tuple[int, ...], axes: tuple[str, ...], loop: str | None):
        plan = BlockPlan(state.graph_defs, axes, loop, (), (), ())
        g, loop_sym = plan.grid_syms(), plan.loop_sym
        maps, tiles = [], []
        for i in inputs:
            t = state.tensors[i]
            imap = tuple(self._axis_dim(t.shape, c) for c in axes)
            fmap = self._split_dim(t.shape, loop) if loop is not None else None
            if any(d is False for d in imap) or fmap is False:
                return
            shape, labels = list(t.shape), [set() for _ in t.shape]
            for a, d in enumerate(imap):
                if d is not None:
                    shape[d] = ddiv(shape[d], sym(g[a]))
                    labels[d].add(a)
            if fmap is not None:
                shape[fmap] = ddiv(shape[fmap], sym(loop_sym))
                labels[fmap].add(LOOP)
            maps.append(BlockInputPlan(i, imap, fmap))
            tiles.append(self._intern(Tile(tuple(shape), t.value, tuple(frozenset(x) for x in labels))))
        if loop is not None and all(bi.fmap is None for bi in maps):
            return
        plan = BlockPlan(plan.index, axes, loop, tuple(maps), (), tuple(tiles))
        yield from self._block_dfs(BlockState(plan, (0,) * len(tiles)))

    def _block_dfs(self, state: BlockState) -> Iterator[BlockPlan]:
        self._visit()
        yield from self._close(state)
        plan = state.plan
        if len(plan.ops) >= self.preset.block_ops:
            return
        moves = state.moves
        while len(moves) < len(plan.tiles):
            moves += (self._moves(plan, len(moves)),)
        first = state.last_rank[0] if state.last_rank else 0
        for newest in range(first, len(plan.tiles)):
            above = state.last_rank if newest == first else None
            for rank, op, operands, attrs, tile in self._made(moves[newest], above):
                nxt = self._add_block_op(state, moves, op, operands, attrs, tile, rank)  # type: ignore[arg-type]
                if nxt is not None:
                    yield from self._block_dfs(nxt)

    def _moves(self, plan: BlockPlan, newest: int) -> Moves:
        """Every op attempt with tile `newest` the newest operand, each tried once for the block graph and all its
        descendants."""
        loop_sym, tiles = plan.loop_sym, plan.tiles
        tried: list[Move] = []
        for op in self.block_op_names:
            accum = OPS[op].kind == "accum"
            if accum and loop_sym is None:
                continue
            order = OP_ORDER[op]
            for operands in self._operands(op, newest):
                args = tuple(map(tiles.__getitem__, operands))
                # every path passes exactly one accumulator: checked before the cache, as most attempts fail it
                mixed = (accum and args[0].after) or len({a.after for a in args}) > 1
                for attrs in self._attr_choices(op, len(args[0].shape)):
                    tile = "pruned_shape" if mixed else self._result(op, args, attrs, loop_sym)
                    tried.append(
                        ((newest, operands, order, attrs), op, operands, attrs, tile)
                    )  # _rank's, newest its max
        made, pruned = [], {"pruned_shape": 0, "pruned_abstract": 0}
        for move in tried:
            if isinstance(move[4], str):
                pruned[move[4]] += 1
            else:
                made.append((pruned["pruned_shape"], pruned["pruned_abstract"], move))
                pruned = dict.fromkeys(pruned, 0)
        return Moves(tuple(tried), tuple(made), (pruned["pruned_shape"], pruned["pruned_abstract"]))

    def _made(self, moves: Moves, above: tuple | None) -> Iterator[Move]:
        """The attempts of `moves` ranked above `above` (None: all) that make a tile, counting the prunings among
        the others as the walk passes them (so a budget cuts the counts where trying each op would)."""
        counts = self.counts
        if above is None:
            for shape, abstract, move in moves.made:
                counts.pruned_shape += shape
                counts.pruned_abstract += abstract
                yield move
            counts.pruned_shape += moves.rest[0]
            counts.pruned_abstract += moves.rest[1]
            return
        for move in moves.tried:
            if move[0] > above:
                if isinstance(move[4], str):
                    setattr(counts, move[4], getattr(counts, move[4]) + 1)
                else:
                    yield move

    def _operands(self, op: str, newest: int) -> list[tuple[int, ...]]:
        """The operand tuples tried for `op` with tile `newest` the newest operand, in DFS order."""
        hit = self._operand_memo.get((op, newest))
        if hit is not None:
            return hit
        arity = OPS[op].arity
        tuples: list[tuple[int, ...]]
        if arity == 1:
            tuples = [(newest,)]
        elif arity == 2:
            pairs = [(i, newest) for i in range(newest + 1)] + [(newest, i) for i in range(newest)]
            tuples = [(a, b) for a, b in pairs if (a != b or op == "matmul") and not (op in COMMUTATIVE and a > b)]
        else:  # rope: every tuple of earlier tiles that has the newest
            tuples = [t for t in itertools.product(range(newest + 1), repeat=arity) if newest in t]
        self._operand_memo[op, newest] = tuples
        return tuples

    def _result(self, op: str, args: tuple[Tile, ...], attrs: tuple, loop_sym: str | None) -> Tile | str:
        """The tile `op` makes of `args`, or the counter it is pruned under; cached."""
        key = (op, args, attrs, loop_sym)
        hit = self._results.get(key)
        if hit is None:
            hit = self._results[key] = self._new_result(op, args, attrs, loop_sym)
        return hit

    def _new_result(self, op: str, args: tuple[Tile, ...], attrs: tuple, loop_sym: str | None) -> Tile | str:
        cats = [isinstance(a.value, ae.Cat) for a in args]
        if any(cats) and op != "matmul":
            return "pruned_shape"  # a concatenation pays off only as a matmul operand, where its parts' products add
        if op == "concat" and (any(cats) or args[0].value == args[1].value or attrs[0][1] < len(args[0].shape) - 2):
            return "pruned_shape"  # so: two different tiles, along a dim a matmul contracts
        attr_dict = dict(attrs)
        shaped = infer(op, list(args), attr_dict)
        value = None
        if shaped is not None:
            loop = sym(loop_sym) if loop_sym else UNIT
            value = ae.apply(op, tuple(a.value for a in args), ae.Ctx(tuple(a.shape for a in args), attr_dict, loop))
        why = self._check(value)
        return why or self._intern(Tile(shaped[0], value, shaped[1], OPS[op].kind == "accum" or args[0].after))

    def _intern(self, tile: Tile) -> Tile:
        """The one instance of tiles equal to `tile`: the caches keyed by tiles then find theirs by identity,
        without comparing abstract values."""
        return self._tiles.setdefault(tile, tile)

    def _add_block_op(
        self,
        state: BlockState,
        moves: tuple[Moves, ...],
        op: str,
        operands: tuple[int, ...],
        attrs: tuple,
        tile: Tile,
        rank: tuple,
    ) -> BlockState | None:
        plan = state.plan
        if self.prune and tile in plan.tiles:
            self.counts.pruned_redundant += 1  # abstractly a tile it has already (x + x, a second a @ b, ...)
            return None
        uses = list(state.uses)
        for i in set(operands):
            uses[i] += 1
        uses.append(0)
        dangling = sum(1 for u in uses if u == 0)
        if dangling - self.preset.block_outputs > self.preset.block_ops - len(plan.ops) - 1:
            self.counts.pruned_shape += 1
            return None
        new_plan = BlockPlan(
            plan.index,
            plan.axes,
            plan.loop,
            plan.inputs,
            plan.ops + (BlockOpPlan(op, operands, attrs),),
            plan.tiles + (tile,),
        )
        return BlockState(new_plan, tuple(uses), rank, moves)

    def _close(self, state: BlockState) -> Iterator[BlockPlan]:
        """The block graph with its dangling tiles as outputs, one per choice of omaps; none if it cannot close."""
        plan = state.plan
        if not plan.ops:
            return
        dangling = [k for k, u in enumerate(state.uses) if u == 0]
        if not dangling or len(dangling) > self.preset.block_outputs:
            return
        if any(k < len(plan.inputs) or isinstance(plan.tiles[k].value, ae.Cat) for k in dangling):
            return
        if plan.loop is not None and any(not plan.tiles[k].after for k in dangling):
            return
        omaps = []
        for k in dangling:
            tile = plan.tiles[k]
            choices = []
            for a in range(len(plan.axes)):
                dims = [d for d, ls in enumerate(tile.labels) if a in ls]
                if len(dims) > 1:
                    return
                free = [d for d, ls in enumerate(tile.labels) if not any(x != LOOP for x in ls)]
                choices.append(dims if dims else free)
            omaps.append([m for m in itertools.product(*choices) if len(set(m)) == len(m)])
        for combo in itertools.product(*omaps):
            outputs = tuple(BlockOutputPlan(k, m) for k, m in zip(dangling, combo))
            yield BlockPlan(plan.index, plan.axes, plan.loop, plan.inputs, plan.ops, plan.tiles, outputs)
