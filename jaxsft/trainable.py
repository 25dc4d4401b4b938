"""Which parameters train (`model.trainable`, LoRA): a partition of the parameter tree.

The optimizer is built over the trainable part only, so a frozen parameter has no Adam moments and
no weight decay, and the gradient is taken with respect to the trainable part only (JAX computes
no cotangent for a frozen weight, though it back-propagates through it to reach what trains).

- `all` without LoRA: every parameter. The partition is the identity, and the train state is
  exactly full fine-tuning's.
- LoRA (`model.lora_rank > 0`): the adapters (`lora_a`, `lora_b`) of the targeted layers; the base
  is frozen in `model.param_dtype`.
- `new_token_embeddings`: the rows of the added tokens in `embed_tokens` and, when untied, the
  same vocabulary entries of `lm_head`; every other entry stays bit-identical.
- patterns: Hugging Face parameter names matched by shell-style globs (`fnmatch`), e.g.
  `model.layers.*.mlp.*` or `lm_head.weight`; selecting some layers of a stacked `[L, ...]`
  parameter trains those layers only. The word `new_token_embeddings` may be one of the items.
  A tied model (`tie_word_embeddings`) has no `lm_head.weight`: its head is
  `model.embed_tokens.weight`, which trains as both (its gradient sums the two uses); a pattern
  matching only `lm_head` is refused with a sentence saying so, rather than silently training nothing.

The trainable part is a nested dict mirroring the parameter paths; an entry is a whole parameter,
or the slice of its positions along one axis (layers, or vocabulary rows) that train. `select`
takes it out of the parameters, `merge` writes it back (inside the jitted step: an in-place update
of the donated parameter).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxsft import parallel
from jaxsft.errors import UserError
from jaxsft.hf import names
from jaxsft.model.lora import ADAPTERS

ALL = "all"
NEW_TOKENS = "new_token_embeddings"
KEY = "model.trainable"


@dataclasses.dataclass(frozen=True)
class Part:
    """One parameter that trains: whole (axis None), or its `index` positions along `axis`."""
    path: tuple[str, ...]
    axis: int | None = None
    index: tuple[int, ...] = ()

    def take(self, x):
        return x if self.axis is None else jnp.take(x, np.asarray(self.index), axis=self.axis)

    def put(self, x, part):
        if self.axis is None:
            return part.astype(x.dtype)
        where = (slice(None),) * self.axis + (np.asarray(self.index),)
        return x.at[where].set(part.astype(x.dtype), indices_are_sorted=True, unique_indices=True)


def _path(keypath) -> tuple[str, ...]:
    return tuple(str(k.key) for k in keypath if isinstance(k, jax.tree_util.DictKey))


def _variables(params) -> dict[tuple[str, ...], object]:
    from flax import nnx

    return dict(nnx.to_flat_state(params))


class Partition:
    """The trainable part of a parameter tree (an nnx.State of parameters)."""

    def __init__(self, parts: tuple[Part, ...] = (), *, whole: bool = False, what: str = "every parameter"):
        self.parts, self.whole, self.what = parts, whole, what
        self._by_path = {p.path: p for p in parts}

    def select(self, params):
        """The trainable part: `params` itself when everything trains, else a nested dict."""
        if self.whole:
            return params
        out: dict = {}
        values = {path: var[...] for path, var in _variables(params).items()}
        for part in self.parts:
            node = out
            for k in part.path[:-1]:
                node = node.setdefault(k, {})
            node[part.path[-1]] = part.take(values[part.path])
        return out

    def merge(self, params, trainable):
        """`params` with the trainable part replaced by `trainable` (as `select` returns it)."""
        if self.whole:
            return trainable

        def replace(keypath, x):
            part = self._by_path.get(_path(keypath))
            if part is None:
                return x
            node = trainable
            for k in part.path:
                node = node[k]
            return part.put(x, node)

        return jax.tree_util.tree_map_with_path(replace, params)

    def shardings(self, params, mesh):
        """NamedShardings for `select(params)`: a slice is laid out by the parameter rule for its shape."""
        if self.whole:
            return parallel.param_shardings(params, mesh)
        variables = _variables(params)

        def sharding(part: Part):
            var = variables[part.path]
            shape = list(var.shape)
            if part.axis is not None:
                shape[part.axis] = len(part.index)
            return NamedSharding(mesh, parallel.param_spec(var.get_metadata()["axes"], shape, mesh))

        out: dict = {}
        for part in self.parts:
            node = out
            for k in part.path[:-1]:
                node = node.setdefault(k, {})
            node[part.path[-1]] = sharding(part)
        return out

    def count(self, params) -> tuple[int, int]:
        """(trainable values, all values)."""
        variables = _variables(params)
        total = sum(math.prod(v.shape) for v in variables.values())
        if self.whole:
            return total, total
        n = 0
        for part in self.parts:
            shape = list(variables[part.path].shape)
            if part.axis is not None:
                shape[part.axis] = len(part.index)
            n += math.prod(shape)
        return n, total

    def describe(self, params) -> str:
        n, total = self.count(params)
        return f"[jaxsft] training {self.what}: {n:,} of {total:,} values ({100 * n / max(total, 1):.3g} %)"


EVERYTHING = Partition(whole=True)


def partition(params, spec, config, new_token_ids=()) -> Partition:
    """The partition for the model settings `spec` (`jaxsft.settings.ModelSettings`: lora, trainable) of parameters
    `params` of a model with `config` (ModelConfig, after any vocabulary resize); `new_token_ids`:
    the ids `model.added_tokens` added. Raises UserError naming model.trainable for a pattern that
    matches nothing."""
    variables = _variables(params)
    if spec.lora is not None:
        parts = tuple(Part(path) for path in variables if path[-1] in ADAPTERS)
        on = ", ".join((*spec.lora.targets, *spec.lora.parameters))
        return Partition(parts, what=f"LoRA adapters (rank {spec.lora.rank}) on {on}")
    if spec.trainable == (ALL,):
        return EVERYTHING
    chosen: dict[tuple[str, ...], tuple[int | None, set]] = {}
    experts: dict[tuple, set] = {}  # (path, layer) → the experts of that layer a pattern chose
    for item in spec.trainable:
        if item == NEW_TOKENS:
            if not new_token_ids:
                raise UserError(f"{KEY} includes {NEW_TOKENS}, but model.added_tokens added no token to the "
                                f"vocabulary: nothing would train")
            chosen.setdefault(("embed_tokens", "embedding"), (0, set()))[1].update(new_token_ids)
            if not config.tie_word_embeddings:
                chosen.setdefault(("lm_head", "kernel"), (1, set()))[1].update(new_token_ids)
            continue
        matched = False
        for name, path, index, _ in names.entries(config):
            if fnmatch.fnmatchcase(name, item):
                matched = True
                chosen.setdefault(path, (0 if index else None, set()))[1].add(index[0] if index else None)
                if len(index) == 2:  # an expert's slice [layer, expert]
                    experts.setdefault((path, index[0]), set()).add(index[1])
        if not matched:
            tied = " (this model ties lm_head to model.embed_tokens.weight)" if "lm_head" in item else ""
            raise UserError(f"{KEY}: the pattern {item!r} matches no parameter{tied}; patterns are Hugging Face names "
                            f"such as model.layers.*.mlp.* or model.embed_tokens.weight, or use {ALL} / {NEW_TOKENS}")
    partial = [(path, layer) for (path, layer), chosen_experts in experts.items()
               if len(chosen_experts) != config.num_experts]
    if partial:
        raise UserError(f"{KEY}: the patterns choose some of layer {partial[0][1]}'s experts; jaxsft trains a "
                        f"layer's experts all together (e.g. model.layers.{partial[0][1]}.mlp.experts.*)")
    parts = []
    for path, (axis, index) in chosen.items():
        size = variables[path].shape[axis] if axis is not None else None
        if axis is None or None in index or len(index) == size:
            parts.append(Part(path))  # the whole parameter (a pattern named it whole, or every slice of it)
        else:
            parts.append(Part(path, axis, tuple(sorted(index))))
    return Partition(tuple(parts), what=", ".join(spec.trainable))


def for_model(model, spec, added=None, say=print) -> Partition:
    """`partition` for an nnx model, said in one line (what trains, how many values)."""
    from flax import nnx

    params = nnx.state(model, nnx.Param)
    part = partition(params, spec, model.config, added.new_ids if added is not None else ())
    say(part.describe(params))
    return part
