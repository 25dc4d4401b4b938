"""A roofline estimate of one run of a compiled program, read from its optimized HLO text.

Each executed operation (a fusion, a library GEMM, a kernel, a collective, a copy) costs the
largest of: its matmul FLOPs at the target's dense bf16 peak, the bytes it reads and writes at
the target's memory bandwidth, and the bytes a collective moves at the target's link bandwidth.
Operations inside while loops count once per iteration (`known_trip_count`), as in
`jaxsft.hlo_stats`, whose parser and FLOP counting this module reuses. The sum is a lower bound
of the step time on an ideal device that overlaps nothing but the asynchronous collectives (those
are reported apart, as overlapped), so measured / estimated says how far a run is from its own
program's roofline.

Bytes are operands + results, except where XLA works in place or on a window: a fused
dynamic-slice of a fusion parameter reads only the slice (the layer scan's per-layer weights), and
a dynamic-update-slice into a parameter writes only the update. Elementwise FLOPs are not counted
(memory bound on these devices). Host transfers (copy-start / copy-done of optimizer offload) are
not modelled: they cost 0 here.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxsft import hlo_stats
from jaxsft.hlo_stats import Instr

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_PARAM = re.compile(r"%([^\s=]+)\s*=\s*[^\s(]+\s+parameter\((\d+)\)")
# ops that launch nothing or only name a buffer made elsewhere (their cost is their callees' or none)
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "optimization-barrier", "add-dependency", "async-done",
         "copy-start", "copy-done", "send-done", "recv-done", "all-gather-done", "all-reduce-done",
         "reduce-scatter-done", "collective-permute-done", "all-to-all-done", "domain"}
_MOVES = {"parameter", "copy", "transpose", "bitcast", "reshape"}  # a fusion of only these moves data
CLASSES = ("gemm", "attention kernel", "elementwise fusions", "copies/transposes", "collectives not overlapped",
           "other")
COPY_FLAG_SHARE = 0.02  # a copy or transpose costing more than this share of the step is flagged


@dataclasses.dataclass(frozen=True)
class Peaks:
    """Per-device peak figures: dense bf16 FLOP/s, memory bytes/s, link bytes/s (one direction)."""
    name: str
    flops: float
    hbm: float
    link: float


# H100 SXM and H200: 989 dense bf16 TFLOP/s; HBM3 3.35 TB/s, HBM3e 4.8 TB/s; NVLink 4 450 GB/s per direction.
TARGETS = {"h100": Peaks("h100", 989e12, 3.35e12, 450e9), "h200": Peaks("h200", 989e12, 4.8e12, 450e9)}


@dataclasses.dataclass
class Op:
    name: str
    cls: str  # one of CLASSES, or "collectives overlapped"
    flops: float  # per run of the op
    bytes: float  # memory bytes per run
    link_bytes: float  # collective bytes per run
    seconds: float  # per run: max(flops/peak, bytes/hbm, link_bytes/link)
    runs: int  # how often one step runs it
    f32_gemm: bool
    shape: str  # result type, for the report


@dataclasses.dataclass
class Estimate:
    target: str
    step_s: float  # sum over ops not overlapped, of seconds x runs
    flops: float  # matmul FLOPs per step (the GEMM and attention-kernel ops)
    bytes: float  # memory bytes per step
    overlapped_collective_s: float  # asynchronous collectives: assumed hidden, not in step_s
    mfu: float | None  # model FLOPs / (step_s x peak), when model FLOPs were given
    shares: dict[str, float]  # class -> share of step_s
    seconds: dict[str, float]  # class -> seconds per step
    flags: list[str]  # float32 GEMMs; copies/transposes over COPY_FLAG_SHARE of the step
    top: list[dict]  # the 10 costliest ops: name, class, shape, runs, seconds (per step), share
    unknown_trip_loops: int  # while loops without a known trip count (counted once)

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0%}" for k, v in self.shares.items() if v >= 0.005)
        mfu = f", MFU {self.mfu:.1%}" if self.mfu is not None else ""
        return f"roofline ({self.target}) {self.step_s * 1e3:.1f} ms/step{mfu}: {parts}"


def _array_bytes(type_text: str) -> int:
    return sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in hlo_stats._ARRAY.findall(type_text))


def _lhs_dtype(ins: Instr, types: dict[str, Instr]) -> str | None:
    arrays = types[ins.operands[0]].arrays() if ins.operands and ins.operands[0] in types else []
    return arrays[0][0] if arrays else None


def _matmuls(comp: str, mod, memo: dict) -> tuple[float, bool]:
    """(matmul FLOPs, any float32 GEMM) of one run of a fused computation, nested fusions included."""
    if comp in memo:
        return memo[comp]
    flops, f32 = 0.0, False
    instrs = mod.computations.get(comp, [])
    types = {i.name: i for i in instrs}
    for ins in instrs:
        if ins.opcode == "dot":
            flops += hlo_stats._dot_flops(ins, types)
            f32 |= _lhs_dtype(ins, types) == "f32"
        elif ins.opcode == "fusion":
            for callee in hlo_stats._called(ins):
                f, g = _matmuls(callee, mod, memo)
                flops, f32 = flops + f, f32 or g
    memo[comp] = (flops, f32)
    return memo[comp]


def _fusion_bytes(ins: Instr, types: dict[str, Instr], body: list[Instr], params: dict[str, int]) -> float:
    """Operands + result of a fusion, reading only the window of a parameter that is used only by
    (dynamic-)slices, and writing only the update of a dynamic-update-slice into a parameter."""
    by_index = {params[i.name]: i.name for i in body if i.opcode == "parameter" and i.name in params}
    users: dict[str, list[Instr]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    root = body[-1] if body else None
    in_place = set()
    result = float(_array_bytes(ins.type))
    roots = [root] if root is not None and root.opcode != "tuple" else [
        next((i for i in body if i.name == o), None) for o in (root.operands if root else [])]
    body_types = {i.name: i for i in body}
    for r in roots:
        if r is not None and r.opcode == "dynamic-update-slice" and r.operands and r.operands[0] in by_index.values():
            in_place.add(r.operands[0])
            update = body_types.get(r.operands[1]) if len(r.operands) > 1 else None
            result += (_array_bytes(update.type) if update else 0) - _array_bytes(r.type)
    total = max(result, 0.0)
    for k, operand in enumerate(ins.operands):
        name = by_index.get(k)
        if name in in_place:
            continue
        uses = users.get(name, [])
        if name and uses and all(u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == name
                                 for u in uses):
            total += sum(_array_bytes(u.type) for u in uses)
        elif operand in types:
            total += _array_bytes(types[operand].type)
    return total


def _classify_custom_call(ins: Instr, types: dict[str, Instr]) -> tuple[str, float, bool]:
    target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
    target = target.group(1) if target else ""
    if target.startswith("__cublas$"):  # result: (product, workspace)
        return "gemm", hlo_stats._cublas_flops(ins, types), _lhs_dtype(ins, types) == "f32"
    if "fmha" in target:  # cuDNN flash attention
        return "attention kernel", 0.0, False
    k = hlo_stats._kernel_flops(ins, types)
    op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
    if k is not None and op_name and ("mha" in op_name.group(1) or "backward" in op_name.group(1)):
        return "attention kernel", k, False
    return "other", k or 0.0, False


def _op(ins: Instr, types, mod, params, peaks: Peaks, memo) -> Op | None:
    """The cost of one run of `ins`, None for ops that cost nothing of their own."""
    op = ins.opcode
    if op in _FREE or op.endswith("-done"):
        return None
    flops, f32, link = 0.0, False, 0.0
    nbytes = float(_array_bytes(ins.type) + sum(_array_bytes(types[o].type) for o in ins.operands if o in types))
    kind = hlo_stats._collective_kind(ins, mod)
    if kind:
        base, mode = kind.split("/")
        # the larger of input and output (an async start's result tuple holds both: take its largest array)
        largest = max((_BYTES.get(dt, 4) * math.prod(d) for dt, d in ins.arrays()), default=0)
        link = max(largest, sum(_array_bytes(types[o].type) for o in ins.operands if o in types))
        link *= 2 if base == "all-reduce" else 1  # a ring all-reduce sends (and receives) the data twice
        cls = "collectives not overlapped" if mode == "sync" else "collectives overlapped"
        nbytes = 0.0
    elif op == "async-start":  # an asynchronous computation that is not a collective: cost its ops once
        return None
    elif op == "fusion":
        callee = (hlo_stats._called(ins) or [""])[0]
        body = mod.computations.get(callee, [])
        flops, f32 = _matmuls(callee, mod, memo)
        nbytes = _fusion_bytes(ins, types, body, params)
        if flops:
            cls = "gemm"
        elif all(i.opcode in _MOVES for i in body):
            cls = "copies/transposes"
        else:
            cls = "elementwise fusions"
    elif op == "dot":
        flops, f32, cls = hlo_stats._dot_flops(ins, types), _lhs_dtype(ins, types) == "f32", "gemm"
    elif op == "custom-call":
        cls, flops, f32 = _classify_custom_call(ins, types)
        if 'custom_call_target="__cublas$' in ins.attrs:  # the workspace (last tuple element) is scratch
            arrays = ins.arrays()
            nbytes -= sum(_BYTES.get(dt, 4) * math.prod(d) for dt, d in arrays[1:])
    elif op in ("copy", "transpose"):
        cls = "copies/transposes"
    elif op == "dynamic-slice":
        nbytes, cls = 2.0 * _array_bytes(ins.type), "elementwise fusions"
    elif op == "dynamic-update-slice":
        upd = types.get(ins.operands[1]) if len(ins.operands) > 1 else None
        nbytes, cls = 2.0 * (_array_bytes(upd.type) if upd else 0), "elementwise fusions"
    else:
        cls = "elementwise fusions" if op not in ("sort", "scatter", "send", "recv", "rng") else "other"
    seconds = max(flops / peaks.flops, nbytes / peaks.hbm, link / peaks.link)
    return Op(ins.name, cls, flops, nbytes, link, seconds, 1, f32, ins.type[:80])


def estimate(hlo_text: str, peaks: Peaks | str = "h100", model_flops: float | None = None) -> Estimate:
    """The roofline of one run of the module in `hlo_text` (`compiled.as_text()`) on `peaks`
    (a Peaks, or a key of TARGETS); `model_flops`: the step's model FLOPs, for an MFU estimate."""
    peaks = TARGETS[peaks.lower()] if isinstance(peaks, str) else peaks
    mod = hlo_stats.parse(hlo_text)
    params = {m.group(1): int(m.group(2)) for m in _PARAM.finditer(hlo_text)}
    memo: dict = {}
    ops: dict[tuple[str, str], Op] = {}
    unknown = 0

    def visit(comp: str, runs: int) -> None:
        nonlocal unknown
        instrs = mod.computations.get(comp, [])
        types = {i.name: i for i in instrs}
        for ins in instrs:
            if ins.opcode == "while":
                trip = hlo_stats._trip_count(ins)
                unknown += trip is None
                body = re.search(r"\bbody=%([^\s,}]+)", ins.attrs)
                if body:
                    visit(body.group(1), runs * (trip or 1))
            elif ins.opcode == "call":
                for callee in hlo_stats._called(ins):
                    visit(callee, runs)
            elif ins.opcode == "conditional":  # the costliest branch: an upper bound of the one taken
                branches = [c for g in hlo_stats._BRANCHES.findall(ins.attrs) for c in re.findall(r"%([^\s,]+)", g)]
                branches += re.findall(r"(?:true|false)_computation=%([^\s,}]+)", ins.attrs)
                if branches:
                    visit(max(branches, key=lambda b: _cost_of(b)), runs)
            else:
                o = _op(ins, types, mod, params, peaks, memo)
                if o is not None:
                    key = (comp, ins.name)
                    if key in ops:
                        ops[key].runs += runs
                    else:
                        o.runs = runs
                        ops[key] = o

    def _cost_of(comp: str) -> float:
        types = {i.name: i for i in mod.computations.get(comp, [])}
        return sum((o.seconds if o else 0.0) for o in (_op(i, types, mod, params, peaks, memo)
                                                        for i in mod.computations.get(comp, [])))

    visit(mod.entry, 1)
    seconds = {c: 0.0 for c in CLASSES}
    overlapped = 0.0
    for o in ops.values():
        if o.cls == "collectives overlapped":
            overlapped += o.seconds * o.runs
        else:
            seconds[o.cls] += o.seconds * o.runs
    step = sum(seconds.values())
    shares = {c: (s / step if step else 0.0) for c, s in seconds.items()}
    flops = sum(o.flops * o.runs for o in ops.values())
    nbytes = sum(o.bytes * o.runs for o in ops.values())
    ranked = sorted((o for o in ops.values() if o.cls != "collectives overlapped"), key=lambda o: -o.seconds * o.runs)
    flags = []
    for o in ranked:
        share = o.seconds * o.runs / step if step else 0.0
        if o.f32_gemm:
            flags.append(f"float32 GEMM {o.name} -> {o.shape}, {o.runs} run(s): {o.seconds * o.runs * 1e3:.3f} ms "
                         f"({share:.1%} of the step)")
        if o.cls == "copies/transposes" and share > COPY_FLAG_SHARE:
            flags.append(f"{o.cls[:-1]} {o.name} -> {o.shape}, {o.runs} run(s): {share:.1%} of the step")
    top = [{"name": o.name, "class": o.cls, "shape": o.shape, "runs": o.runs, "seconds": o.seconds * o.runs,
            "share": o.seconds * o.runs / step if step else 0.0} for o in ranked[:10]]
    mfu = model_flops / (step * peaks.flops) if model_flops and step else None
    return Estimate(peaks.name, step, flops, nbytes, overlapped, mfu, shares, seconds, flags, top, unknown)


def to_dict(est: Estimate) -> dict:
    return dataclasses.asdict(est)
