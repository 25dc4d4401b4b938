"""Rematerialisation policies by name (`model.remat_policy`).

The decoder layer tags its intermediates with `checkpoint_name` (MaxText's names); a preset saves
the tagged tensors it lists and recomputes everything else in the backward pass. `full` saves
nothing but the layer input (least memory), `none` turns remat off (most memory). The plain
`jax.checkpoint_policies` are accepted under their own names.
"""

from __future__ import annotations

from typing import Callable

import jax

TAGS = ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj", "context",
        "mlpwi_0", "mlpwi_1", "mlpwo", "attention_out", "attention_lse")

_QKV = ("query_proj", "key_proj", "value_proj")
_PROJ = _QKV + ("out_proj", "mlpwi_0", "mlpwi_1", "mlpwo")
# The blockwise (`xla`) attention's forward residuals, its output and row log-sum-exp: saved, the
# backward does not re-run the attention forward (a quarter to a third of the attention's time).
# Other backends do not produce them, so for those these names save nothing.
_ATTN = ("attention_out", "attention_lse")

_cp = jax.checkpoint_policies
_PRESETS = {
    "full": _cp.nothing_saveable,
    "minimal": _cp.save_only_these_names(*_PROJ, *_ATTN),
    "minimal_with_context": _cp.save_only_these_names(*_PROJ, *_ATTN, "context"),
    "save_qkv_proj": _cp.save_only_these_names(*_QKV),
    "save_out_proj": _cp.save_only_these_names("out_proj"),
    "save_dot_except_mlp": _cp.save_only_these_names(*_QKV, "out_proj"),
    "save_dot_with_context_except_mlp": _cp.save_only_these_names(*_QKV, "out_proj", *_ATTN, "context"),
    "save_dot_except_mlpwi": _cp.save_only_these_names(*_QKV, "out_proj", "mlpwo"),
}
# jax.checkpoint_policies members that are policies themselves (not policy factories).
_JAX_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                 "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")

POLICIES: dict[str, Callable | None] = {
    **_PRESETS,
    **{name: getattr(_cp, name) for name in _JAX_POLICIES},
    "none": None,  # no jax.checkpoint at all
}


def check_policy(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"model.remat_policy={name!r} is not a known policy; choose one of: "
                         f"{', '.join(POLICIES)}")


def remat(fn: Callable, name: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` wrapped in `jax.checkpoint` with the named policy (unchanged for `none`).

    Inside `lax.scan` pass prevent_cse=False: scan already keeps the recomputation from being
    merged with the forward pass, and the extra barriers only slow it down.
    """
    check_policy(name)
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[name], prevent_cse=prevent_cse)
