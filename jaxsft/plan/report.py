"""One plan as XLA compiled it: memory per device (device and host), FLOPs, collectives, the
[.., T, T] buffers; printed lines and JSON (the `--dry_run_json` keys)."""

from __future__ import annotations

import dataclasses

GiB = 2**30
# A plan fits when its peak is at most (1 - FIT_MARGIN) of the usable memory: XLA's plan leaves out
# the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation.
FIT_MARGIN = 0.05


@dataclasses.dataclass
class Plan:
    target: str
    devices: int
    mesh: dict
    compiled_for: str  # platform and device kind XLA compiled for
    settings: dict
    batch_shape: list
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    per_device_peak_bytes: int  # arguments + outputs - aliased + temp
    device_memory_bytes: int  # usable per device: memory × memory fraction
    device_total_bytes: int
    memory_fraction: float | None
    fits: bool  # peak <= (1 - FIT_MARGIN) × device_memory_bytes
    compile_s: float
    step_flops: float  # per device, matmul FLOPs XLA will execute (recomputation included)
    model_flops: float  # per device, MaxText convention for this batch shape (no recomputation)
    opaque_calls: int
    collectives: dict
    collectives_per_step: dict
    tt_buffers: list
    cuda_binaries: int | None  # cubins in the executable (CUDA targets)
    target_config: str | None
    trained: str = "every parameter"  # what the optimizer updates (jaxsft.trainable)
    opt_state_bytes: int = 0  # per device
    # pinned_host memory per device (optimizer_offload: the moments; XLA's own figures)
    host_argument_bytes: int = 0
    host_temp_bytes: int = 0
    host_peak_bytes: int = 0
    # jaxsft.roofline's estimate of the step on the target's peaks (h100/h200 targets), as a dict
    estimate: dict | None = None
    model: str = ""  # the model's family and attention geometry, with the sp values it allows

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> list[str]:
        """The plan as printed lines (per device)."""
        frac = f" at memory fraction {self.memory_fraction:.2f}" if self.memory_fraction is not None else ""
        lines = [
            f"[plan] {self.target}: {self.devices} × {self.compiled_for}, mesh dp={self.mesh['dp']} sp={self.mesh['sp']}, "
            f"batch {self.batch_shape} [micro-batches, rows, tokens], remat={self.settings['remat_policy']}, "
            f"attention={self.settings['attn_implementation']}, params {self.settings['param_dtype']}, "
            f"grad accumulator {self.settings.get('grad_accum_dtype', 'float32')}",
            f"[plan] per device: arguments {_gib(self.argument_bytes)}, temp {_gib(self.temp_bytes)}, "
            f"outputs {_gib(self.output_bytes)} ({_gib(self.alias_bytes)} aliased to donated arguments); "
            f"peak {_gib(self.per_device_peak_bytes)} of {_gib(self.device_memory_bytes)} usable{frac} "
            f"({_gib(self.device_total_bytes)} on the device) -> {'fits' if self.fits else 'DOES NOT FIT'} "
            f"(with a {FIT_MARGIN:.0%} margin)",
            f"[plan] compile {self.compile_s:.1f} s; step {_flop(self.step_flops)} per device "
            f"(matmuls as compiled, recomputation included{self._opaque()}); model "
            f"{_flop(self.model_flops)} per device (MaxText count) -> "
            f"{self.step_flops / max(self.model_flops, 1):.2f}× recompute factor",
            f"[plan] collectives (async/sync) in the program: {_collectives(self.collectives)}; "
            f"executed per step: {_collectives(self.collectives_per_step)}",
        ]
        if self.model:
            lines.insert(1, f"[plan] model: {self.model}")
        scores = [b for b in self.tt_buffers if b["score_like"]]
        t = self.batch_shape[-1]
        lines.append(f"[plan] float32 buffers of >= T×T elements (T={t}): {len(self.tt_buffers)} shape(s); "
                     + ("[.., T, T] score-like: " + ", ".join(f"{b['shape']} × {b['count']} ({_gib(b['bytes'])} each)"
                                                              for b in scores) if scores else
                        "none score-like [.., T, T]" + (f"; largest {', '.join(str(b['shape']) for b in self.tt_buffers[:3])}"
                                                        if self.tt_buffers else "")))
        if self.cuda_binaries is not None:
            lines.append(f"[plan] CUDA machine code: {self.cuda_binaries} cubin(s) in the executable")
        lines.append(f"[plan] training {self.trained}; optimizer state {_gib(self.opt_state_bytes)} per device")
        if self.host_peak_bytes:
            lines.append(f"[plan] host memory (pinned_host) per device: arguments {_gib(self.host_argument_bytes)} "
                         f"(the offloaded Adam moments, updated in place), temp {_gib(self.host_temp_bytes)}; peak "
                         f"{_gib(self.host_peak_bytes)} (not part of the device peak)")
        if self.estimate:
            lines.append(_estimate_line(self.estimate))
        return lines

    def _opaque(self) -> str:
        return f"; {self.opaque_calls} custom-call executions not counted" if self.opaque_calls else ""


def _collectives(counts: dict) -> str:
    """The four FSDP/Ulysses collectives always, others when present."""
    always = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
    return ", ".join(f"{k} {v['async']}/{v['sync']}" for k, v in counts.items()
                     if k in always or v["async"] or v["sync"])


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _flop(n: float) -> str:
    return f"{n / 1e12:.1f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def _estimate_line(e: dict) -> str:
    """The roofline estimate in one line: time, MFU, where the time goes, what it flags."""
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(e["shares"].items(), key=lambda kv: -kv[1]) if v >= 0.01)
    mfu = f", MFU {e['mfu']:.1%}" if e.get("mfu") else ""
    flags = f"; flags: {'; '.join(e['flags'])}" if e["flags"] else "; no float32 GEMM, no copy/transpose over 2 %"
    return (f"[plan] roofline estimate on {e['target']} peaks (an estimate, not a measurement): step "
            f"{e['step_s'] * 1e3:.1f} ms{mfu}; time by class: {shares}{flags}")


def fits(peak_bytes: float, usable_bytes: float) -> bool:
    return peak_bytes <= (1.0 - FIT_MARGIN) * usable_bytes
