"""Tokenising a large training set: one process against worker processes, and a cached second
launch, on the bundled chats scaled up (issue 14).

    python -m bench.data_scale [--rows 200000] [--workers 2] [--dir /tmp/jaxsft-data-scale]

One run:
1. writes DIR/chats.parquet: the bundled training chats (jaxsft/assets/humaneval_chat) repeated
   to `--rows` rows, each first user message prefixed with its row number, so no two rows are equal;
2. `build_dataset` with `workers=1` (this process alone) and no cache: the single-process time;
3. `build_dataset` with `--workers` processes and a fresh cache in DIR/cache: the first launch
   (it also writes the cache entry);
4. a new process (`--phase cached`, as a second launch is) reading that entry: its time, and its
   peak RSS after reading every sample once (an epoch's worth of batches touches all of them);
   `--phase build` runs step 3 alone (the first launch: tokenise with the workers, write the cache);
5. prints one line per figure and `tokenise 1 process / N workers = X.XX`,
   `first launch / cached launch = Y.Y`; `--json` saves them.

The tokenizer's own thread pool is off (TOKENIZERS_PARALLELISM=false), so "1 process" is one core;
times are `build_dataset`'s own (stats["seconds"] / the cache clause), reading and checks included.
Peak RSS for the record: `/usr/bin/time -v python -m bench.data_scale --phase cached ...` after a
run has written the cache (or `--phase build` for the first build alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_data(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxsft import bundled

    chats = pq.read_table(bundled.path("humaneval_chat", "train.parquet")).column("messages").to_pylist()
    out = []
    for i in range(rows):
        chat = [dict(m) for m in chats[i % len(chats)]]
        first = next(k for k, m in enumerate(chat) if m["role"] == "user")
        chat[first]["content"] = f"Task {i}. " + chat[first]["content"]
        out.append([{k: v for k, v in m.items() if v is not None} for m in chat])
    pq.write_table(pa.table({"messages": out}), path)


def data_settings():
    from jaxsft import config

    return config.settings_from({"data.train_files": "/unused", "model.partial_pretrain": "/unused",
                                 "trainer.logger": ["console"], "data.multiturn.enable": True,
                                 "data.max_length": 1280, "data.truncation": "right"}).data


def tokenizer():
    from jaxsft import bundled
    from jaxsft.hf.tokenizer import load_tokenizer

    return load_tokenizer(bundled.path("tokenizer"))


def rss_mb() -> float:
    """Peak resident set size of this process so far (VmHWM; getrusage's ru_maxrss would keep the
    peak of the parent this process was forked from, across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def build(path: Path, workers: int, cache_dir: Path | None, tok=None) -> dict:
    from jaxsft.data import build_dataset

    tok, data = tok or tokenizer(), data_settings()
    t0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    ds = build_dataset(str(path), data, tok, verbose=True, workers=workers,
                       cache_dir=str(cache_dir) if cache_dir else None)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0 + _children_cpu() - children0  # the workers are joined by now
    cached = ds.stats.get("cache") or {}
    seconds = cached["seconds"] if cached.get("hit") else ds.stats["seconds"]
    return {"rows": len(ds), "tokens": int(ds.lengths.sum()), "seconds": seconds, "wall_s": wall, "cpu_s": cpu,
            "processes": ds.stats.get("processes"), "hit": bool(cached.get("hit")), "fingerprint": ds.fingerprint,
            "dataset": ds}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def phase_cached(path: Path, cache_dir: Path) -> dict:
    tok = tokenizer()
    import jaxsft.data.dataset  # noqa: F401  (the imports are not the data)

    base = rss_mb()
    r = build(path, 1, cache_dir, tok)
    ds = r.pop("dataset")
    after_load = rss_mb()
    touched = 0
    for i in range(len(ds)):  # every sample once, as the batches of an epoch read them
        ids, mask = ds.tokens(i)
        touched += int(ids[-1]) + int(mask[-1])
    r.update(rss_start_mb=base, rss_after_load_mb=after_load, rss_after_epoch_mb=rss_mb(),
             token_bytes_mb=(ds.input_ids.nbytes + ds.loss_mask.nbytes) / 2**20)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dir", default="/tmp/jaxsft-data-scale")
    p.add_argument("--phase", choices=("all", "build", "cached"), default="all")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    path, cache_dir = folder / f"chats-{a.rows}.parquet", folder / "cache"

    if a.phase == "cached":
        r = phase_cached(path, cache_dir)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if not path.exists():
        make_data(path, a.rows)
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    if a.phase == "build":  # the first launch alone: tokenise with the workers, write the cache
        tok = tokenizer()
        import jaxsft.data.dataset  # noqa: F401

        base = rss_mb()
        r = build(path, a.workers, cache_dir, tok)
        r.pop("dataset")
        print(f"first build, {a.workers} worker(s): {r['seconds']:.1f} s ({r['processes']} processes tokenised); peak "
              f"RSS {base:.0f} MB before the data, {rss_mb():.0f} MB after (this process); "
              f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB (largest worker)")
        return 0
    load = os.getloadavg()
    single = build(path, 1, None)
    single.pop("dataset")
    parallel = build(path, a.workers, cache_dir)
    parallel.pop("dataset")
    assert parallel["fingerprint"] == single["fingerprint"] and not parallel["hit"]
    child = [sys.executable, "-m", "bench.data_scale", "--phase", "cached", "--dir", str(folder.resolve()),
             "--rows", str(a.rows)]
    # from the repository root, so `-m bench.data_scale` is found wherever this process started
    proc = subprocess.run(child, capture_output=True, text=True, env=os.environ, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise SystemExit(proc.stdout + proc.stderr)
    cached = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert cached["hit"] and cached["fingerprint"] == single["fingerprint"]
    result = {"rows": single["rows"], "tokens": single["tokens"], "workers": a.workers, "cores": os.cpu_count(),
              "load_average_before": load, "load_average_after": os.getloadavg(),
              "one_process_s": single["seconds"], "workers_s": parallel["seconds"],
              "one_process_cpu_s": single["cpu_s"], "workers_cpu_s": parallel["cpu_s"],
              "worker_processes_used": parallel["processes"], "cached_launch_s": cached["seconds"],
              "cached_rss_start_mb": cached["rss_start_mb"], "cached_rss_after_load_mb": cached["rss_after_load_mb"],
              "cached_rss_after_epoch_mb": cached["rss_after_epoch_mb"], "token_bytes_mb": cached["token_bytes_mb"],
              "first_build_rss_mb": rss_mb()}
    print(f"{result['rows']} rows, {result['tokens']} tokens; load average {load[0]:.2f} before, "
          f"{result['load_average_after'][0]:.2f} after ({result['cores']} cores)")
    print(f"tokenise 1 process: {single['seconds']:.1f} s ({single['cpu_s']:.1f} CPU s); {a.workers} workers: "
          f"{parallel['seconds']:.1f} s ({parallel['cpu_s']:.1f} CPU s, all processes; first launch, cache written); "
          f"cached launch: {cached['seconds']:.2f} s")
    print(f"cached launch peak RSS: {cached['rss_start_mb']:.0f} MB before the data (imports, tokenizer), {cached['rss_after_load_mb']:.0f} MB "
          f"after reading the entry, {cached['rss_after_epoch_mb']:.0f} MB after reading every sample "
          f"(token arrays {cached['token_bytes_mb']:.0f} MB)")
    print(f"tokenise 1 process / {a.workers} workers = {single['seconds'] / parallel['seconds']:.2f}")
    print(f"first launch / cached launch = {parallel['seconds'] / cached['seconds']:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
