"""Batching with verl's step semantics, packing, resumable iterator state, per-process rows and
validation batches, on synthetic samples (no tokenizer needed)."""

import json
from collections import Counter

import numpy as np
import pytest

from jaxsft.data import DataError, TokenizedDataset, TrainLoader, segment_lengths, val_batches
from jaxsft.data.packing import pack

T = 64


def synthetic(n=45, seed=0, max_len=T):
    """Samples with distinct token content: ids encode (sample, position); masks cover a suffix."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(4, max_len + 1))
        ids = (1000 * (i + 1) + np.arange(length)).astype(np.int32)
        mask = (np.arange(length) >= rng.integers(1, length)).astype(np.int8)
        samples.append((ids, mask))
    return TokenizedDataset.from_samples(samples, [("synthetic", i) for i in range(n)])


def loader(ds, **kw):
    args = dict(train_batch_size=8, micro_batch_size_per_gpu=2, dp=2, max_length=T, packing="none", seed=3,
                total_epochs=3, pad_token_id=7, verbose=False)
    args.update(kw)
    return TrainLoader(ds, **args)


def samples_in(batch, rows=None):
    """Per row group: the multiset of samples as (ids, mask, positions) tuples, read back via segments."""
    found = Counter()
    seg = batch["segment_ids"]
    for idx in np.ndindex(*seg.shape[:-1]):
        if rows is not None and idx[-1] not in rows:
            continue
        s = seg[idx]
        for v in np.unique(s[s > 0]):
            where = np.flatnonzero(s == v)
            assert np.all(np.diff(where) == 1), "a sample is split inside its row"
            assert batch["positions"][idx][where].tolist() == list(range(len(where)))
            found[tuple(tuple(batch[k][idx][where].tolist()) for k in ("input_ids", "loss_mask"))] += 1
        pad = s == 0
        assert np.all(batch["input_ids"][idx][pad] == 7) and not batch["loss_mask"][idx][pad].any()
    return found


def expected(ds, indices):
    return Counter((tuple(ds.tokens(i)[0].tolist()), tuple(ds.tokens(i)[1].tolist())) for i in indices)


def test_padded_layout_follows_verl():
    ds = synthetic()
    ld = loader(ds)
    assert ld.steps_per_epoch == 45 // 8 and ld.num_micro_batches == 2 and ld.local_rows == 4
    seen = []
    for step in range(ld.steps_per_epoch):
        epoch, batch = next(ld)
        assert epoch == 0 and {v.shape for v in batch.values()} == {(2, 4, T)}
        assert all(v.dtype == np.int32 for v in batch.values())
        idx = ld.step_samples(step)
        for r in range(2):
            for k in range(2):
                for j in range(2):
                    i = idx[r * 4 + k * 2 + j]  # rank r's contiguous share, micro-batch k = its k-th block
                    ids, mask = ds.tokens(i)
                    row = batch["input_ids"][k, r * 2 + j]
                    assert row[:len(ids)].tolist() == ids.tolist() and np.all(row[len(ids):] == 7)
                    assert batch["loss_mask"][k, r * 2 + j, :len(ids)].tolist() == mask.tolist()
                    assert np.all(batch["segment_ids"][k, r * 2 + j] == (np.arange(T) < len(ids)))
        seen += idx.tolist()
    assert len(set(seen)) == 40  # drop_last: 5 leftovers never seen this epoch
    assert next(ld)[0] == 1


def test_epochs_reshuffle_deterministically_from_the_seed():
    ds = synthetic()
    a, b, c = loader(ds), loader(ds), loader(ds, seed=4)
    assert np.array_equal(a.step_samples(0), b.step_samples(0))
    assert not np.array_equal(a.step_samples(0), a.step_samples(a.steps_per_epoch))
    assert not np.array_equal(a.step_samples(0), c.step_samples(0))


@pytest.mark.parametrize("method", ["first_fit", "best_fit"])
def test_packing_keeps_every_sample_of_the_step_and_isolates_them(method):
    ds = synthetic(n=70, seed=1, max_len=30)
    padded, packed = loader(ds, train_batch_size=16), loader(ds, train_batch_size=16, packing=method)
    assert packed.num_micro_batches < padded.num_micro_batches
    assert packed.efficiency["real_tokens"] > padded.efficiency["real_tokens"]
    for step in range(padded.total_steps):
        (e1, pb), (e2, kb) = next(padded), next(packed)
        assert e1 == e2 and {v.shape for v in kb.values()} == {(packed.num_micro_batches, 4, T)}
        idx = packed.step_samples(step)
        for r in range(2):  # each rank holds exactly its share, as unpacked
            rows = {r * 2, r * 2 + 1}
            assert samples_in(kb, rows) == samples_in(pb, rows) == expected(ds, idx[r * 8:(r + 1) * 8])
        for row in kb["segment_ids"].reshape(-1, T):  # segments are 1..n, in order, never shared
            used = row[row > 0]
            assert used.tolist() == sorted(used.tolist()) and set(used.tolist()) == set(range(1, (used.max() if len(used) else 0) + 1))
        # packed and padded carry the same targets: the step's loss-token count agrees
        assert kb["loss_mask"].sum() == pb["loss_mask"].sum()


def test_pack_methods():
    assert pack([5, 3, 4, 2, 6], 8, "first_fit") == [[0, 1], [2, 3], [4]]
    assert pack([5, 3, 4, 2, 6], 8, "best_fit") == [[0, 1], [2, 3], [4]]
    assert pack([6, 5, 2, 1], 8, "first_fit") == [[0, 2], [1, 3]]
    assert pack([6, 5, 3], 8, "best_fit") == [[0], [1, 2]]
    assert pack([5, 6, 2], 8, "best_fit") == [[0], [1, 2]]  # 2 goes where it fits tightest
    assert pack([5, 6, 2], 8, "first_fit") == [[0, 2], [1]]


@pytest.mark.parametrize("packing", ["none", "first_fit"])
def test_resume_gives_identical_batches_mid_epoch_and_at_the_epoch_boundary(packing):
    ds = synthetic()
    for consumed in (3, 5):  # mid-epoch; exactly the end of epoch 0 (5 steps per epoch)
        first = loader(ds, packing=packing)
        for _ in range(consumed):
            next(first)
        state = json.loads(json.dumps(first.get_state()))
        if consumed == 5:
            assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
        again = loader(ds, packing=packing)
        again.set_state(state)
        for _ in range(4):
            (ea, a), (eb, b) = next(first), next(again)
            assert ea == eb and all(np.array_equal(a[k], b[k]) for k in a)
        assert again.get_state()["next_step"] == consumed + 4


def test_state_from_another_data_set_is_refused():
    state = loader(synthetic()).get_state()
    with pytest.raises(DataError, match="the data-loader state was saved for"):
        loader(synthetic(n=50)).set_state(state)


@pytest.mark.parametrize("packing", ["none", "best_fit"])
def test_each_process_builds_only_its_rows(packing):
    ds = synthetic()
    whole = loader(ds, dp=4, train_batch_size=16, micro_batch_size_per_gpu=2, packing=packing)
    parts = [loader(ds, dp=4, train_batch_size=16, micro_batch_size_per_gpu=2, packing=packing,
                    process_index=p, process_count=2) for p in range(2)]
    assert all(p.local_rows == 4 and p.num_micro_batches == whole.num_micro_batches for p in parts)
    for _ in range(3):
        full = next(whole)[1]
        halves = [next(p)[1] for p in parts]
        for k in full:
            assert np.array_equal(full[k], np.concatenate([h[k] for h in halves], axis=1))


def test_batching_errors_name_the_keys():
    """What depends on the data (the divisibility of the batch settings is checked with the other
    settings, tests/test_config.py)."""
    ds = synthetic()
    with pytest.raises(DataError, match=r"^data.train_batch_size=48 is larger than the 45 training samples"):
        loader(ds, train_batch_size=48)
    with pytest.raises(DataError, match=r"^dp=2 is not divisible by the 4 processes"):
        loader(ds, process_count=4, process_index=1)
    with pytest.raises(DataError, match=r"^synthetic row \d+: \d+ tokens exceed max_length=32"):
        loader(ds, max_length=32)


def test_validation_batches_cover_every_sample_once():
    ds = synthetic(n=13)
    batches = list(val_batches(ds, rows=4, max_length=T, pad_token_id=7))
    assert len(batches) == 4 and all(b["input_ids"].shape == (4, T) for b in batches)
    assert sum((samples_in(b) for b in batches), Counter()) == expected(ds, range(13))
    assert np.all(batches[-1]["segment_ids"][1:] == 0)  # 13 = 3 full batches + 1 sample, then empty rows
    halves = [list(val_batches(ds, rows=4, max_length=T, pad_token_id=7, process_index=p, process_count=2)) for p in range(2)]
    for b, h0, h1 in zip(batches, *halves):
        assert all(np.array_equal(b[k], np.concatenate([h0[k], h1[k]])) for k in b)


def test_segment_lengths():
    seg = np.array([[[1, 1, 2, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [1, 2, 3, 0]]], np.int32)
    assert sorted(segment_lengths({"segment_ids": seg}).tolist()) == [1, 1, 1, 1, 2, 4]
