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
    """Computations of an HLO module's text (name -> instructions) and the ENTRY's name."""
    computations: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                computations[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = _parse_instr(line)
        if instr is not None:
            computations[current].append(instr)
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
    """A while loop's trip count: XLA's known_trip_count when given, else the bound N of a
    condition `counter < N` (JAX's scans and fori_loops count from 0 by 1)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", instr.attrs)
    body = computations.get(cond.group(1), []) if cond else []
    constants = {
        i.name: int(i.args)
        for i in body
        if i.op == "constant" and re.fullmatch(r"-?\d+", i.args.strip())
    }
    root = next((i for i in body if i.root), None)
    if root is None or root.op != "compare" or "direction=LT" not in root.attrs:
        return None
    bounds = [constants[o] for o in root.operands if o in constants]
    return bounds[0] if len(bounds) == 1 else None


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
