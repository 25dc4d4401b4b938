"""Optimizer offload against no offload, step by step (`offload.streamed_update` vs
`optim.apply_update` inside the real train step, tests/modes.py `Run`), over the training modes,
meshes and dtypes; after every step every moment must be in pinned_host and the scalars on the
device. Not collected by pytest (minutes of compiles); run from the repository root:

    python tests/hostile/offload_parity.py all            # or case names; --json FILE for every figure

Prints one line per case: bit-identical, or the largest differences (absolute; ulps counted on the
value itself, so entries near zero show large counts). Results of 2026-12-01: docs/HOSTILE.md.
"""
import sys, os, json, time, traceback, dataclasses
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, modes, tiny_hf
import conftest  # noqa: F401  (8 CPU devices)
import jax, jax.numpy as jnp, numpy as np
from modes import Run, padded_batch, model_settings
from tiny_hf import make_tiny_hf_model
from jaxsft import offload, hf, bundled
from jaxsft.model.lora import LoRASettings

ROOT = os.environ.get("OFFLOAD_PARITY_MODELS", "/tmp/jaxsft-offload-parity")  # tiny models, made once
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model(name, **kw):
    p = os.path.join(ROOT, name, "tiny_qwen2")
    if not os.path.exists(os.path.join(p, "model.safetensors")):
        make_tiny_hf_model(os.path.join(ROOT, name), **kw)
    return p


def added_model(tied=False):
    name = "tok_tied" if tied else "tok"
    d = model(name, vocab_size=1600 if tied else 1541, tie_word_embeddings=tied)
    if not os.path.exists(os.path.join(d, "tokenizer_config.json")):
        hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(d)
    tok = hf.load_tokenizer(d)
    added, cfg = hf.extend_vocabulary(tuple(f"<item_{i}>" for i in range(40)), tok, hf.read_config(d),
                                      say=lambda *a: None)
    return d, added, cfg


def new_token_batch(seed, K, R, T, new_ids, vocab):
    b = padded_batch(seed, K, R, T, vocab)
    rng = np.random.default_rng(seed + 100)
    ids = b["input_ids"]
    pick = rng.choice(np.asarray(new_ids), size=ids.shape)
    b["input_ids"] = np.where((np.arange(T) % 2 == 0) & (b["segment_ids"] > 0), pick, ids).astype(np.int32)
    return b


def ordered(a):
    a = np.asarray(a)
    if a.dtype == np.float32:
        i = a.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    if a.dtype.itemsize == 2 and a.dtype.kind == "V" or str(a.dtype) == "bfloat16":
        i = a.view(np.int16).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFF), i)
    raise TypeError(a.dtype)


def diff(x, y):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape:
        return {"mismatch": f"{x.dtype}{x.shape} vs {y.dtype}{y.shape}"}
    if x.tobytes() == y.tobytes():
        return None
    if x.dtype.kind in "iub":
        return {"int_diff": int(np.max(np.abs(x.astype(np.int64) - y.astype(np.int64))))}
    nan = np.isnan(x.astype(np.float32)) != np.isnan(y.astype(np.float32))
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    ulp = np.abs(ordered(x) - ordered(y))
    return {"max_abs": float(np.nanmax(d)) if d.size else 0.0, "max_ulp": int(ulp.max()),
            "n_diff": int((x.tobytes() != y.tobytes()) and np.sum(ulp != 0)), "nan_mismatch": int(nan.sum())}


def kinds_ok(opt_state):
    bad = []
    for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        want = offload.HOST if x.ndim else "device"
        if x.sharding.memory_kind != want:
            bad.append(f"{jax.tree_util.keystr(path)} ndim={x.ndim} {x.sharding.memory_kind}")
    return bad


def metrics_eq(a, b):
    return all(a[k] == b[k] or (np.isnan(a[k]) and np.isnan(b[k])) for k in a) and a.keys() == b.keys()


def poison(run, path_pred, value=np.nan):
    """Put `value` into entry [0,...] of the first params leaf whose path matches; returns (leafpath, old)."""
    flat, tdef = jax.tree_util.tree_flatten_with_path(run.state["params"])
    leaves = [x for _, x in flat]
    for i, (p, x) in enumerate(flat):
        if path_pred(jax.tree_util.keystr(p)):
            old = x
            leaves[i] = jax.device_put(x.at[(0,) * x.ndim].set(value), x.sharding)
            run.state["params"] = jax.tree_util.tree_unflatten(tdef, leaves)
            return i, old
    raise KeyError


def restore(run, i, old):
    flat, tdef = jax.tree_util.tree_flatten(run.state["params"])
    flat[i] = jax.device_put(old, old.sharding)
    run.state["params"] = jax.tree_util.tree_unflatten(tdef, flat)


def compare(name, model_dir, batches, nan_step=None, nan_leaf=None, **kw):
    t0 = time.time()
    out = {"case": name, "steps": len(batches)}
    try:
        a = Run(model_dir, offload=False, **kw)
        b = Run(model_dir, offload=True, **kw)
        assert offload.is_offloaded(b.shardings["opt_state"])
        steps = []
        for s, batch in enumerate(batches):
            saved = None
            if s == nan_step:
                saved = [poison(r, nan_leaf) for r in (a, b)]
            ma, mb = a(batch), b(batch)
            if saved:
                for r, (i, old) in zip((a, b), saved):
                    restore(r, i, old)
            step = {"metrics_equal": metrics_eq(ma, mb), "loss": ma["loss"], "gn": ma["grad_norm"]}
            if not step["metrics_equal"]:
                step["ma"], step["mb"] = ma, mb
            bad = kinds_ok(b.state["opt_state"])
            if bad:
                step["bad_kinds"] = bad[:5]
            dev = kinds_ok(a.state["opt_state"])  # non-offloaded: should all be device
            steps.append(step)
            diffs = {}
            fa = jax.tree_util.tree_flatten_with_path(a.state)[0]
            fb = jax.tree_util.tree_flatten_with_path(b.state)[0]
            assert [p for p, _ in fa] == [p for p, _ in fb]
            for (p, x), (_, y) in zip(fa, fb):
                d = diff(jax.device_get(x), jax.device_get(y))
                if d:
                    diffs[jax.tree_util.keystr(p)] = d
            step["diffs"] = diffs
        out["per_step"] = steps
        allp = [d for st in steps for k, d in st["diffs"].items() if k.startswith("['params']")]
        allo = [d for st in steps for k, d in st["diffs"].items() if not k.startswith("['params']")]
        out["params_max_ulp"] = max([d.get("max_ulp", 99999) for d in allp], default=0)
        out["opt_max_ulp"] = max([d.get("max_ulp", d.get("int_diff", 99999)) for d in allo], default=0)
        out["metrics_all_equal"] = all(st["metrics_equal"] for st in steps)
        out["kinds_ok"] = not any("bad_kinds" in st for st in steps)
        out["n_opt_leaves"] = len(jax.tree.leaves(b.state["opt_state"]))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:3000]
        out["tb"] = traceback.format_exc()[-3000:]
    out["secs"] = round(time.time() - t0, 1)
    return out


def B(K=2, R=8, T=16, vocab=256, seeds=(1, 2, 3)):
    return [padded_batch(s, K, R, T, vocab) for s in seeds]


def cases():
    m2 = lambda: model("v256", vocab_size=256)
    m3 = lambda: model("v256_L3", vocab_size=256, num_hidden_layers=3)
    C = {}
    # 1. partial layers
    C["pat_layer0"] = lambda: compare("pat_layer0", m2(), B(), trainable_items=("model.layers.0.*",))
    C["pat_l1mlp_lmhead"] = lambda: compare("pat_l1mlp_lmhead", m2(), B(),
                                            trainable_items=("model.layers.1.mlp.*", "lm_head.weight"))
    C["pat_L3_l0l2_mixed"] = lambda: compare("pat_L3_l0l2_mixed", m3(), B(), trainable_items=(
        "model.layers.0.*", "model.layers.2.*", "model.layers.*.input_layernorm.weight", "model.norm.weight"))
    C["pat_L3_q_l1_embed"] = lambda: compare("pat_L3_q_l1_embed", m3(), B(), mesh_shape=(2, 4), trainable_items=(
        "model.layers.1.self_attn.q_proj.*", "model.layers.2.self_attn.k_proj.bias", "model.embed_tokens.weight"))
    # 2. new tokens
    def newtok(name, items, tied=False, **kw):
        d, added, cfg = added_model(tied)
        bs = [new_token_batch(s, 2, 8, 16, added.new_ids, cfg.vocab_size) for s in (1, 2, 3)]
        return compare(name, d, bs, trainable_items=items, added=added, **kw)
    C["newtok_only"] = lambda: newtok("newtok_only", ("new_token_embeddings",))
    C["newtok_all"] = lambda: newtok("newtok_all", ("all",))
    C["newtok_plus_layer1"] = lambda: newtok("newtok_plus_layer1", ("new_token_embeddings", "model.layers.1.*"))
    C["newtok_tied"] = lambda: newtok("newtok_tied", ("new_token_embeddings",), tied=True)
    # 3. LoRA
    L_all = LoRASettings(rank=4, alpha=8.0, targets=ALL_LINEAR)
    L_sub = LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    L_all_d = LoRASettings(rank=4, alpha=8.0, targets=ALL_LINEAR, dropout=0.25)
    L_sub_d = LoRASettings(rank=2, alpha=8.0, targets=("v_proj", "gate_proj"), dropout=0.1)
    C["lora_all"] = lambda: compare("lora_all", m2(), B(), lora=L_all)
    C["lora_sub"] = lambda: compare("lora_sub", m2(), B(K=1), lora=L_sub)
    C["lora_all_drop"] = lambda: compare("lora_all_drop", m2(), B(), lora=L_all_d, dropout_seed=7)
    C["lora_sub_drop_K1"] = lambda: compare("lora_sub_drop_K1", m2(), B(K=1), lora=L_sub_d, dropout_seed=3)
    # 4. meshes (full FT)
    for ms in [(8, 1), (4, 2), (2, 4), (1, 8)]:
        n = f"mesh_{ms[0]}x{ms[1]}"
        C[n] = (lambda ms=ms, n=n: compare(n, m2(), B(), mesh_shape=ms))
    C["mesh_1x8_lora_sub"] = lambda: compare("mesh_1x8_lora_sub", m2(), B(), mesh_shape=(1, 8), lora=L_sub)
    # 5. bf16 / no scan
    bf = dict(param_dtype="bfloat16", compute_dtype="bfloat16")
    C["bf16_full"] = lambda: compare("bf16_full", m2(), B(), ms=model_settings(None, **bf))
    C["bf16_full_K1"] = lambda: compare("bf16_full_K1", m2(), B(K=1), ms=model_settings(None, **bf))
    C["bf16_lora_drop"] = lambda: compare("bf16_lora_drop", m2(), B(), lora=L_all_d, dropout_seed=5,
                                          ms=model_settings(L_all_d, **bf))
    C["bf16_pat_layer1"] = lambda: compare("bf16_pat_layer1", m3(), B(), trainable_items=("model.layers.1.*",),
                                           ms=model_settings(None, **bf))
    C["noscan_full"] = lambda: compare("noscan_full", m2(), B(), ms=model_settings(None, scan_layers=False))
    C["noscan_bf16_8x1"] = lambda: compare("noscan_bf16_8x1", m2(), B(), mesh_shape=(8, 1),
                                           ms=model_settings(None, scan_layers=False, **bf))
    C["noscan_lora"] = lambda: compare("noscan_lora", m2(), B(), lora=L_sub,
                                       ms=model_settings(L_sub, scan_layers=False))
    # 6. non-finite step inside Run (NaN in a param at step index 1, restored after)
    C["nan_full"] = lambda: compare("nan_full", m2(), B(seeds=(1, 2, 3, 4)), nan_step=1,
                                    nan_leaf=lambda p: "lm_head" in p)
    C["nan_lora"] = lambda: compare("nan_lora", m2(), B(seeds=(1, 2, 3, 4)), nan_step=1, lora=L_sub,
                                    nan_leaf=lambda p: "embed" in p)
    C["nan_pat"] = lambda: compare("nan_pat", m2(), B(seeds=(1, 2, 3, 4)), nan_step=1,
                                   trainable_items=("model.layers.0.*",), nan_leaf=lambda p: "embed" in p)
    # 7. K
    C["K1_full"] = lambda: compare("K1_full", m2(), B(K=1))
    C["K3_full"] = lambda: compare("K3_full", m2(), B(K=3))
    # 8. other shapes, one device, clipping, bf16 first moments, whole embedding / lm_head leaves
    C["tied_full"] = lambda: compare("tied_full", model("v256_tied", vocab_size=256, tie_word_embeddings=True), B())
    C["L1_full"] = lambda: compare("L1_full", model("v256_L1", vocab_size=256, num_hidden_layers=1), B())
    C["mesh_1x1"] = lambda: compare("mesh_1x1", m2(), B(R=4), mesh_shape=(1, 1))
    C["clip0.05_full"] = lambda: with_optim({"optim.clip_grad": 0.05}, lambda: compare("clip0.05_full", m2(), B()))
    C["clip0.05_mu_bf16_full"] = lambda: with_optim({"optim.clip_grad": 0.05, "optim.mu_dtype": "bfloat16"},
                                                    lambda: compare("clip0.05_mu_bf16_full", m2(), B()))
    C["pat_lmhead_only"] = lambda: compare("pat_lmhead_only", m2(), B(), trainable_items=("lm_head.weight",))
    C["pat_embed_only"] = lambda: compare("pat_embed_only", m2(), B(), trainable_items=("model.embed_tokens.weight",))
    C["pat_alllayers_lmhead"] = lambda: compare("pat_alllayers_lmhead", m2(), B(),
                                                trainable_items=("model.layers.*", "lm_head.weight"))
    return C


def with_optim(over, fn):
    """fn() with Run's optimizer settings changed by `over` (tests/modes.py optim_cfg)."""
    import modes
    from cfg import settings

    original = modes.optim_cfg
    modes.optim_cfg = lambda: settings({"optim.lr": modes.LR, "optim.lr_warmup_steps_ratio": 0.0, **over}).optim
    try:
        return fn()
    finally:
        modes.optim_cfg = original


def summary(r) -> str:
    if "error" in r:
        return f"{r['case']}: ERROR {r['error'].splitlines()[0][:200]}"
    steps = r["per_step"]
    diffs = [d for st in steps for d in st["diffs"].items()]
    verdict = "bit-identical" if not diffs and r["metrics_all_equal"] else (
        "params max |d| {:.2g}, optimizer state max |d| {:.2g}, metrics {}".format(
            max([d.get("max_abs", 0) for k, d in diffs if k.startswith("['params']")], default=0),
            max([d.get("max_abs", d.get("int_diff", 0)) for k, d in diffs if not k.startswith("['params']")],
                default=0),
            "equal" if r["metrics_all_equal"] else "DIFFER"))
    return f"{r['case']}: {verdict}; memory kinds {'ok' if r['kinds_ok'] else 'WRONG'} ({r['secs']} s)"


if __name__ == "__main__":
    args = sys.argv[1:]
    json_path = None
    if "--json" in args:
        i = args.index("--json")
        json_path, args = args[i + 1], args[:i] + args[i + 2:]
    C = cases()
    names = list(C) if args == ["all"] else args
    results = []
    for n in names:
        r = C[n]()
        results.append(r)
        print(summary(r), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, default=str, indent=1) + "\n")
