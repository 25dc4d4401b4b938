"""Weighted mixing of the training files (`data.train_weights`, issue 14): each epoch holds the
sources in the weights' proportions exactly, a down-weighted source walks through all its rows
before repeating one, an up-weighted one repeats evenly, and the order is a pure function of the
step (resume across an epoch boundary, unit and through the command line)."""

import signal
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from cfg import settings
import runs
from e2e import run_train, start_train
from test_resume import resumed_at, train_rows, wait_for_pause

from jaxsft import bundled, config
from jaxsft.data import DataError, TokenizedDataset, TrainLoader
from jaxsft.data.mixture import quotas


def two_sources(a=30, b=50):
    samples, origins = [], []
    for f, n in enumerate((a, b)):
        for r in range(n):
            ids = (10_000 * f + 100 * r + np.arange(4 + r % 9)).astype(np.int32)
            samples.append((ids, (np.arange(len(ids)) > 1).astype(np.int8)))
            origins.append((f"src{f}.parquet", r))
    return TokenizedDataset.from_samples(samples, origins)


def loader(ds, weights=(3, 1), **kw):
    args = dict(train_batch_size=8, micro_batch_size_per_gpu=2, dp=2, max_length=32, seed=5, total_epochs=4,
                pad_token_id=0, verbose=False, weights=weights)
    return TrainLoader(ds, **{**args, **kw})


def epoch_samples(ld, epoch):
    return [int(i) for s in range(epoch * ld.steps_per_epoch, (epoch + 1) * ld.steps_per_epoch)
            for i in ld.step_samples(s)]


def test_weights_3_to_1_give_3_to_1_samples_in_every_epoch():
    ds = two_sources(30, 50)
    ld = loader(ds)
    assert ld.steps_per_epoch == 80 // 8  # the epoch of the concatenation: same steps, same schedule
    seen_b = []
    for epoch in range(4):
        idx = epoch_samples(ld, epoch)
        counts = Counter(ds.origins[i][0] for i in idx)
        assert counts == {"src0.parquet": 60, "src1.parquet": 20}, counts
        a = Counter(i for i in idx if i < 30)
        assert set(a.values()) == {2}  # 30 rows, 60 samples: each row twice
        seen_b.append({i for i in idx if i >= 30})
    # Down-sampled: source b goes through all its 50 rows before repeating one (epochs 0 and 1
    # hold 40 different rows, epoch 2 the other 10 and 10 of a reshuffle).
    assert len(seen_b[0] | seen_b[1]) == 40 and len(seen_b[0] | seen_b[1] | seen_b[2]) == 50
    assert ld.source_counts(0)[0][:3] == ("src0.parquet", 30, 60)
    assert "weights 3:1" in ld.describe() and "src1.parquet 20 samples of 50 rows (0.40x)" in ld.describe()


def test_quotas_add_up_and_follow_the_weights():
    assert quotas((10, 10, 10), (1.0, 1.0, 1.0), 32).tolist() in ([11, 11, 10], [11, 10, 11], [10, 11, 11])
    assert quotas((5, 7), (0.2, 0.8), 100).tolist() == [20, 80]
    assert quotas((5, 7), (1.0, 2.0), 10).sum() == 10


def test_no_weights_is_the_concatenation_as_before():
    ds = two_sources()
    plain = loader(ds, weights=None)
    assert np.array_equal(plain.step_samples(3), np.random.default_rng([5, 0]).permutation(80)[24:32])
    assert "concatenated" in plain.describe()


def test_the_mixture_resumes_exactly_across_an_epoch_boundary():
    ds = two_sources()
    a = loader(ds)
    for _ in range(a.steps_per_epoch - 1):
        next(a)
    state = a.get_state()  # before the last step of epoch 0
    assert state["weights"] == [3.0, 1.0] and state["source_rows"] == [30, 50]
    b = loader(ds)
    b.set_state(state)
    for _ in range(4):  # the last step of epoch 0 and the first three of epoch 1
        (ea, ba), (eb, bb) = next(a), next(b)
        assert ea == eb and all(np.array_equal(ba[k], bb[k]) for k in ba)
    with pytest.raises(DataError, match=r"does not fit this run: data.train_weights gives \[1.0, 1.0\] here, "
                                        r"\[3.0, 1.0\] when it was saved"):
        loader(ds, weights=(1, 1)).set_state(state)


def test_weights_must_fit_the_files():
    with pytest.raises(config.ConfigError, match=r"^data.train_weights has 1 weight\(s\) for 2 data.train_files"):
        settings({"data.train_files": ["/a.parquet", "/b.parquet"], "data.train_weights": [1.0]})
    with pytest.raises(config.ConfigError, match=r"^data.train_weights=\[1.0, 0.0\] must all be positive numbers"):
        settings({"data.train_files": ["/a.parquet", "/b.parquet"], "data.train_weights": [1, 0]})
    samples = [(np.arange(5, dtype=np.int32), np.ones(5, np.int8))] * 16
    ds = TokenizedDataset.from_samples(samples, [("a.parquet", i) for i in range(16)],
                                       {"files": ["a.parquet", "b.parquet"], "file_rows": [16, 0]})
    with pytest.raises(DataError, match=r"^data.train_weights gives b.parquet the weight 1, but none of its rows is in "
                                        r"the training set"):
        loader(ds, weights=(3, 1))


# ---- through the command line -------------------------------------------------------------------

# Two files of 16 and 8 chats weighted 3:1: 24 rows, 8 per step → 3 steps per epoch, 2 epochs;
# each epoch takes 18 samples of the first file and 6 of the second.
FAST = ("--config.data.max_length=256", "--config.data.train_batch_size=8", "--config.data.micro_batch_size_per_gpu=1",
        "--config.data.packing=none", "--config.data.val_files=None", "--config.trainer.total_epochs=2",
        "--config.trainer.test_freq=-1", "--config.trainer.save_freq=3", "--config.data.train_weights=[3,1]",
        "--config.trainer.checkpoint.save_contents=('model','optimizer','extra')")


@pytest.fixture(scope="module")
def mixture_files(tmp_path_factory):
    chats = pq.read_table(bundled.path("humaneval_chat", "train.parquet"))
    folder = tmp_path_factory.mktemp("mixture")
    paths = [folder / "a.parquet", folder / "b.parquet"]
    pq.write_table(chats.slice(0, 16), paths[0])
    pq.write_table(chats.slice(16, 8), paths[1])
    return f"--config.data.train_files=['{paths[0]}','{paths[1]}']"


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_exactly_from_the_data_cache(base_model, mixture_files, tmp_path):
    """Killed once step 3 (the last of epoch 0) is saved; the restart reads the tokenised data from
    the cache and the train step from the compilation cache, and logs what an unbroken run logs.
    The unbroken run is in this process (tests/runs.py); the killed run and its restart are
    processes with the run's own compilation cache (the default RUN/compile_cache, not the
    session's), which the first writes and the second reads. Every step logs each file's loss and
    loss tokens (train/loss/a, train/loss/b), which add up to the step's."""
    reference = tmp_path / "reference"
    out = runs.train(reference, base_model, *FAST, mixture_files).stdout
    assert "epoch 0 from the 2 files (weights 3:1): " in out and " 18 samples of 16 rows (1.12x)" in out
    assert sorted(train_rows(reference)) == [1, 2, 3, 4, 5, 6]
    both = 0
    for row in (m["data"] for m in metrics_of(reference, "train/loss")):
        n = row["train/loss_tokens/a"] + row["train/loss_tokens/b"]
        assert n == row["train/loss_tokens"]
        assert all((f"train/loss/{s}" in row) == (row[f"train/loss_tokens/{s}"] > 0) for s in "ab")
        both += all(row[f"train/loss_tokens/{s}"] > 0 for s in "ab")
        total = sum(row.get(f"train/loss/{s}", 0.0) * row[f"train/loss_tokens/{s}"] for s in "ab")
        # the same per-row sums (≥ 0) added by file or by micro-batch in float32, then divided: ≤ 8 eps
        assert abs(total / n - row["train/loss"]) <= 1e-6 * row["train/loss"], row
    assert both >= 2  # steps that hold both files

    run = tmp_path / "run"
    own_cache = "--config.trainer.compile_cache=true"  # names the key: e2e.train_args leaves the default
    proc = start_train(run, base_model, *FAST, mixture_files, own_cache, hook="pause:3")
    wait_for_pause(proc, 3)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    compiled = sorted(p.name for p in (run / "compile_cache").glob("jit_train_step-*"))
    assert len(compiled) == 1

    restart = run_train(run, base_model, *FAST, mixture_files, own_cache, JAX_LOG_COMPILES=1)
    assert resumed_at(restart).endswith(f"{run / 'global_step_3'} at step 3")
    assert "; read from the data cache " in restart.stdout
    assert "Persistent compilation cache hit for 'jit_train_step'" in restart.stderr
    assert "[jaxsft] reading the train step from the compilation cache" in restart.stdout
    assert sorted(p.name for p in (run / "compile_cache").glob("jit_train_step-*")) == compiled
    assert train_rows(run) == train_rows(reference)
    first, again = (next(m["data"]["perf/compile_and_first_step(s)"] for m in rows if m["step"] == s)
                    for rows, s in ((metrics_of(reference), 1), (metrics_of(run), 4)))
    print(f"\ncompile and first step: {first:.1f} s on a first launch, {again:.1f} s on the resume")


def metrics_of(run_dir, key="perf/compile_and_first_step(s)"):
    from e2e import metrics

    return [m for m in metrics(run_dir) if key in m["data"]]


@pytest.mark.parametrize("packing", ["none", "best_fit"])
def test_batches_carry_each_tokens_source(packing):
    """A mixed run's batches say, token by token, which file each sample came from (the step adds up
    the loss by source from it); an unmixed one has no source_ids."""
    ds = two_sources(30, 50)
    ld = loader(ds, packing=packing)
    for _ in range(3):
        _, batch = next(ld)
        seg, src, ids = batch["segment_ids"], batch["source_ids"], batch["input_ids"]
        assert src.shape == seg.shape and np.all(src[seg == 0] == 0)
        # two_sources' ids are 10_000·file + ...: every token of a sample names its file
        assert np.array_equal(src[seg > 0], ids[seg > 0] // 10_000)
    assert "source_ids" not in next(loader(ds, weights=None))[1]


def test_source_names_are_file_stems_made_unique():
    from jaxsft.data.mixture import source_names

    assert source_names(["data/math.parquet", "code.jsonl", "/x/chat/"]) == ["math", "code", "chat"]
    assert source_names(["a/train.parquet", "b/train.parquet", "c/dev.parquet"]) == ["train_1", "train_2", "dev"]
    assert source_names(["shards/gsm8k/*.parquet", "we ird(1).json"]) == ["gsm8k", "we_ird_1_"]
