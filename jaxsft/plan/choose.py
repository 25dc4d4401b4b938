"""Choosing what fits: the cheapest remat policy and the largest micro-batch whose plan fits the
device memory (`model.remat_policy=auto`, `data.micro_batch_size_per_gpu=auto`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from jaxsft import optim, step
from jaxsft.errors import UserError
from jaxsft.model import attention
from jaxsft.plan.compile import FULL, Mode, make_plan, mode_of
from jaxsft.plan.report import FIT_MARGIN, GiB, Plan, _gib
from jaxsft.plan.target import TARGET_CONFIGS, PlanError, Target
from jaxsft.settings import AUTO, ModelSettings, Settings

# model.remat_policy=auto: cheapest recomputation first.
AUTO_REMAT_ORDER = ("none", "minimal_with_context", "minimal", "full")


@dataclasses.dataclass
class Choice:
    remat_policy: str
    micro_batch_size: int
    plan: Plan
    tried: list[tuple[str, int, float]]  # (policy, micro-batch, peak bytes) in the order compiled
    reason: str  # one line


def choose(make: Callable[[str, int], Plan], *, policies: Sequence[str], micro_batches: Sequence[int]) -> Choice:
    """The cheapest (policy, micro-batch) whose plan fits: policies in order of increasing
    recomputation, and for each the largest micro-batch that fits (binary search, memory growing
    with the micro-batch). `make(policy, micro_batch)` compiles one candidate. If nothing fits,
    the last (smallest) candidate is returned with fits=False."""
    sizes = sorted(set(micro_batches), reverse=True)
    tried: list[tuple[str, int, float]] = []
    cache: dict[tuple[str, int], Plan] = {}

    def plan(policy, b):
        if (policy, b) not in cache:
            cache[(policy, b)] = p = make(policy, b)
            tried.append((policy, b, p.per_device_peak_bytes))
        return cache[(policy, b)]

    for policy in policies:
        if not plan(policy, sizes[-1]).fits:  # the smallest micro-batch does not fit: more recompute
            continue
        lo, hi = 0, len(sizes) - 1  # sizes[hi] fits; find the first (largest) index that fits
        while lo < hi:
            mid = (lo + hi) // 2
            if plan(policy, sizes[mid]).fits:
                hi = mid
            else:
                lo = mid + 1
        best = plan(policy, sizes[hi])
        return Choice(policy, sizes[hi], best, tried, _reason(best, policy, sizes[hi], tried, policies, sizes))
    last = plan(policies[-1], sizes[-1])
    return Choice(policies[-1], sizes[-1], last, tried, _reason(last, policies[-1], sizes[-1], tried, policies, sizes))


def _reason(p: Plan, policy: str, b: int, tried, policies, sizes) -> str:
    what = []
    if len(policies) > 1:
        what.append(f"model.remat_policy={policy}")
    if len(sizes) > 1:
        what.append(f"data.micro_batch_size_per_gpu={b}")
    rejected = [f"{pol}/{mb}: {_gib(peak)}" for pol, mb, peak in tried if (pol, mb) != (policy, b)]
    limit = (1 - FIT_MARGIN) * p.device_memory_bytes
    verdict = "fits" if p.fits else "is the smallest candidate and still DOES NOT FIT"
    return (f"[plan] auto: {', '.join(what)} ({policy}/{b} plans {_gib(p.per_device_peak_bytes)} per device and {verdict} "
            f"in {_gib(limit)} = {1 - FIT_MARGIN:.0%} of {_gib(p.device_memory_bytes)} usable on {p.target}"
            + (f"; rejected: {', '.join(rejected)}" if rejected else "") + ")")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def micro_batch_shape(rows_per_rank: int, micro_batch: int, dp: int, seq_len: int) -> list[int]:
    """[K, rows, T] for `rows_per_rank` rows per dp rank split into micro-batches of `micro_batch`."""
    return [math.ceil(rows_per_rank / micro_batch), dp * micro_batch, seq_len]


def attention_for(target: Target, implementation: str) -> str:
    """The attention backend the target would run: `auto` resolves as on the target's platform.
    For a GPU that is not here that is the first GPU kernel (on the real GPU, `auto` still runs
    its self-check at start-up and falls back to xla if it fails)."""
    if implementation != "auto":
        return attention.resolve(implementation)
    if target.kind in TARGET_CONFIGS:
        return attention.AUTO_ORDER["gpu"][0]
    return attention.resolve("auto")


def plan_run(target: Target, *, model: ModelSettings, model_config, micro_batch, samples_per_rank: int,
             rows_per_rank: int, dp: int, sp: int, seq_len: int, tx, lr_schedule, step_cfg, mode: Mode = FULL) -> Choice:
    """Plan the run's train step on `target`; `model.remat_policy` and `micro_batch` may be "auto"
    (then chosen by `choose`; micro-batch candidates are the divisors of samples_per_rank, as the
    loader requires). rows_per_rank: rows one dp rank processes per step (its samples when padding;
    the most packed rows any step needs when packing)."""
    model = dataclasses.replace(model, attn_implementation=attention_for(target, model.attn_implementation))
    policies = AUTO_REMAT_ORDER if model.remat_policy == AUTO else (model.remat_policy,)
    sizes = divisors_descending(samples_per_rank) if micro_batch == AUTO else [int(micro_batch)]

    def make(policy: str, b: int) -> Plan:
        settings = dataclasses.replace(model, remat_policy=policy)
        cfg = dataclasses.replace(step_cfg, accumulate_in_backward=accumulates_in_backward(settings))
        try:
            return make_plan(model_config, settings, target, dp=dp, sp=sp,
                             batch_shape=micro_batch_shape(rows_per_rank, b, dp, seq_len), tx=tx,
                             lr_schedule=lr_schedule, step_cfg=cfg, mode=mode)
        except ValueError as e:
            if isinstance(e, UserError):
                raise
            raise PlanError(str(e)) from None  # a setting the model refuses, naming its key

    return choose(make, policies=policies, micro_batches=sizes)


def plan_settings(settings: Settings, target: Target, model_config, mesh, *, samples_per_rank: int,
                  rows_per_rank: int, total_steps: int, added=None) -> Choice:
    """`plan_run` for a run's settings: its optimizer over `total_steps`, its step configuration on
    `mesh` (the target's), and what trains (`added`: jaxsft.hf.AddedTokens of model.added_tokens)."""
    tx, lr_schedule = optim.make_optimizer(settings.optim, total_steps, settings.model.trained_dtype)
    return plan_run(target, model=settings.model, model_config=model_config,
                    micro_batch=settings.data.micro_batch_size_per_gpu, samples_per_rank=samples_per_rank,
                    rows_per_rank=rows_per_rank, dp=mesh.shape["dp"], sp=mesh.shape["sp"],
                    seq_len=settings.data.max_length, tx=tx, lr_schedule=lr_schedule,
                    step_cfg=step.StepConfig.of(settings, mesh), mode=mode_of(settings, added))


def refuse_if_too_big(p: Plan) -> None:
    """PlanError (exit 2, one line) when the plan does not fit its device memory."""
    if not p.fits:
        raise PlanError(f"the plan for {p.target} does not fit: {p.per_device_peak_bytes / GiB:.2f} GiB per device "
                        f"planned, {(1 - FIT_MARGIN) * p.device_memory_bytes / GiB:.2f} GiB allowed "
                        f"({1 - FIT_MARGIN:.0%} of {p.device_memory_bytes / GiB:.2f} GiB usable)")


def accumulates_in_backward(settings) -> bool:
    return step.accumulates_in_backward(settings)
