"""New tokens (`model.added_tokens`) and partial fine-tuning (`model.trainable`) against transformers
and torch.

Starting point: transformers' `tokenizer.add_tokens(...)` + `model.resize_token_embeddings(len(tokenizer),
mean_resizing=True)`. One step: torch with the same starting point, the trainable part as the only
leaf tensors the optimizer sees (requires_grad masks; for vocabulary rows, separate leaf rows
concatenated to the frozen table), AdamW and clip_grad_norm_ over them.
"""

from __future__ import annotations

import fnmatch
import types

import jax
import numpy as np
import pytest
import torch
import transformers
from cfg import settings
from modes import (LR, Run, adam_close, hf_forward, load_torch, logits_error, model_settings, padded_batch, rel,
                   torch_steps)
from safetensors.numpy import load_file
from tiny_hf import make_tiny_hf_model

from jaxsft import bundled, config, hf, parallel, trainable
from jaxsft.errors import UserError
from jaxsft.model import vocab

TOKENS = tuple(f"<item_{i}>" for i in range(40))
BASE_VOCAB = 1541  # the bundled tokenizer's len()


def with_tokenizer(model_dir):
    hf.open_tokenizer(bundled.path("tokenizer")).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Untied, the table exactly as long as the tokenizer: added tokens grow it."""
    return with_tokenizer(make_tiny_hf_model(tmp_path_factory.mktemp("tokens"), vocab_size=BASE_VOCAB))


def jaxsft_added(model_dir, tokens=TOKENS):
    tokenizer = hf.load_tokenizer(model_dir)
    added, cfg = hf.extend_vocabulary(tokens, tokenizer, hf.read_config(model_dir), say=lambda *a: None)
    return added, cfg, tokenizer


def transformers_resized(model_dir, tokens=TOKENS, seed=0):
    model = load_torch(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(list(tokens))
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return model, tokenizer


def test_starting_point_equals_transformers_mean_resizing(model_dir):
    """Old rows bit-identical; the 40 new rows of embed_tokens and of lm_head are μ + L·z with μ and
    L = chol(10⁻⁹·Σ) built as transformers builds them from the old rows (z jaxsft's numpy draw):
    ≤ 1e-9 absolute from that construction (entries ~5e-4; float32 summation order); and within
    8 σ (σⱼ = √(10⁻⁹·Σⱼⱼ) ≈ 6e-7) of transformers' own sample, which differs only in the draw."""
    added, cfg, tokenizer = jaxsft_added(model_dir)
    assert added.new_ids == tuple(range(BASE_VOCAB, BASE_VOCAB + 40)) and cfg.vocab_size == len(tokenizer) == 1581
    mesh = parallel.make_mesh(4, 2)
    with jax.set_mesh(mesh):
        model = hf.load_model(model_dir, mesh, model_settings(), seed=7, config=cfg)
    ours = {"model.embed_tokens.weight": np.asarray(model.embed_tokens.embedding[...]),
            "lm_head.weight": np.asarray(model.lm_head.kernel[...]).T}
    theirs_model, theirs_tok = transformers_resized(model_dir)
    assert theirs_tok.convert_tokens_to_ids(list(TOKENS)) == list(added.new_ids)
    theirs = {n: p.detach().numpy() for n, p in theirs_model.state_dict().items() if n in ours}
    base = load_file(model_dir / "model.safetensors")
    for k, (name, table) in enumerate(ours.items()):
        assert table.shape == theirs[name].shape == (1581, 64)
        assert np.array_equal(table[:BASE_VOCAB], base[name]) and np.array_equal(theirs[name][:BASE_VOCAB], base[name])
        old = torch.from_numpy(base[name]).float()
        mean = old.mean(0)
        cov = (old - mean).T @ (old - mean) / BASE_VOCAB
        scale_tril = torch.linalg.cholesky(vocab.EPSILON * cov).numpy()
        z = np.random.default_rng((7, k)).standard_normal((40, 64)).astype(np.float32)
        expect = mean.numpy() + z @ scale_tril.T
        # float32, other orders: μ (mean of 1541 rows; blocked/pairwise sums on both sides: ≤ 2·⌈log2 1541⌉ = 22
        # roundings of mean|x|), z·Lᵀ (γ_64 of |z|·|L|ᵀ), the sum (1 ulp of μ): entries ~5e-4, the noise σ ≈ 6e-7 ≫ this
        eps = np.finfo(np.float32).eps
        bound = 22 * eps * np.abs(base[name]).mean() + 64 * eps * (np.abs(z) @ np.abs(scale_tril).T).max() + eps * np.abs(mean.numpy()).max()
        assert np.abs(table[BASE_VOCAB:] - expect).max() <= bound, (name, bound)
        sigma = np.sqrt(vocab.EPSILON * np.diag(cov.numpy()))
        # not float tolerance: two independent normal draws differ by ≤ 8·√2·σ except with probability ~1e-8 per entry
        assert (np.abs(table[BASE_VOCAB:] - theirs[name][BASE_VOCAB:]) <= 8 * sigma).all(), name
        spread = (table[BASE_VOCAB:] - mean.numpy()) / sigma
        assert 0.7 < spread.std() < 1.3, spread.std()  # the noise is there, at transformers' scale


def test_tokens_that_fit_the_padding_rows_keep_them(tmp_path):
    """A table longer than the tokenizer (Qwen's padding rows): resized to len(tokenizer) as
    transformers does, the new tokens taking rows that keep their values (bit-identical to
    transformers' resize, which draws nothing here)."""
    d = with_tokenizer(make_tiny_hf_model(tmp_path, vocab_size=1600, tie_word_embeddings=True))
    added, cfg, _ = jaxsft_added(d, TOKENS[:3])
    assert added.new_ids == (1541, 1542, 1543) and cfg.vocab_size == 1544
    mesh = parallel.make_mesh(8, 1)
    with jax.set_mesh(mesh):
        model = hf.load_model(d, mesh, model_settings(), config=cfg)
    assert model.lm_head is None and model.config.vocab_size == 1544
    theirs, _ = transformers_resized(d, TOKENS[:3])
    assert np.array_equal(np.asarray(model.embed_tokens.embedding[...]),
                          theirs.model.embed_tokens.weight.detach().numpy())


def new_token_batch(seed, new_ids, vocab_size):
    """Padded rows whose tokens are every other one a new token (so the new rows get gradients)."""
    b = padded_batch(seed, 2, 4, 24, vocab_size)
    rng = np.random.default_rng(seed + 100)
    ids = b["input_ids"]
    pick = rng.choice(np.asarray(new_ids), size=ids.shape)
    b["input_ids"] = np.where((np.arange(ids.shape[-1]) % 2 == 0) & (b["segment_ids"] > 0), pick, ids).astype(np.int32)
    return b


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_new_token_embeddings_two_steps_match_torch(model_dir):
    """trainable=new_token_embeddings: loss and pre-clip norm ≤ 1e-6 relative; the new rows of
    embed_tokens and lm_head within tests/test_train_step.py's Adam tolerance after each step;
    every other entry of every parameter bit-identical to the resized start."""
    added, cfg, _ = jaxsft_added(model_dir)
    run = Run(model_dir, (4, 2), trainable_items=("new_token_embeddings",), added=added)
    start = run.hf_params()
    n_new = len(added.new_ids)
    assert run.partition.count(run.state["params"])[0] == 2 * n_new * 64
    # torch: the same start, the new rows as the only leaves that train
    model = load_torch(model_dir)
    model.resize_token_embeddings(cfg.vocab_size, mean_resizing=False)
    model.load_state_dict({n: torch.from_numpy(start[n]) for n in model.state_dict()})
    for p in model.parameters():
        p.requires_grad_(False)
    new = {"embed": torch.nn.Parameter(torch.from_numpy(start["model.embed_tokens.weight"][BASE_VOCAB:].copy())),
           "head": torch.nn.Parameter(torch.from_numpy(start["lm_head.weight"][BASE_VOCAB:].copy()))}
    old = {"model.embed_tokens.weight": model.model.embed_tokens.weight[:BASE_VOCAB],
           "lm_head.weight": model.lm_head.weight[:BASE_VOCAB]}

    def forward(flat):
        tables = {"model.embed_tokens.weight": torch.cat([old["model.embed_tokens.weight"], new["embed"]]),
                  "lm_head.weight": torch.cat([old["lm_head.weight"], new["head"]])}
        return torch.func.functional_call(model, tables, (), dict(
            input_ids=flat["input_ids"], attention_mask=flat["segment_ids"], position_ids=flat["positions"])).logits

    batches = [new_token_batch(s, added.new_ids, cfg.vocab_size) for s in (1, 2)]
    lrs = [float(run.schedule(0)), float(run.schedule(1))]
    ref = torch_steps(forward, new, batches, lrs)
    for i, batch in enumerate(batches):
        m = run(batch)
        t_loss, t_norm, _, t_params = ref[i]
        # end to end vs torch: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
        assert rel(m["loss"], t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (i, m, t_loss, t_norm)
        now = run.hf_params()
        for key, name in (("embed", "model.embed_tokens.weight"), ("head", "lm_head.weight")):
            print(i + 1, name, adam_close(now[name][BASE_VOCAB:], t_params[key], [r[2][key] for r in ref[:i + 1]], LR))
            assert np.array_equal(now[name][:BASE_VOCAB], start[name][:BASE_VOCAB])
        for name in now:
            if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                assert np.array_equal(now[name], start[name]), name
        assert not np.array_equal(now["model.embed_tokens.weight"], start["model.embed_tokens.weight"])


PATTERNS = ("model.layers.1.mlp.*", "model.layers.*.input_layernorm.weight", "model.norm.weight")


@pytest.mark.slow  # over ~5 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_parameter_patterns_match_torch_requires_grad(tmp_path):
    """Patterns (one layer's MLP, every layer's input norm, the final norm): two steps equal torch
    with requires_grad on exactly those HF parameters (loss, norm ≤ 1e-6 relative; trained
    tensors within the Adam tolerance); everything else bit-identical; moments only for what trains."""
    d = make_tiny_hf_model(tmp_path)
    run = Run(d, (4, 2), trainable_items=PATTERNS)
    model = load_torch(d)
    chosen = {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, q) for q in PATTERNS)}
    assert sorted(chosen) == sorted(["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                     "model.layers.1.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight",
                                     "model.layers.1.input_layernorm.weight", "model.norm.weight"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    start = run.hf_params()
    batches = [padded_batch(s, 2, 4, 24, 256) for s in (3, 4)]
    ref = torch_steps(hf_forward(model), chosen, batches, [float(run.schedule(0)), float(run.schedule(1))])
    for i, batch in enumerate(batches):
        m = run(batch)
        t_loss, t_norm, _, t_params = ref[i]
        # end to end vs torch: not derivable (op orders through the layers); 8 eps as tests/test_train_step.py
        assert rel(m["loss"], t_loss) <= 1e-6 and rel(m["grad_norm"], t_norm) <= 1e-6, (i, m, t_loss, t_norm)
        now = run.hf_params()
        for name in now:
            if name in chosen:
                adam_close(now[name], t_params[name], [r[2][name] for r in ref[:i + 1]], LR)
            else:
                assert np.array_equal(now[name], start[name]), name
    moments = jax.tree.leaves(run.state["opt_state"][1].inner_state[0].mu)
    assert sum(x.size for x in moments) == sum(p.numel() for p in chosen.values())


@pytest.mark.slow  # over ~3 s on 2 cores: CI's full run, not the ≤ 3-minute inner loop
def test_export_carries_the_new_vocabulary(model_dir, tmp_path):
    """The HF export of a new-token model: transformers loads it, its tokenizer encodes each added
    token to its id, config.json says the new vocab_size, and its logits equal jaxsft's (≤ 1e-5)."""
    added, cfg, _ = jaxsft_added(model_dir)
    run = Run(model_dir, (4, 2), trainable_items=("new_token_embeddings",), added=added)
    run(new_token_batch(5, added.new_ids, cfg.vocab_size))
    export = hf.Export(cfg, added=added)
    out = hf.write_hf_directory(export.tensors(run.state["params"]), tmp_path / "hf", base=export.base_files(model_dir),
                                dtype="float32")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(list(TOKENS)) == list(added.new_ids) and len(tok) == cfg.vocab_size
    assert tok.encode("a<item_3>b") == [tok.encode("a")[0], added.new_ids[3], tok.encode("b")[0]]
    model = transformers.Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    assert model.config.vocab_size == cfg.vocab_size
    batch = new_token_batch(6, added.new_ids, cfg.vocab_size)
    assert logits_error(run, model, batch) <= 1e-5  # jax vs torch forward: not derivable, as tests/test_model_parity.py
    with pytest.raises(UserError, match="ids"):  # another base model gives the tokens other ids
        other = with_tokenizer(make_tiny_hf_model(tmp_path, name="other", vocab_size=BASE_VOCAB))
        tok_dir = transformers.AutoTokenizer.from_pretrained(other)
        tok_dir.add_tokens(["<zzz>"])
        tok_dir.save_pretrained(other)
        export.base_files(other)


def test_mistakes_are_one_line_naming_the_key(model_dir, tmp_path):
    added, _, _ = jaxsft_added(model_dir)
    from flax import nnx

    params = nnx.state(hf.load_model(model_dir, parallel.make_mesh(1, 1), model_settings()),
                       nnx.Param)
    spec = lambda items: types.SimpleNamespace(lora=None, trainable=items)  # noqa: E731
    cfg = hf.read_config(model_dir)
    for items, match in ((("model.layers.7.*",), "matches no parameter"),
                         (("new_token_embeddings",), "added no token")):
        with pytest.raises(UserError, match=match) as e:
            trainable.partition(params, spec(items), cfg)
        assert "model.trainable" in str(e.value) and "\n" not in str(e.value)
    tied = make_tiny_hf_model(tmp_path, name="tied", tie_word_embeddings=True)
    tied_params = nnx.state(hf.load_model(tied, parallel.make_mesh(1, 1), model_settings()),
                            nnx.Param)
    with pytest.raises(UserError, match="ties lm_head"):
        trainable.partition(tied_params, spec(("lm_head.weight",)), hf.read_config(tied))
    (tmp_path / "dup.txt").write_text("<a>\n<b>\n\n<a>\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "latin1.txt").write_bytes(b"<caf\xe9>\n")
    for value, match in ((str(tmp_path / "missing.txt"), "no such file"), (str(tmp_path / "dup.txt"), "line 4 repeats"),
                         (str(tmp_path / "empty.txt"), "no token"), (str(tmp_path / "latin1.txt"), "UTF-8"),
                         (("<a>", "<a>"), "more than once")):
        with pytest.raises(UserError, match=match) as e:
            hf.read_added_tokens(value)
        assert "\n" not in str(e.value)
    (tmp_path / "ok.txt").write_text("<x>\r\n<y>\n")
    assert hf.read_added_tokens(str(tmp_path / "ok.txt")) == ("<x>", "<y>")
    assert added.describe().startswith("[jaxsft] model.added_tokens: 40 new tokens")
    for keys, key in (({"model.trainable": ["new_token_embeddings"]}, "model.added_tokens"),
                      ({"model.trainable": ["all", "model.norm.weight"]}, "model.trainable"),
                      ({"model.lora_rank": 4, "model.trainable": ["model.norm.weight"]}, "model.trainable"),
                      ({"model.lora_rank": 4, "model.added_tokens": ["<a>"]}, "model.added_tokens"),
                      ({"model.lora_rank": 4, "model.target_modules": ["lm_head"]}, "model.target_modules"),
                      ({"model.lora_rank": 4, "model.lora_dropout": 1.0}, "model.lora_dropout"),
                      ({"model.lora_rank": -1}, "model.lora_rank"),
                      ({"model.fsdp_config.cpu_offload": True}, "optimizer_offload")):
        with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
            settings(keys)
    s = settings({"model.added_tokens": ["<a>", "<b>"], "model.trainable": "new_token_embeddings"})
    assert s.model.added_tokens == ("<a>", "<b>") and s.model.trainable == ("new_token_embeddings",)
    assert settings({"model.added_tokens": "/some/file.txt"}).model.added_tokens == "/some/file.txt"
    s = settings({"model.lora_rank": 8, "model.lora_alpha": 32, "model.target_modules": "q_proj,v_proj"})
    assert (s.model.lora.scale, s.model.lora.targets, s.model.trained_dtype) == (4.0, ("q_proj", "v_proj"), "float32")
    assert any("model.lora_alpha=32 has no effect" in n for n in settings({"model.lora_alpha": 32}).notes)
