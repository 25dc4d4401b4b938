"""What a compiled executable will do, read from its optimized HLO text: matmul FLOPs per step,
collectives (async or not), large float32 buffers, and whether it holds CUDA machine code.

Why not `compiled.cost_analysis()`: it is None for compile-only (deviceless) executables, and
XLA's HloCostAnalysis counts a while-loop body once (the layer scan, the micro-batch scan and
the loss-chunk scan each run many times per step) and gives 0 FLOPs to custom calls (cuBLAS
GEMMs, Triton kernels). Here every computation's FLOPs are weighted by how often it runs
(`known_trip_count` of each enclosing while loop), dots inside fusions are counted, cuBLAS GEMM
calls get 2·M·N·K, and the Pallas flash-attention kernels get the FLOPs of their matmuls
(estimated from their operand shapes; see `_kernel_flops`). Elementwise work is not counted:
the figure is matmul FLOPs, the part that MFU measures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

_ARRAY = re.compile(r"\b(pred|[su]\d+|f8e\w+|bf16|f16|f32|f64|c64|c128)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|body|condition|to_apply)=%([^\s,}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DIMS = re.compile(r"\b(lhs_contracting_dims)=\{([0-9,]*)\}")
_SYNC = re.compile(r'"is_sync":(true|false)')

# Ops whose result is a view or a pass-through of a buffer defined elsewhere.
_NO_BUFFER = {"get-tuple-element", "bitcast", "tuple", "parameter", "while", "call", "conditional", "async-done",
              "all-gather-done", "all-reduce-done", "reduce-scatter-done", "collective-permute-done", "copy-done",
              "optimization-barrier"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # result type text: `bf16[2,3]{1,0}` or a tuple `(f32[], ...)`
    opcode: str
    operands: list[str]  # names of the operand instructions (without %)
    attrs: str  # everything after the operand list

    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(self.type)]


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    entry: str


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "({":
            depth += 1
        elif c in ")}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    type_text, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    args_end = _matching(rest, len(op.group(1)))
    args = rest[len(op.group(1)) + 1:args_end - 1]
    operands = re.findall(r"%([^\s,)]+)", args)
    return Instr(name, type_text, op.group(1), operands, rest[args_end:])


def parse(text: str) -> Module:
    """The computations of an HLO module's text (`compiled.as_text()`), instructions in order."""
    comps: dict[str, list[Instr]] = {}
    entry = current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        ins = _parse_instr(line)
        if ins is not None:
            comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(comps, entry)


def _called(ins: Instr) -> list[str]:
    names = _CALLS.findall(ins.attrs)
    for group in _BRANCHES.findall(ins.attrs):
        names += re.findall(r"%([^\s,]+)", group)
    return names


def _trip_count(ins: Instr) -> int | None:
    m = _TRIP.search(ins.attrs)
    return int(m.group(1)) if m else None


def _shape(types: dict[str, Instr], name: str) -> tuple[int, ...]:
    arrays = types[name].arrays() if name in types else []
    return arrays[0][1] if arrays else ()


def _dot_flops(ins: Instr, types: dict[str, Instr]) -> float:
    out = ins.arrays()[0][1]
    lhs = _shape(types, ins.operands[0])
    dims = dict(_DIMS.findall(ins.attrs)).get("lhs_contracting_dims", "")
    k = math.prod(lhs[int(d)] for d in dims.split(",") if d) if lhs else 0
    return 2.0 * math.prod(out) * k


def _cublas_flops(ins: Instr, types: dict[str, Instr]) -> float:
    """`__cublas$gemm` / `__cublas$lt$matmul`: result is the first tuple element; contracting
    dimensions are in the backend config's dot_dimension_numbers."""
    out = ins.arrays()[0][1]
    lhs = _shape(types, ins.operands[0])
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
    dims = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')] if m else []
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in dims) if lhs else 0.0


# custom calls that do no arithmetic: XLA's host offloading allocates the host buffers it writes with these
_NO_FLOP_CALLS = frozenset({"AllocateBuffer"})


def _kernel_flops(ins: Instr, types: dict[str, Instr]) -> float | None:
    """Pallas flash attention (jax's `mha` kernels), from q [B, T, H, D]: the forward kernel does
    QKᵀ and PV (2 matmuls of 2·B·H·T²·D), the backward kernel recomputes QKᵀ and does dV, dP, dQ,
    dK (5 matmuls); both skip the causal upper triangle (× ½). None: not a kernel known here."""
    names = re.search(r'op_name="([^"]*)"', ins.attrs)
    op_name = names.group(1) if names else ""
    matmuls = 2 if "mha_forward" in op_name else 5 if "mha_backward" in op_name else None
    if matmuls is None:
        return 0.0 if "preprocess_backward" in op_name else None  # elementwise only
    q = _shape(types, ins.operands[0])
    if len(q) != 4:
        return None
    b, t, h, d = q
    return matmuls * 2.0 * b * h * t * t * d * 0.5


@dataclasses.dataclass
class Stats:
    step_flops: float  # matmul FLOPs of one execution, per device
    opaque_calls: int  # executed custom calls whose FLOPs are unknown (not counted)
    unknown_trip_loops: int  # while loops without a known trip count (counted once)
    collectives: dict[str, dict[str, int]]  # kind -> {"async": n, "sync": m} in the program text
    collectives_per_step: dict[str, dict[str, int]]  # the same, weighted by loop trip counts
    # f32 buffers of >= T·T elements: {"shape", "count" (instructions defining one), "bytes",
    # "score_like"}; score_like = two of
    # its dimensions are multiples of T, as attention scores [.., T, T] (possibly merged with heads)
    tt_buffers: list[dict]


def analyse(text: str, seq_len: int) -> Stats:
    """FLOPs, collectives and T×T float32 buffers of an optimized HLO module's text."""
    mod = parse(text)
    fusion_bodies = _callees(mod, "fusion")
    async_bodies = _callees(mod, "async-start")  # their collective is counted at the async-start
    memo: dict[str, tuple[float, int, int, Counter]] = {}

    def visit(name: str):
        """(flops, opaque calls, unknown-trip loops, collective counter) of one run of `name`."""
        if name in memo:
            return memo[name]
        flops, opaque, unknown, coll = 0.0, 0, 0, Counter()
        instrs = mod.computations.get(name, [])
        types = {i.name: i for i in instrs}
        for ins in instrs:
            f = _instr_flops(ins, types)
            if f is None:
                opaque += 1
            else:
                flops += f
            kind = _collective_kind(ins, mod)
            if kind:
                coll[kind] += 1
            repeat = 1
            if ins.opcode == "while":
                trip = _trip_count(ins)
                repeat = trip if trip is not None else 1
                unknown += trip is None
            for callee in _work_called(ins):
                f, o, u, c = visit(callee)
                flops += repeat * f
                opaque += repeat * o
                unknown += u
                if ins.opcode != "async-start":
                    for key, n in c.items():
                        coll[key] += repeat * n
        memo[name] = (flops, opaque, unknown, coll)
        return memo[name]

    flops, opaque, unknown, executed = visit(mod.entry)
    static = Counter()
    tt = Counter()
    for name, instrs in mod.computations.items():
        for ins in instrs:
            kind = _collective_kind(ins, mod)
            if kind and name not in async_bodies:
                static[kind] += 1
            if name in fusion_bodies or ins.opcode in _NO_BUFFER:
                continue  # values inside a fusion live in registers; these ops reuse a buffer
            for dtype, dims in ins.arrays():
                if dtype == "f32" and math.prod(dims) >= seq_len * seq_len:
                    tt[dims] += 1
    buffers = [{"shape": list(s), "count": n, "bytes": 4 * math.prod(s),
                "score_like": sum(d % seq_len == 0 for d in s) >= 2}
               for s, n in sorted(tt.items(), key=lambda kv: -math.prod(kv[0]))]
    return Stats(flops, opaque, unknown, _by_kind(static), _by_kind(executed), buffers)


def _instr_flops(ins: Instr, types: dict[str, Instr]) -> float | None:
    """Matmul FLOPs of one run of `ins` itself (its called computations apart); None for a custom
    call whose FLOPs are unknown."""
    if ins.opcode == "dot":
        return _dot_flops(ins, types)
    if ins.opcode != "custom-call":
        return 0.0
    target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    target = target.group(1) if target else ""
    if target.startswith("__cublas$"):
        return _cublas_flops(ins, types)
    return 0.0 if target in _NO_FLOP_CALLS else _kernel_flops(ins, types)


def _work_called(ins: Instr) -> list[str]:
    """The computations `ins` runs as work of its own (not the per-element reducers of a reduce,
    a collective, a scatter or a sort)."""
    if ins.opcode == "reduce" or ins.opcode.startswith(("all-", "reduce-scatter", "scatter", "sort", "map",
                                                         "select-and-scatter", "reduce-window")):
        return []
    return _called(ins)


def flops_by_op(text: str) -> dict[str, float]:
    """The step's matmul FLOPs (as `analyse` counts them) by the jax op that made each dot or
    kernel (its `op_name` metadata, numbers replaced by #), largest first: where a plan's FLOPs
    beyond the model's go (a second forward under remat, padding, a duplicated dot)."""
    mod = parse(text)
    by_op: Counter = Counter()

    def visit(name: str, runs: int) -> None:
        instrs = mod.computations.get(name, [])
        types = {i.name: i for i in instrs}
        for ins in instrs:
            f = _instr_flops(ins, types)
            if f:
                op = re.search(r'op_name="([^"]*)"', ins.attrs)
                by_op[re.sub(r"\d+", "#", op.group(1)) if op else "(no op_name)"] += f * runs
            repeat = (_trip_count(ins) or 1) if ins.opcode == "while" else 1
            for callee in _work_called(ins):
                visit(callee, runs * repeat)

    visit(mod.entry, 1)
    return dict(by_op.most_common())


def _callees(mod: Module, opcode: str) -> set[str]:
    return {c for instrs in mod.computations.values() for ins in instrs if ins.opcode == opcode for c in _called(ins)}


def _collective_kind(ins: Instr, mod: Module) -> str | None:
    """'all-gather/async', 'reduce-scatter/sync', ... for a collective; None otherwise. A `-done`
    is not counted (its `-start` is). Async pairs XLA marks `is_sync` run synchronously."""
    op = ins.opcode
    base = op[:-len("-start")] if op.endswith("-start") else op
    if op == "async-start":
        wrapped = [i.opcode for c in _called(ins) for i in mod.computations.get(c, [])]
        base = next((w for w in wrapped if w in COLLECTIVES), None)
        if base is None:
            return None
    if base not in COLLECTIVES:
        return None
    if op == base:
        return f"{base}/sync"
    sync = _SYNC.search(ins.attrs)
    return f"{base}/{'sync' if sync and sync.group(1) == 'true' else 'async'}"


def _by_kind(counter: Counter) -> dict[str, dict[str, int]]:
    out = {k: {"async": 0, "sync": 0} for k in COLLECTIVES}
    for key, n in counter.items():
        kind, mode = key.split("/")
        out[kind][mode] += n
    return out


# ---- is it machine code? ---------------------------------------------------------------------------

_ELF = b"\x7fELF"
_CUDA_SECTION = b".nv.info"  # a section every cubin has (CUDA ELF metadata)


def cuda_binaries(compiled) -> int:
    """How many ELF images the serialized executable carries, 0 unless they are CUDA ELF
    (cubins: their `.nv.info` section is present). A GPU executable compiled without ptxas holds
    none (PTX at most) and could not run on a GPU. The blob is partly compressed, so the ELF
    headers are not parsed; the magic and the section name survive as literals."""
    blob = compiled.runtime_executable().serialize()
    return blob.count(_ELF) if _CUDA_SECTION in blob else 0


def to_json(stats: Stats) -> str:
    return json.dumps(dataclasses.asdict(stats))
