"""Reading XLA's optimized HLO text (`compiled.as_text()`): matmul FLOPs with while loops
multiplied by their trip counts, the largest device buffers, argument sizes in their tiled
layouts. What `jaxalign.aot` reports beyond `memory_analysis` and `cost_analysis`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass
class Buffer:
    """One array of the optimized program: its HLO instruction, shape, bytes and the JAX
    operation it came from."""

    name: str
    shape: str
    nbytes: int
    op: str
    source: str


_ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"^([a-z0-9]+)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(")
_REF = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_REFS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclass
class _Instr:
    name: str
    type: str  # "f32[8,16]{1,0}" or a tuple "(s32[], ...)"
    op: str
    operands: list[str]
    attrs: str  # what follows the operand list
    args: str  # the operand list's text (a constant's value)
    root: bool = False


def _split_type(rest: str) -> tuple[str, str]:
    """'f32[2]{0} add(...), x=y' -> ('f32[2]{0}', 'add(...), x=y'); tuple types balanced."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parse_instr(line: str) -> _Instr | None:
    line = line.strip()
    root = line.startswith("ROOT ")
    line = line.removeprefix("ROOT ")
    if not line.startswith("%") or " = " not in line:
        return None
    name, _, rest = line.partition(" = ")
    type_, call = _split_type(rest)
    op, paren, args = call.partition("(")
    if not paren:
        return None
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            end = i
            break
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    return _Instr(name[1:], type_, op, operands, args[end + 1 :], args[:end], root)


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    """Computations of an HLO module's text (name -> instructions) and the ENTRY's name.

    An instruction can span lines: a Pallas kernel's `frontend_attributes` hold JSON with line
    breaks (splash attention's block sizes), whose lines start with `"` or `}}`. Only a line
    that is `}` alone closes a computation; other lines that do not start an instruction
    continue the previous one."""
    computations: dict[str, list[_Instr]] = {}
    entry, current = None, None
    pending: list[str] = []

    def flush() -> None:
        if pending and current is not None:
            instr = _parse_instr(" ".join(pending))
            if instr is not None:
                computations[current].append(instr)
        pending.clear()

    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.rstrip() == "}":
            flush()
            current = None
            continue
        if line.startswith(("  %", "  ROOT ")):
            flush()
        pending.append(line.strip())
    flush()
    return computations, entry


def array_dims(type_: str) -> tuple[str, list[int]] | None:
    m = _ARRAY.match(type_)
    if m is None:
        return None
    return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def array_bytes(type_: str) -> int:
    parsed = array_dims(type_)
    if parsed is None or parsed[0] not in _ITEMSIZE:
        return 0
    return _ITEMSIZE[parsed[0]] * math.prod(parsed[1])


def padded_bytes(type_: str) -> int:
    """Bytes of an array in its device layout `{minor_to_major:T(tile)}`: the first tile
    (`T(8,128)` on TPU) rounds the most minor dimensions up to whole tiles, its last entry the
    most minor one; a scalar `s32[]{:T(128)}` takes a whole tile (512 bytes)."""
    parsed = array_dims(type_)
    if parsed is None or parsed[0] not in _ITEMSIZE:
        return 0
    dims = list(parsed[1])
    layout = re.search(r"\{([0-9,]*):T\(([0-9,]+)\)", type_)
    extra = 1
    if layout:
        minor_to_major = [int(d) for d in layout.group(1).split(",") if d]
        tile = [int(t) for t in layout.group(2).split(",")]
        for k, size in enumerate(reversed(tile)):
            if k < len(minor_to_major):
                dim = minor_to_major[k]
                dims[dim] = -(-dims[dim] // size) * size
            else:  # a tile of higher rank than the array: its missing dims (1) fill a tile
                extra *= size
    return _ITEMSIZE[parsed[0]] * math.prod(dims) * extra


def entry_parameters(text: str) -> list[str]:
    """The types of the program's arguments (its ENTRY parameters), per device, with layout."""
    computations, entry = parse_hlo(text)
    params = [i for i in computations.get(entry, []) if i.op == "parameter"]
    return [i.type for i in sorted(params, key=lambda i: int(i.args))]


def _trip_count(instr: _Instr, computations: dict[str, list[_Instr]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count when given, else from its condition
    `counter < N`, the counter's start in the loop's initial tuple (0 when not a constant) and
    its step in the body (`counter + c`, added up when XLA unrolled the body into several
    increments; 1 when not found): ceil((N - start) / step)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", instr.attrs)
    cond_instrs = computations.get(cond.group(1), []) if cond else []
    constants = _int_constants(cond_instrs)
    root = next((i for i in cond_instrs if i.root), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.attrs:
        return None
    bounds = [constants[o] for o in root.operands if o in constants]
    if len(bounds) != 1:
        return None
    index = _tuple_index(cond_instrs, next(o for o in root.operands if o not in constants))
    start, step = 0, 1
    if index is not None:
        body = re.search(r"body=%([\w.\-]+)", instr.attrs)
        step = _counter_step(computations.get(body.group(1), []) if body else [], index) or 1
    return max(-(-(bounds[0] - start) // step), 0)


def _int_constants(instrs: list[_Instr]) -> dict[str, int]:
    return {
        i.name: int(i.args)
        for i in instrs
        if i.op == "constant" and re.fullmatch(r"-?\d+", i.args.strip())
    }


def _tuple_index(instrs: list[_Instr], name: str) -> int | None:
    """The tuple index of the loop parameter's element that `name` reads (through copies)."""
    by_name = {i.name: i for i in instrs}
    instr = by_name.get(name)
    while instr is not None and instr.op in ("copy", "bitcast", "convert") and instr.operands:
        instr = by_name.get(instr.operands[0])
    if instr is None or instr.op != "get-tuple-element":
        return None
    found = re.search(r"index=(\d+)", instr.attrs)
    return int(found.group(1)) if found else None


def _counter_step(body: list[_Instr], index: int) -> int | None:
    """How much the body adds to element `index` of the loop tuple: its root tuple's element
    there as a chain of `add`s of integer constants onto that element."""
    by_name = {i.name: i for i in body}
    constants = _int_constants(body)
    root = next((i for i in body if i.root), None)
    if root is None or root.op != "tuple" or index >= len(root.operands):
        return None
    step, instr = 0, by_name.get(root.operands[index])
    while instr is not None and instr.op == "add" and len(instr.operands) == 2:
        added = [constants[o] for o in instr.operands if o in constants]
        others = [o for o in instr.operands if o not in constants]
        if len(added) != 1 or len(others) != 1:
            return None
        step += added[0]
        instr = by_name.get(others[0])
    if instr is None or _tuple_index(body, instr.name) != index:
        return None
    return step or None


def computation_multipliers(
    computations: dict[str, list[_Instr]], entry: str
) -> tuple[dict[str, int], int]:
    """How many times each computation runs per program execution (ENTRY once; a while body
    its trip count times its caller's), and how many loops had no trip count (counted once)."""
    callers: dict[str, list[tuple[str, int]]] = {}
    unresolved = 0
    for name, instrs in computations.items():
        for instr in instrs:
            refs = [(kind, target) for kind, target in _REF.findall(instr.attrs)]
            for kind, group in _REFS.findall(instr.attrs):
                refs += [(kind, t) for t in re.findall(r"%([\w.\-]+)", group)]
            trips = 1
            if instr.op == "while":
                count = _trip_count(instr, computations)
                unresolved += count is None
                trips = count or 1
            for kind, target in refs:
                callers.setdefault(target, []).append((name, trips if kind == "body" else 1))
    memo: dict[str, int] = {entry: 1}

    def times(name: str, seen: frozenset = frozenset()) -> int:
        if name not in memo:
            memo[name] = sum(
                times(caller, seen | {name}) * k
                for caller, k in callers.get(name, [])
                if caller not in seen
            )
        return memo[name]

    return {name: times(name) for name in computations}, unresolved


def _matmul_flops(instr: _Instr, shapes: dict[str, str]) -> float:
    out = array_dims(instr.type)
    if out is None:
        return 0.0
    out_elems = math.prod(out[1])
    if instr.op == "dot":
        lhs = array_dims(shapes.get(instr.operands[0], "")) if instr.operands else None
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
        if lhs is None or dims is None:
            return 0.0
        contracted = math.prod(lhs[1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * out_elems * contracted
    if instr.op == "convolution" and len(instr.operands) > 1:
        return _convolution_flops(instr, out[1], shapes)
    return 0.0


def _window(attrs: str, key: str, rank: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([0-9x_]+)", attrs)
    if m is None:
        return [default] * rank
    return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _convolution_flops(instr: _Instr, out_dims: list[int], shapes: dict[str, str]) -> float:
    """2 x multiply-adds of a convolution, counting for every spatial dimension only the
    (output, kernel) positions that land on a real input element, not on padding or a hole of
    `lhs_dilate`: TPU programs write batched matmuls as such convolutions. As XLA's
    HloCostAnalysis counts them."""
    lhs = array_dims(shapes.get(instr.operands[0], ""))
    rhs = array_dims(shapes.get(instr.operands[1], ""))
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if lhs is None or rhs is None or labels is None:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    spatial = sorted(c for c in rhs_labels if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    wattrs = window.group(1) if window else ""
    rank = len(spatial)
    stride = _window(wattrs, "stride", rank, 1)
    lhs_dilate = _window(wattrs, "lhs_dilate", rank, 1)
    rhs_dilate = _window(wattrs, "rhs_dilate", rank, 1)
    pad_m = re.search(r"\bpad=([0-9x_]+)", wattrs)
    pad_low = [int(p.split("_")[0]) for p in pad_m.group(1).split("x")] if pad_m else [0] * rank
    valid = 1
    for k, dim in enumerate(spatial):
        n_in = lhs[1][lhs_labels.index(dim)]
        n_kernel = rhs[1][rhs_labels.index(dim)]
        n_out = out_dims[out_labels.index(dim)]
        input_limit = (n_in - 1) * lhs_dilate[k] + 1
        count = 0
        for o in range(n_out):
            for w in range(n_kernel):
                i = o * stride[k] + w * rhs_dilate[k] - pad_low[k]
                count += 0 <= i < input_limit and i % lhs_dilate[k] == 0
        valid *= count
    batch = out_dims[out_labels.index("b")]
    features_in = rhs[1][rhs_labels.index("i")]
    features_out = rhs[1][rhs_labels.index("o")]
    return 2.0 * batch * features_in * features_out * valid


def hlo_flops(text: str) -> tuple[float, int]:
    """Matmul and convolution FLOPs of an optimized HLO module, loop bodies multiplied by
    their trip counts; and how many loops had an unknown trip count (counted once)."""
    computations, entry = parse_hlo(text)
    if entry is None:
        return 0.0, 0
    times, unresolved = computation_multipliers(computations, entry)
    total = 0.0
    for name, instrs in computations.items():
        shapes = {i.name: i.type for i in instrs}
        flops = sum(_matmul_flops(i, shapes) for i in instrs if i.op in ("dot", "convolution"))
        total += flops * times.get(name, 0)
    return total, unresolved


# Ops whose result is a view or a tuple of existing buffers, not a new allocation.
_NOT_ALLOCATING = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant"}


def largest_buffers(text: str, count: int = 10) -> list[Buffer]:
    """The `count` largest device-memory (HBM) arrays of the program: the entry's parameters
    and the results of the instructions of every non-fused computation (fusion internals live
    in registers or on-chip memory, as do arrays XLA places in memory space 1, `S(1)`)."""
    computations, entry = parse_hlo(text)
    fused = set()
    for instrs in computations.values():
        for instr in instrs:
            if instr.op == "fusion":
                fused.update(re.findall(r"calls=%([\w.\-]+)", instr.attrs))
    out = []
    for name, instrs in computations.items():
        if name in fused:
            continue
        for instr in instrs:
            is_argument = instr.op == "parameter" and name == entry
            if (instr.op in _NOT_ALLOCATING and not is_argument) or "S(1)" in instr.type:
                continue
            nbytes = array_bytes(instr.type)
            if nbytes:
                source = re.search(r'op_name="([^"]*)"', instr.attrs)
                out.append(
                    Buffer(
                        instr.name,
                        instr.type.split("{")[0],
                        nbytes,
                        "argument" if is_argument else instr.op,
                        source.group(1).replace("\\'", "'") if source else "",
                    )
                )
    return sorted(out, key=lambda b: -b.nbytes)[:count]


# Top-level ops that move no HBM data of their own: control flow runs its computations (counted
# there), the rest are views, tuples or bookkeeping.
_NO_TRAFFIC = _NOT_ALLOCATING | {
    "while", "call", "conditional", "after-all", "partition-id", "replica-id", "iota",
    "copy-start", "copy-done", "opt-barrier", "add-dependency",
}  # fmt: skip
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def hlo_traffic(text: str) -> tuple[float, float]:
    """HBM bytes read and written by one execution of an optimized HLO module, and the bytes its
    collectives produce, both per device with loop bodies multiplied out: for every instruction
    of a non-fused computation, its array operands and result (a fusion reads its inputs from
    and writes its output to HBM; what it does inside stays on chip). A slice of an operand
    (`dynamic-slice`, `slice`, `gather`, also inside a fusion) reads only the slice; an in-place
    `dynamic-update-slice` (a scan writing one layer of a stacked array) writes only the update.
    Arrays XLA keeps in on-chip memory (`S(1)`) are not counted. An estimate of traffic, not a
    trace: caching and re-reads inside a kernel are not modelled."""
    computations, entry = parse_hlo(text)
    if entry is None:
        return 0.0, 0.0
    times, _ = computation_multipliers(computations, entry)
    fused = {}
    for instrs in computations.values():
        for instr in instrs:
            if instr.op == "fusion":
                for target in re.findall(r"calls=%([\w.\-]+)", instr.attrs):
                    fused[target] = _fusion_io(computations.get(target, []))
    traffic = collective = 0.0
    for name, instrs in computations.items():
        k = times.get(name, 0)
        if name in fused or not k:
            continue
        shapes = {i.name: i.type for i in instrs}
        for instr in instrs:
            if instr.op in _NO_TRAFFIC or instr.op.endswith("-done"):
                continue
            reads = [_on_chip_free(shapes.get(o, "")) for o in instr.operands]
            written = _tuple_bytes(instr.type)
            if instr.op in _SLICING:
                reads, written = [0], 2 * written  # the slice read, the result written
            elif instr.op == "dynamic-update-slice":
                update = reads[1] if len(reads) > 1 else 0
                reads, written = [update], update
            elif instr.op == "fusion":
                target = re.search(r"calls=%([\w.\-]+)", instr.attrs)
                io = fused.get(target.group(1)) if target else None
                if io is not None:
                    param_reads, in_place_write, inner_collective = io
                    collective += k * inner_collective
                    reads = [min(r, param_reads.get(i, r)) for i, r in enumerate(reads)]
                    if in_place_write is not None:
                        written = in_place_write
            traffic += k * (sum(reads) + written)
            if instr.op.removesuffix("-start") in _COLLECTIVES:
                collective += k * _tuple_bytes(instr.type)
    return traffic, collective


_SLICING = {"dynamic-slice", "slice", "gather"}


def _on_chip_free(type_: str) -> int:
    return 0 if "S(1)" in type_ else _tuple_bytes(type_)


def _fusion_io(instrs: list[_Instr]) -> tuple[dict[int, int], int | None, int]:
    """A fused computation's HBM reads per parameter index where it reads less than the whole
    parameter (only slices of it, or it is the buffer updated in place), the bytes it
    writes when its root is an in-place dynamic-update-slice (else None: its result), and the
    bytes its collectives produce (TPU programs fuse all-gathers with their consumers)."""
    shapes = {i.name: i.type for i in instrs}
    params = {}
    for i in instrs:
        if i.op == "parameter":
            params[i.name] = int(i.args.strip() or 0)
    users: dict[str, list[_Instr]] = {}
    for i in instrs:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    reads: dict[int, int] = {}
    root = next((i for i in instrs if i.root), None)
    written = None
    if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
        written = array_bytes(shapes.get(root.operands[1], ""))
        if root.operands[0] in params:  # the buffer being updated is not read
            reads[params[root.operands[0]]] = 0
    for name, index in params.items():
        uses = users.get(name, [])
        if uses and all(u.op in _SLICING and u.operands[0] == name for u in uses):
            reads[index] = sum(array_bytes(u.type) for u in uses)
    inner = sum(_tuple_bytes(i.type) for i in instrs if i.op.removesuffix("-start") in _COLLECTIVES)
    return reads, written, inner


def _tuple_bytes(type_: str) -> int:
    """Bytes of an array type, or of the arrays of a tuple type (not in on-chip memory)."""
    if not type_.startswith("("):
        return 0 if "S(1)" in type_ else array_bytes(type_)
    parts = re.findall(r"[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?", type_)
    return sum(array_bytes(p) for p in parts if "S(1)" not in p)


# Splash attention's Pallas kernels (jax.experimental.pallas.ops.tpu.splash_attention): the
# matmuls of one visited (query block, key block) pair. Forward: scores and values (2);
# dK/dV: scores again, dV, dP and dK (4); dQ: scores, dP and dQ (3).
_SPLASH_MATMULS = {"fwd": 2, "dkv": 4, "dq": 3}
_SPLASH = re.compile(r"splash_m[hq]a_(fwd|dkv|dq)")


def pallas_attention_flops(text: str) -> float:
    """Matmul FLOPs inside the splash-attention kernels of an optimized HLO module (Mosaic
    custom calls: opaque to `cost_analysis` and to `hlo_flops`), loop bodies multiplied out.
    Per call: 2 x (query rows x key length x head_dim) per matmul, times the kernel's matmul
    count, times the fraction of (query, key) blocks a causal mask visits, (n + 1) / (2n) for
    n blocks (the diagonal blocks are computed whole). A sliding window visits fewer blocks:
    it is counted as causal (an upper bound). Both branches of a conditional count (Gemma's
    per-layer choice of window runs one of them)."""
    computations, entry = parse_hlo(text)
    if entry is None:
        return 0.0
    times, _ = computation_multipliers(computations, entry)
    total = 0.0
    for name, instrs in computations.items():
        k = times.get(name, 0)
        if not k:
            continue
        shapes = {i.name: i.type for i in instrs}
        for instr in instrs:
            if instr.op != "custom-call" or "tpu_custom_call" not in instr.attrs:
                continue
            phase = _SPLASH.search(instr.name) or _SPLASH.search(instr.attrs)
            if phase is None:
                continue
            arrays = [array_dims(shapes.get(o, "")) for o in instr.operands]
            floats = [a for a in arrays if a and a[0] in ("bf16", "f32", "f16") and len(a[1]) >= 3]
            if len(floats) < 2:
                continue
            q, kv = floats[0][1], floats[1][1]
            rows, head_dim, keys = math.prod(q[:-1]), q[-1], kv[-2]
            block = re.search(r'block_q\\\\?"?:\s*(\d+)', instr.attrs)
            n = max(q[-2] // int(block.group(1)), 1) if block else 1
            visited = (n + 1) / (2 * n)
            matmuls = _SPLASH_MATMULS[phase.group(1)]
            total += k * matmuls * 2.0 * rows * keys * head_dim * visited
    return total
