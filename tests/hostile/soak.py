"""The fault soak of issue 27: one tiny training run broken hundreds of times, at random moments,
and required to end exactly as an unbroken run of the same command.

    python tests/hostile/soak.py --faults 300 --seed S      # every family and mode, 1 and 2 processes
    python tests/hostile/soak.py --faults 40 --seed 7 --mode lora --procs 1 --keep /tmp/soak --json soak.json

The run (`Work.args`): a tiny model of one family (FAMILIES: the Qwen2 of jaxsft.tiny, and one
of tests/tiny_hf.py's per family, Qwen3-MoE and Qwen2-MoE included), a mixture of two parquet files (weights 3:1),
packing, 10 steps saved every 2 (async saves, `hf_model` exported, 2 kept), logging to
metrics.jsonl and tensorboard. For each campaign (a family, a mode — full, lora or offload — and
1 or 2 processes) an unbroken reference run is trained first; then a fresh directory is launched again
and again, each launch carrying faults drawn from `random.Random(seed)`, until a launch ends the
run; then the end is compared with the reference:

- every logged step's loss and grad norm (and lr, loss tokens, epoch) equal bit for bit, each
  step exactly once in metrics.jsonl and in tensorboard (its purge rule applied), none missing;
- the final step's parameters and optimizer state bit-identical, its huggingface/ (and
  lora_adapter/) files byte-identical;
- every global_step_N directory complete (jaxsft.checkpoint.is_complete), no temporary files;
- every refusal exactly one `jaxsft: error:` line with exit 2 and no traceback;
- no launch that stops progressing for --stall seconds (its output, metrics and files unchanged).

Faults (KINDS): `sigkill`, `sigterm`, `sigint` at a random moment of a chosen phase (PHASES:
`start` = imports, data, restore; `compile`; `step`; `save` = an Orbax temporary directory exists;
`export` = the Hugging Face export is being written; `retention` = the tracker moved and an old
step is not deleted yet) — the phase recorded is the one observed when the signal is sent;
`disk`: the launch runs with the run directory on a tmpfs with room for less than one more
checkpoint (tests/small_disk.py; needs root or user namespaces); `damage`: between launches, one
file of the newest complete step deleted or truncated (the next launch falls back to an older
step in one line, or refuses in one line when none is left: the soak then deletes the step and
counts a repair); `second`: the same command started again while a launch runs (refused in one
line); `proc_kill`: in a 2-process job, one process SIGKILLed (the other must stop on its own).

The seed fixes the schedule (kinds, phases, delays); where a signal lands still depends on the
machine's speed, so a failure prints the launch's plan and its output, and `--keep` keeps every
directory. Exit 0 when every campaign kept every promise. Not collected by pytest (tens of
minutes); tests/test_soak_smoke.py runs one fault (--plain). Results: docs/HOSTILE.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

import small_disk  # noqa: E402
from e2e import env_for, free_port  # noqa: E402

LAST_STEP, KEEP = 10, 2
EXACT = ("train/loss", "train/grad_norm", "train/lr", "train/loss_tokens", "train/epoch")
MODES = {"full": (), "lora": ("--config.model.lora_rank=4", "--config.model.lora_alpha=8", "--config.model.lora_dropout=0.1"),
         "offload": ("--config.model.fsdp_config.optimizer_offload=true",)}
# LoRA on a mixture-of-experts model: the attention and the experts (PEFT's target_parameters, which
# has no dropout)
MOE_LORA = ("--config.model.lora_rank=4", "--config.model.lora_alpha=8",
            "--config.model.target_modules=['q_proj','k_proj','v_proj','o_proj']",
            "--config.model.target_parameters=['mlp.experts.gate_up_proj','mlp.experts.down_proj']")
FAMILIES = ("qwen2", "qwen3_moe", "qwen3", "qwen2_moe", "llama", "mistral", "gemma")  # order: see main()
KINDS = ("sigkill", "sigterm", "sigint", "disk", "damage", "second", "proc_kill")
PHASES = ("start", "compile", "step", "save", "export", "retention")
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


class Failed(Exception):
    """A promise not kept; the message says which and where."""


# ---- the run ----------------------------------------------------------------------------------------

class Work:
    def __init__(self, root: Path, stall: float, compile_cache: str | None = None, base: str | None = None,
                 plain: bool = False, reference: str | None = None):
        self.root, self.stall, self.plain, self.given_base = root, stall, plain, base
        self.given_reference = reference
        self.compile_cache = compile_cache or root / "compile_cache"
        self.base, self.files = Path(base or root / "base"), (root / "a.parquet", root / "b.parquet")
        self.bases = {"qwen2": self.base}
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.launches = 0
        self.startup = 20.0  # seconds to the first step line; measured on the first reference

    def prepare(self) -> None:
        import pyarrow.parquet as pq

        from jaxsft import bundled, tiny

        if not self.given_base:
            tiny.ensure_tiny_model(self.base, bundled.path("tokenizer"))
        rows = pq.read_table(bundled.path("humaneval_chat", "train.parquet"))
        pq.write_table(rows.slice(0, 24), self.files[0])
        pq.write_table(rows.slice(24, 16), self.files[1])

    def base_of(self, family: str) -> Path:
        """The tiny model of `family` (made on first use): tests/tiny_hf.py's, with the bundled
        tokenizer's vocabulary and room for the run's rows."""
        if family not in self.bases:
            from tiny_hf import FAMILIES as SHAPES
            from tiny_hf import MOE, MOE2, make_tiny_hf_model

            from jaxsft import bundled, hf

            shape = {"qwen3_moe": MOE, "qwen2_moe": MOE2}.get(family) or SHAPES[family]
            if "sliding_window" in shape:  # jaxsft refuses a window shorter than data.max_length
                shape = dict(shape, sliding_window=512)
            tok = hf.open_tokenizer(bundled.path("tokenizer"))
            path = make_tiny_hf_model(self.root / "bases", seed=len(self.bases), name=family,
                                      **dict(shape, vocab_size=len(tok), max_position_embeddings=512))
            tok.save_pretrained(path)
            self.bases[family] = path
        return self.bases[family]

    def args(self, run: Path, job: str) -> list[str]:
        """The command of `job` ("family/mode")."""
        a, b = self.files
        family, mode = job.split("/")
        extra = MOE_LORA if mode == "lora" and family.endswith("_moe") else MODES[mode]
        common = [sys.executable, "-m", "jaxsft.train", f"--config={ROOT / 'configs' / 'smoke.py'}",
                  f"--config.trainer.default_local_dir={run}", f"--config.model.partial_pretrain={self.base_of(family)}",
                  f"--config.trainer.compile_cache_dir={self.compile_cache}",  # shared: relaunches compile nothing
                  f"--config.data.cache_dir={self.root / 'data_cache'}", f"--config.trainer.max_ckpt_to_keep={KEEP}",
                  "--config.trainer.logger=('console','file','tensorboard')", *extra]
        if self.plain:  # the program of the test suite's reference run (tests/runs.py), already in its cache
            from runs import REFERENCE

            return [*common, *REFERENCE]
        return [*common, f"--config.data.train_files=['{a}','{b}']", "--config.data.train_weights=[3,1]",
                "--config.data.max_length=256", "--config.data.train_batch_size=8",
                "--config.data.micro_batch_size_per_gpu=1", "--config.data.packing=first_fit",
                "--config.data.val_files=None", "--config.trainer.total_epochs=2", "--config.trainer.test_freq=-1",
                "--config.trainer.save_freq=2"]

    def env(self, procs: int, pid: int = 0, port: int = 0) -> dict:
        if procs == 1:
            return env_for(8, PYTHONFAULTHANDLER=1)  # a hang's report carries every thread's stack
        return env_for(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid,
                       JAXSFT_HEARTBEAT_TIMEOUT_S=10, JAXSFT_DISTRIBUTED_TIMEOUT_S=60, PYTHONFAULTHANDLER=1)


class Launch:
    """One launch of the run (1 or 2 processes), its output in files, watched for progress."""

    def __init__(self, w: Work, run: Path, job: str, procs: int, wrap=None):
        w.launches += 1
        self.w, self.run, self.t0 = w, run, time.monotonic()
        self.name = f"{run.name}.{w.launches}"
        self.outs = [w.logs / f"{self.name}.p{i}.out" for i in range(procs)]
        self.errs = [w.logs / f"{self.name}.p{i}.err" for i in range(procs)]
        port = free_port() if procs > 1 else 0
        self.procs = []
        for i in range(procs):
            cmd = w.args(run, job)
            if wrap:
                cmd = wrap(cmd, self.outs[i], self.errs[i])
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=w.env(procs, i, port), start_new_session=True))
            else:
                with open(self.outs[i], "w") as o, open(self.errs[i], "w") as e:
                    self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=w.env(procs, i, port), stdout=o, stderr=e,
                                                       start_new_session=True))
        self.tracker0 = tracker(run)
        self.old_tmp = temporaries(run)  # an earlier launch's leftovers: not this launch's save
        self.old_steps = {(p.name, inode(p)) for p in step_dirs(run).values()}
        self._seen, self._moved = None, time.monotonic()

    def new_temporaries(self, pattern: str) -> bool:
        return bool(temporaries(self.run, pattern) - self.old_tmp)

    def exporting(self) -> bool:
        """An export of this launch is being written (its config.json comes last; afterwards the
        directory waits, finished, for the Orbax save to commit)."""
        return any(not (self.run / name / "config.json").exists() and not (self.run / name / "adapter_config.json").exists()
                   for name, _ in temporaries(self.run, EXPORT_TMP) - self.old_tmp)

    def committing(self) -> bool:
        """A step directory newer than the tracker: Orbax committed, the manifest and tracker not yet."""
        t = tracker(self.run)
        if not (t and t.isdigit()):
            return False
        return any(s > int(t) and (p.name, inode(p)) not in self.old_steps for s, p in step_dirs(self.run).items())

    def out(self, i=0) -> str:
        return self.outs[i].read_text(errors="replace") if self.outs[i].exists() else ""

    def err(self, i=0) -> str:
        return self.errs[i].read_text(errors="replace") if self.errs[i].exists() else ""

    def steps_logged(self) -> int:
        return self.out().count(" - train/loss:")

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def check_progress(self) -> None:
        """Fail (and kill) when nothing has changed for `stall` seconds: output, metrics, files."""
        seen = [f.stat().st_size if f.exists() else -1 for f in (*self.outs, *self.errs)]
        seen += sorted(os.listdir(self.run)) if self.run.is_dir() else []
        if (self.run / "metrics.jsonl").exists():
            seen.append((self.run / "metrics.jsonl").stat().st_size)
        if seen != self._seen:
            self._seen, self._moved = seen, time.monotonic()
        elif time.monotonic() - self._moved > self.w.stall:
            stacks = self.dump_stacks()
            self.kill()
            raise Failed(f"{self.name}: no progress for {self.w.stall:.0f} s (a hang)\n{self.out()[-1500:]}\n{stacks}")

    def dump_stacks(self) -> str:
        """Every thread's Python stack of each process (SIGABRT: PYTHONFAULTHANDLER=1 prints them to
        its stderr), for the report of a hang; also kept in the launch's .err files."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        deadline = time.monotonic() + 10
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        return "\n".join(f"--- process {i} stacks ---\n" + "\n".join(
            x for x in self.err(i).splitlines() if x.startswith(("Thread", "Current thread", "  File", "Fatal")))[-6000:]
            for i in range(len(self.procs)))

    def wait(self, until=None) -> None:
        """Poll until every process ended, or `until()` is true."""
        while self.running():
            self.check_progress()
            if until is not None and until():
                return
            time.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL each launch's whole process group (a full-disk launch's trainer is a shell's child)."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def codes(self) -> list[int]:
        return [p.returncode for p in self.procs]


# ---- files of the run directory ----------------------------------------------------------------------

def tracker(run: Path) -> str | None:
    try:
        return (run / "latest_checkpointed_iteration.txt").read_text().strip()
    except OSError:
        return None


SAVE_TMP, EXPORT_TMP = "global_step_*.orbax-checkpoint-tmp*", ".global_step_*.tmp"


def inode(p: Path) -> int | None:
    try:
        return p.stat().st_ino
    except OSError:  # deleted meanwhile
        return None


def temporaries(run: Path, pattern: str | None = None) -> set[tuple[str, int]]:
    """(name, inode) of the save's (Orbax) and the export's temporary directories."""
    pats = (pattern,) if pattern else (SAVE_TMP, EXPORT_TMP)
    return {(p.name, inode(p)) for pat in pats for p in run.glob(pat)}


def step_dirs(run: Path) -> dict[int, Path]:
    from jaxsft import checkpoint

    return checkpoint.step_dirs(run) if run.is_dir() else {}


def phase_now(launch: Launch) -> str:
    """The phase the run is in, from its files and output (process 0's)."""
    run = launch.run
    if launch.exporting():
        return "export"
    if launch.new_temporaries(SAVE_TMP) or launch.committing():
        return "save"
    if tracker(run) != launch.tracker0 and len(step_dirs(run)) > KEEP:
        return "retention"
    out = launch.out()
    if " - train/loss:" in out or "perf/compile_and_first_step" in out:
        return "step"
    return "compile" if "the train step" in out else "start"


def trigger(launch: Launch, phase: str, delay: float, nth: int):
    """A function that is true once the moment of `phase` (plus `delay` s) has come."""
    state = {}

    def due() -> bool:
        now = time.monotonic()
        if "at" not in state:
            run = launch.run
            if phase == "start":
                hit = True
            elif phase == "compile":
                hit = "the train step" in launch.out()
            elif phase == "step":
                hit = launch.steps_logged() >= nth
            elif phase == "save":
                hit = launch.new_temporaries(SAVE_TMP)
            elif phase == "export":
                hit = launch.exporting()
            else:  # retention: the tracker moved while more than KEEP steps are on disk
                hit = tracker(run) not in (None, launch.tracker0) and len(step_dirs(run)) > KEEP
            if not hit:
                return False
            state["at"] = now
        return now - state["at"] >= delay

    return due


def leftovers(run: Path) -> list[str]:
    """Temporary files and incomplete step directories (a finished run leaves none)."""
    from jaxsft import checkpoint

    bad = [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name or "orbax-checkpoint-tmp" in p.name]
    bad += [f"{p.name} (incomplete: {checkpoint.step_problems(p)[0]})" for p in step_dirs(run).values()
            if not checkpoint.is_complete(p)]
    return bad


def one_line(text_err: str, code: int, *expected: str) -> str:
    """Exit 2, one `jaxsft: error:` line saying each of `expected`, no traceback."""
    lines = [x for x in text_err.splitlines() if x.startswith("jaxsft: error:")]
    if code != 2 or len(lines) != 1 or "Traceback" in text_err or any(e not in lines[0] for e in expected):
        raise Failed(f"not a one-line refusal (exit {code}, {len(lines)} error lines, expected {expected}):\n"
                     f"{text_err[-2000:]}")
    return lines[0]


# ---- what the run logged -----------------------------------------------------------------------------

def metric_rows(run: Path) -> list[tuple]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "train/loss" in m["data"]:
            rows.append((m["step"], *(m["data"][k] for k in EXACT)))
    return rows


def tensorboard_scalars(run: Path) -> dict[tuple[str, int], list[float]]:
    """(tag, step) → the values TensorBoard shows: event files in name order, a session START at
    step s hiding every earlier event at step >= s (tensorboardX's purge_step)."""
    from tensorboardX.proto import event_pb2

    kept: list[tuple[str, int, float]] = []
    for path in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            if at + 12 + length + 4 > len(data):
                break  # the last record cut by a kill
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                kept = [k for k in kept if k[1] < event.step]
            for v in event.summary.value:
                kept.append((v.tag, event.step, v.simple_value))
    out = collections.defaultdict(list)
    for tag, step, value in kept:
        out[tag, step].append(value)
    return out


def final_state(step_dir: Path) -> dict:
    import jax
    from jaxsft.checkpoint.restore import restore_entry

    return {k: jax.tree.leaves(restore_entry(step_dir, k)) for k in ("params", "opt_state")}


def same_files(a: Path, b: Path) -> list[str]:
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    other = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    if names != other:
        return [f"files differ: {sorted(set(names) ^ set(other))}"]
    return [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]


def verify(run: Path, ref: Path) -> None:
    """The end of a broken run against the unbroken reference: the promises of the docstring."""
    import numpy as np

    got, want = metric_rows(run), metric_rows(ref)
    steps = [r[0] for r in got]
    if steps != list(range(1, LAST_STEP + 1)):
        raise Failed(f"metrics.jsonl logs steps {steps}, not 1..{LAST_STEP} once each")
    if got != want:
        raise Failed(f"metrics differ from the reference at steps {[g[0] for g, r in zip(got, want) if g != r]}")
    tb = tensorboard_scalars(run)
    if (ref / "tensorboard").is_dir():
        tb_ref = tensorboard_scalars(ref)
    else:  # a reference run without tensorboard (--reference): its logged values, as float32 like tensorboard's
        tb_ref = {(k, r[0]): [float(np.float32(r[1 + EXACT.index(k)]))] for r in want for k in EXACT}
    for tag in ("train/loss", "train/grad_norm"):
        for s in range(1, LAST_STEP + 1):
            if len(tb.get((tag, s), [])) != 1 or tb[tag, s] != tb_ref[tag, s]:
                raise Failed(f"tensorboard {tag} at step {s}: {tb.get((tag, s))} (reference {tb_ref.get((tag, s))})")
    last, last_ref = run / f"global_step_{LAST_STEP}", ref / f"global_step_{LAST_STEP}"
    a, b = final_state(last), final_state(last_ref)
    for k in a:
        if len(a[k]) != len(b[k]) or not all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a[k], b[k])):
            raise Failed(f"the final {k} differs from the reference's")
    for export in ("huggingface", "lora_adapter"):
        if (last_ref / export).exists() and same_files(last / export, last_ref / export):
            raise Failed(f"{export}/ differs from the reference's: {same_files(last / export, last_ref / export)}")
    bad = leftovers(run)
    if bad:
        raise Failed(f"left behind: {bad}")
    kept = sorted(step_dirs(run))  # a preempted launch saves an odd step: the newest KEEP, whichever
    if len(kept) != KEEP or kept[-1] != LAST_STEP:
        raise Failed(f"retention kept {kept}, not {KEEP} steps ending at {LAST_STEP}")


# ---- faults ----------------------------------------------------------------------------------------

class Soak:
    def __init__(self, w: Work, seed: int):
        self.w, self.rng, self.seed = w, random.Random(seed), seed
        self.counts = collections.Counter()  # (kind, phase) → faults injected
        self.notes = collections.Counter()  # other events: repairs, misses, outcomes
        self.refs: dict[tuple[str, int], Path] = {}
        self.passed: list[dict] = []  # the campaigns whose end equalled the reference
        self.disk_ok = small_disk.unavailable(w.root) is None

    def reference(self, job: str, procs: int) -> Path:
        if (job, procs) == ("qwen2/full", 1) and self.w.given_reference:
            self.refs[job, procs] = Path(self.w.given_reference)
        if (job, procs) not in self.refs:
            run = self.w.root / f"reference-{job.replace('/', '-')}-{procs}p"
            shutil.rmtree(run, ignore_errors=True)
            launch = Launch(self.w, run, job, procs)
            launch.wait()
            if launch.codes() != [0] * procs:
                raise Failed(f"the reference {run.name} exited {launch.codes()}:\n{launch.err()[-3000:]}")
            first = next((x for x in launch.out().splitlines() if "perf/compile_and_first_step" in x), "")
            if procs == 1 and first:
                self.w.startup = min(self.w.startup, float(first.rsplit(":", 1)[1]) + 8.0)
            self.refs[job, procs] = run
        return self.refs[job, procs]

    def plan(self, procs: int) -> dict:
        r = self.rng
        if procs == 2:
            kind = "proc_kill"
        else:
            # Weighted so that 300 faults meet issue 27's floors with room: >= 30 full disks, >= 20 damaged steps.
            kind = r.choices(["sigkill", "sigterm", "sigint", "disk", "damage", "second"], weights=[32, 10, 10, 22, 15, 11])[0]
            kind = "sigkill" if kind == "disk" and not self.disk_ok else kind  # the same draws either way
        phase = r.choices(PHASES, weights=[8, 8, 25, 25, 20, 14])[0]
        delay = {"save": 0.25, "export": 0.08, "retention": 0.0}.get(phase, 1.5)
        return {"kind": kind, "phase": phase, "delay": round(r.uniform(0, delay), 3),
                "nth": r.randint(1, 4), "victim": r.randint(0, 1), "signal": r.choice(["sigkill", "sigterm", "sigint"]),
                "disk_room": round(r.uniform(0.1, 0.95), 3), "damage": r.choice(["delete", "truncate"]),
                "file_pick": r.random(), "cut": r.random(), "second_at": round(r.uniform(0, 3), 3),
                "second_phase": r.choice(["start", "compile", "step", "save", "export"])}

    def campaign(self, job: str, procs: int, faults: int) -> None:
        ref = self.reference(job, procs)
        run = self.w.root / f"campaign{sum(self.notes[k] for k in self.notes if k.startswith('campaign')) + 1}-{job.replace('/', '-')}-{procs}p"
        self.notes[f"campaign {job} {procs}p"] += 1
        shutil.rmtree(run, ignore_errors=True)
        done, injected, launches, t0, before = False, 0, self.w.launches, time.time(), self.counts.copy()
        while not done:
            plan = self.plan(procs) if injected < faults else {"kind": "clean"}
            print(f"  {run.name} launch {self.w.launches + 1}: {plan}", flush=True)
            try:
                done, n = self.launch(run, job, procs, plan)
            except Failed as e:
                raise Failed(f"campaign {run.name} ({job}, {procs} process(es)), seed {self.seed}, plan {plan}: {e}") from None
            injected += n
        launches = self.w.launches - launches
        try:
            verify(run, ref)
        except Failed as e:
            raise Failed(f"campaign {run.name} ({job}, {procs} process(es)), seed {self.seed}: {e}") from None
        print(f"campaign {run.name}: {injected} faults, the end equals the reference", flush=True)
        self.passed.append({"campaign": run.name, "faults": injected, "launches": launches, "seconds": round(time.time() - t0),
                            "by_kind_and_phase": {f"{k} {p}": n for (k, p), n in (self.counts - before).items()}})
        shutil.rmtree(run, ignore_errors=True)

    def count(self, kind: str, phase: str) -> int:
        self.counts[kind, phase] += 1
        return 1

    def launch(self, run: Path, job: str, procs: int, plan: dict) -> tuple[bool, int]:
        """One launch carrying `plan`'s fault; (the run reached its end, faults injected)."""
        kind, n = plan["kind"], 0
        if kind == "disk":
            return self.full_disk(run, job, plan)
        if kind == "damage":
            n += self.damage(run, plan)
            kind = plan["kind"]  # a signal fault when there was no complete step to damage
        launch = Launch(self.w, run, job, procs)
        if kind == "damage":
            self.check_damage_answer(launch)
            if launch.codes() == [2]:  # refused: the soak deletes the damaged step, as the line says
                self.notes["damage repaired by deleting the step"] += 1
                shutil.rmtree(plan["damaged_dir"])
                return False, n
        if kind == "second":
            n += self.second(launch, job, plan)
        if kind != "clean":  # a damage or second launch also gets its signal (else it would run to the end)
            sig = kind if kind in SIGNALS else "sigkill" if kind == "proc_kill" else plan["signal"]
            n += self.signal(launch, plan, "proc_kill" if kind == "proc_kill" else sig)
        launch.wait()
        return self.ended(launch, procs), n

    def signal(self, launch: Launch, plan: dict, kind: str) -> int:
        if plan["phase"] == "start":
            due = lambda: time.monotonic() - launch.t0 >= plan["delay"] / 1.5 * self.w.startup  # noqa: E731
        else:
            due = trigger(launch, plan["phase"], plan["delay"], plan["nth"])
        launch.wait(until=due)
        if not launch.running() or f"done at step {LAST_STEP}" in launch.out():  # ended, or only exiting
            self.notes[f"{kind} missed (the launch ended first)"] += 1
            return 0
        phase = phase_now(launch)
        victim = launch.procs[plan["victim"] if kind == "proc_kill" else 0]
        victim.send_signal(SIGNALS.get(kind, signal.SIGKILL))
        launch.wait()
        self.expect_after_signal(launch, kind, phase)
        return self.count(kind, phase)

    def expect_after_signal(self, launch: Launch, kind: str, phase: str) -> None:
        codes, out, err = launch.codes(), launch.out(), launch.err()
        finished = f"done at step {LAST_STEP}" in out
        if kind == "sigkill" and codes != [-signal.SIGKILL] and not finished:
            raise Failed(f"SIGKILL ({phase}): exit {codes}")
        if kind in ("sigterm", "sigint"):
            if codes == [0]:
                if "preempted: saved step" not in out and not finished:
                    raise Failed(f"{kind} ({phase}): exit 0 without saving:\n{out[-1500:]}")
                said = next((x for x in out.splitlines() if "preempted: saved step" in x), None)
                if said and tracker(launch.run) != said.split("saved step ")[1].split()[0]:
                    raise Failed(f"{kind} ({phase}): said {said!r}, the tracker says {tracker(launch.run)}")
                self.notes[f"{kind}: saved and exited 0"] += 1
            elif kind == "sigint" and codes == [130]:
                if err.strip().splitlines()[-1:] != ["jaxsft: interrupted before training started: nothing saved"] \
                        or "Traceback" in err:
                    raise Failed(f"sigint ({phase}): exit 130 but not one line:\n{err[-2000:]}")
                self.notes["sigint: exit 130 before training, one line"] += 1
            elif kind == "sigterm" and codes == [-signal.SIGTERM] and " - train/loss:" not in out:
                self.notes["sigterm before training: ended by the signal"] += 1
            else:
                raise Failed(f"{kind} ({phase}): exit {codes}:\n{err[-2000:]}")
        if kind == "proc_kill":
            if "Traceback" in launch.out(0) and 0:  # the survivor may print JAX's error; exit status is the promise
                pass
            survivor = [c for p, c in zip(launch.procs, codes) if c != -signal.SIGKILL]
            if any(c == 0 for c in survivor) and not finished:
                raise Failed(f"proc_kill ({phase}): the other process exited 0 before the end: {codes}")

    def ended(self, launch: Launch, procs: int) -> bool:
        codes = launch.codes()
        if all(c == 0 for c in codes) and f"done at step {LAST_STEP}" in launch.out():
            return True
        if any(c == 1 for c in codes) and procs == 1:
            raise Failed(f"{launch.name} exited 1 (an unexpected exception):\n{launch.err()[-3000:]}")
        if any(c == 2 for c in codes):
            raise Failed(f"{launch.name} refused unexpectedly:\n{launch.err()[-1500:]}")
        return False

    # -- damage between launches
    def damage(self, run: Path, plan: dict) -> int:
        from jaxsft import checkpoint

        complete = [s for s, p in sorted(step_dirs(run).items()) if checkpoint.is_complete(p)]
        if not complete:
            self.notes["damage skipped (no complete step yet): a signal instead"] += 1
            plan["kind"] = plan["signal"]
            return 0
        newest = step_dirs(run)[complete[-1]]
        files = sorted(p for p in newest.rglob("*") if p.is_file())
        victim = files[int(plan["file_pick"] * len(files))]
        plan["damaged"], plan["damaged_dir"] = f"{victim.relative_to(run)} ({plan['damage']})", newest
        if plan["damage"] == "truncate" and victim.stat().st_size > 0:
            victim.write_bytes(victim.read_bytes()[:int(plan["cut"] * victim.stat().st_size)])
        else:
            victim.unlink()
        plan["older_complete"] = len(complete) > 1
        return self.count("damage", "between launches")

    def check_damage_answer(self, launch: Launch) -> None:
        """Before any step: a fallback said in one line, or a one-line refusal (exit 2)."""
        launch.wait(until=lambda: "resumed from" in launch.out() or "starting from the base model" in launch.out())
        if not launch.running() and launch.codes() == [2]:
            one_line(launch.err(), 2, "holds no complete checkpoint")
            self.notes["damage: refused in one line (no complete step left)"] += 1
            return
        said = [x for x in launch.out().splitlines() if "is incomplete (" in x]
        if len(said) != 1:
            launch.kill()
            raise Failed(f"damaged newest step: {len(said)} lines say so:\n{launch.out()[-2000:]}\n{launch.err()[-2000:]}")
        self.notes["damage: fell back in one line"] += 1

    # -- a second launch on the same directory
    def second(self, launch: Launch, job: str, plan: dict) -> int:
        launch.wait(until=lambda: "device(s)" in launch.out())  # said once process 0 holds the lock
        at = "start" if plan["second_phase"] == "start" else plan["second_phase"]
        launch.wait(until=trigger(launch, at, plan["second_at"] if at == "start" else 0.0, plan["nth"] - 1 or 1))
        if not launch.running():
            self.notes["second missed (the launch ended first)"] += 1
            return 0
        other = Launch(self.w, launch.run, job, 1)
        # The second launch reaches the lock seconds later (imports, JAX): the phase is the first's then.
        def released() -> bool:  # the lock goes before "done at step" is said; the process exits seconds later
            return not launch.running() or "[jaxsft] done at step" in launch.out()

        other.wait(until=lambda: "jaxsft: error:" in other.err() or "device(s)" in other.out() or released())
        phase, first_ended = phase_now(launch), released()
        other.wait()
        if other.codes() == [0] and first_ended:  # the first launch was gone before the second got the lock
            self.notes["second missed (the first launch ended before the second reached the lock)"] += 1
            return 0
        one_line(other.err(), other.codes()[0], "is in use by another run")
        return self.count("second", phase)

    # -- a full disk
    def full_disk(self, run: Path, job: str, plan: dict) -> tuple[bool, int]:
        run.mkdir(parents=True, exist_ok=True)
        t = tracker(run)
        doomed = [p for s, p in step_dirs(run).items() if t and t.isdigit() and s > int(t)]  # the launch deletes them
        doomed += [run / name for name, _ in temporaries(run)]
        used = sum(p.stat().st_blocks * 512 for p in run.rglob("*") if not any(d == p or d in p.parents for d in doomed))
        room = int(plan["disk_room"] * self.checkpoint_bytes(job))
        # the copy below takes the leftovers too (the launch deletes them only once it runs): room for them
        left = sum(q.stat().st_blocks * 512 for d in doomed if d.exists() for q in [d, *d.rglob("*")])
        size_k = (used + left + room) // 1024 + 256  # + metrics, tensorboard, config
        tmp = self.w.root / "tmpfs"
        tmp.mkdir(exist_ok=True)
        rc_file = self.w.logs / f"{run.name}.disk.rc"

        def wrap(cmd, out, err):
            shell = (f"mount -t tmpfs -o size={size_k}k tmpfs {tmp} && cp -a {run}/. {tmp}/ && mount --bind {tmp} {run} && "
                     f"{{ {shlex.join(cmd)} >{out} 2>{err}; echo $? >{rc_file}; umount {run}; "
                     f"find {run} -mindepth 1 -delete; cp -a {tmp}/. {run}/; }}")
            return small_disk.command(shell)

        launch = Launch(self.w, run, job, 1, wrap=wrap)
        launch.wait()
        if launch.codes() != [0] or not rc_file.exists():
            raise Failed(f"the tmpfs wrapper failed (exit {launch.codes()})")
        code = int(rc_file.read_text())
        out = launch.out()
        if code == 0:
            self.notes["disk: room enough (no save left to fill it)"] += 1
            return f"done at step {LAST_STEP}" in out, 0
        line = one_line(launch.err(), code, "no space left on the disk")
        bad = leftovers(run)
        tracked = tracker(run)
        newer = [s for s in step_dirs(run) if tracked is None or s > int(tracked)]
        if bad or newer:
            raise Failed(f"full disk: left {bad} {newer} ({line})")
        return False, self.count("disk", "save")

    def checkpoint_bytes(self, job: str) -> int:
        ref = self.refs[job, 1] / f"global_step_{LAST_STEP}"
        return sum(p.stat().st_blocks * 512 for p in ref.rglob("*"))

    def report(self) -> dict:
        by_kind, by_phase = collections.Counter(), collections.Counter()
        for (k, p), n in self.counts.items():
            by_kind[k] += n
            by_phase[p] += n
        return {"seed": self.seed, "faults": sum(self.counts.values()), "by_kind": dict(by_kind), "by_phase": dict(by_phase),
                "by_kind_and_phase": {f"{k} {p}": n for (k, p), n in sorted(self.counts.items())},
                "notes": dict(self.notes), "launches": self.w.launches, "campaigns_passed": self.passed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=300, help="stop once this many faults were injected")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="all", choices=["all", *MODES])
    ap.add_argument("--family", default="all", choices=["all", *FAMILIES],
                    help="the model family (default: each in turn; --base-model and --plain: qwen2)")
    ap.add_argument("--procs", default="both", choices=["1", "2", "both"])
    ap.add_argument("--per-campaign", type=int, default=8, help="faults per run before it may end")
    ap.add_argument("--minutes", type=float, help="start no campaign after this many minutes")
    ap.add_argument("--stall", type=float, default=180.0, help="seconds without progress that count as a hang")
    ap.add_argument("--compile-cache", help="JAX compilation cache to share (default: one in the work directory)")
    ap.add_argument("--base-model", help="the tiny model to train (default: jaxsft.tiny's, made here)")
    ap.add_argument("--plain", action="store_true", help="the test suite's reference command instead (6 steps, one "
                    "file, no packing, saves at 3 and 6): its compiled step is in the suite's cache (the smoke test)")
    ap.add_argument("--reference", help="with --plain: an unbroken run of it already made (the suite's reference "
                    "run, without tensorboard: the run's tensorboard is compared with its own metrics)")
    ap.add_argument("--keep", help="work directory (kept); default a temporary one, deleted when all passed")
    ap.add_argument("--json", help="write the counts here")
    a = ap.parse_args(argv)
    root = Path(a.keep or tempfile.mkdtemp(prefix="jaxsft-soak-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the soak's own jax reads checkpoints only
    global LAST_STEP
    if a.plain:
        from runs import REFERENCE_STEPS as LAST_STEP
    if a.reference and not a.plain:
        ap.error("--reference needs --plain (the reference must be a run of the same command)")
    w = Work(root, a.stall, a.compile_cache, a.base_model, a.plain, a.reference)
    w.prepare()
    soak = Soak(w, a.seed)
    modes = list(MODES) if a.mode == "all" else [a.mode]
    families = ["qwen2"] if a.plain or a.base_model else list(FAMILIES) if a.family == "all" else [a.family]
    # One campaign in 8 is a 2-process job (each of its faults is a proc_kill and costs two launches' time).
    procs = {"1": [1], "2": [2], "both": [1] * 7 + [2]}[a.procs]
    print(f"soak: seed {a.seed}, {a.faults} faults, families {families}, modes {modes}, processes {sorted(set(procs))}, work {root}"
          + ("" if soak.disk_ok else " (no private tmpfs here: no full-disk faults)"), flush=True)
    t0, failed, i = time.time(), None, 0
    try:
        while sum(soak.counts.values()) < a.faults and (a.minutes is None or time.time() - t0 < 60 * a.minutes):
            # 7 families x 3 modes: every pair in 21 campaigns; [1]*7+[2]: the 2-process ones (i = 7, 15, 23,
            # 31, 39) are qwen2/lora, qwen3_moe/full, qwen3/offload, qwen2_moe/lora, llama/full
            job = f"{families[i % len(families)]}/{modes[i % len(modes)]}"
            soak.campaign(job, procs[i % len(procs)], min(a.per_campaign, a.faults - sum(soak.counts.values())))
            i += 1
            if a.json:  # the counts so far, should the soak be stopped
                Path(a.json).write_text(json.dumps({**soak.report(), "seconds": round(time.time() - t0)}, indent=1))
    except Failed as e:
        failed = str(e)
    result = {**soak.report(), "seconds": round(time.time() - t0), "passed": failed is None, "failure": failed}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if failed is None and not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
