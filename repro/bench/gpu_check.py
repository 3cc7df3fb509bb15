"""One prepared check for the day a GPU machine is lent: tests, then benchmarks, within a budget.

    PYTHONPATH=. python3 launch/gpu_check.py --out DIR --budget-s 420
    python launch/gpu_check.py --out DIR --dry-run     # the same steps, tiny, on the CPU (CI)

Steps, in order, each cut short when the budget runs out:
1. the GPU-marked tests (tests/test_gpu.py, `pytest -m gpu`) in a child process, given at
   most TESTS_SHARE of the budget;
2. the matmul peaks (bf16, the MFU denominator, and fp32) of repro/bench/kit.py;
3. one process (both towers), synthetic data already on the GPU: training and inference
   steps at batch 128 and 512 in fp32, bf16 and bf16 + channels_last, eager first, then
   compiled (the rows most worth having come first, so a short budget drops the least);
   each row is repro/bench/step.py's `measure`, the step repro/run/train.py runs;
4. with 2+ GPUs, the same grid on 2 ranks (one tower each, NCCL), fresh processes; with one
   GPU a note says why they are missing.
After every row DIR/gpu_check.json and DIR/gpu_check.md are rewritten, so a run killed
mid-way still leaves the finished rows. A row running past the budget is stopped by an
alarm (in this process) or a kill (child processes) and marked so.

What the machine may lack: DALI and wandb (nothing here imports them), a C compiler for
Inductor (a compiled row that fails records the cause and the check goes on). Compiled rows
reset Dynamo's caches first: every row builds a new model, and past Dynamo's recompile limit
it would silently run eagerly.
The dry run uses a tiny net, batch 4 and 8, one measured step, and compiles with Dynamo's
'eager' backend (tracing without Inductor's code generation, minutes on a CPU); on the CPU
the GPU-marked tests are skipped, which is what the first step then shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import torch

from repro.bench import kit
from repro.bench.step import Case, Job, measure, rank_main
from repro.config import ModelConfig
from repro.net.dist import single_process_layout
from repro.net.summary import summarize, training_flops

ROOT = Path(__file__).resolve().parents[2]
TESTS = "tests/test_gpu.py"
TESTS_SHARE = 0.4
"""At most this part of the budget goes to the tests; the benchmarks get the rest."""
RESERVE_S = 5.0
"""Kept back from every step for writing the files."""
TINY = ModelConfig(num_classes=10, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=64)
PRECISIONS = (("fp32", False), ("bf16", False), ("bf16", True))
"""(autocast precision, channels_last) of every row."""


class GpuCheckError(ValueError):
    """The check cannot start: no GPU without --dry-run, a bad budget, an unwritable folder."""


class OverBudget(Exception):
    """The time budget ran out inside a step."""


@dataclasses.dataclass(frozen=True)
class Plan:
    device: str
    cfg: ModelConfig
    batches: tuple[int, ...]
    warmup: int
    steps: int
    repeats: int
    peak_size: int
    compile_backend: str


def plan(dry_run: bool) -> Plan:
    if dry_run:
        return Plan("cpu", TINY, (4,), 1, 1, 2, 256, "eager")
    # The paper's net; 3 warm-up steps (cuDNN autotuning, allocator), 5 x 5 timed steps.
    return Plan("cuda", ModelConfig(), (128, 512), 3, 5, 5, 8192, "inductor")


def flops_per_image(cfg: ModelConfig, mode: str) -> int:
    """Training: forward and both gradients (repro/net/summary.py); inference: 2 per MAC."""
    return training_flops(cfg) if mode == "train" else 2 * sum(r.macs_total for r in summarize(cfg))


# -- the budget -------------------------------------------------------------------------------


class Clock:
    """Seconds left of the budget, and an alarm that stops a step at the deadline."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    @contextlib.contextmanager
    def alarm(self):
        """Raise OverBudget in this (main) thread when the budget runs out."""
        limit = self.left()
        if limit <= 0:
            raise OverBudget()

        def ring(signum, frame):
            raise OverBudget()

        old = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# -- step 1: the tests --------------------------------------------------------------------------


def run_tests(out: Path, seconds: float, tests: str = TESTS) -> dict:
    """pytest -m gpu on `tests` in a child process killed after `seconds`. Each test's outcome
    comes from the JUnit file, or, when the budget killed pytest before it wrote one, from the
    lines `-v` printed as each test ended."""
    if seconds <= 1:
        return {"status": "not run: budget", "counts": {}}
    xml = out / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider"]
    command += [f"--junitxml={xml}", "-rs", tests]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    begun = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=seconds)
        status = "passed" if proc.returncode == 0 else f"failed (pytest exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and anything it started
        output, _ = proc.communicate()
        status = f"cut: budget ({seconds:.0f} s)"
    cases = _junit_cases(xml) or _printed_cases(output)
    return {
        "status": status,
        "seconds": round(time.monotonic() - begun, 1),
        "counts": dict(Counter(c["outcome"] for c in cases)),
        "tests": cases,
        "output_tail": output[-4000:],
    }


_PRINTED = re.compile(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED)")
_OUTCOMES = {"PASSED": "passed", "FAILED": "failure", "ERROR": "error", "SKIPPED": "skipped"}


def _printed_cases(output: str) -> list[dict]:
    """The tests `pytest -v` reported as ended (`path::name OUTCOME`), in _junit_cases' form."""
    return [
        {"name": m[1], "outcome": _OUTCOMES[m[2]], "detail": ""} for m in _PRINTED.finditer(output)
    ]


def _junit_cases(xml: Path) -> list[dict]:
    if not xml.is_file():
        return []
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, detail = tag, (found.get("message") or "")[:300]
        cases.append({"name": case.get("name"), "outcome": outcome, "detail": detail})
    return cases


# -- steps 3 and 4: the rows --------------------------------------------------------------------


def grid(p: Plan) -> list[tuple[str, Case]]:
    """(mode, case) in the order they run: eager before compiled, training before inference."""
    return [
        (mode, Case(batch, precision, channels_last, compiled))
        for compiled in (False, True)
        for mode in ("train", "infer")
        for batch in p.batches
        for precision, channels_last in PRECISIONS
    ]


@contextlib.contextmanager
def compile_backend(name: str):
    """torch.compile with `name` as its default backend while inside (the dry run's 'eager')."""
    original = torch.compile
    if name != "inductor":
        torch.compile = functools.partial(original, backend=name)
    try:
        yield
    finally:
        torch.compile = original


def row(
    p: Plan, mode: str, case: Case, world: int, result: dict | None, status: str, peak: float
) -> dict:
    entry = {
        "mode": mode,
        "layout": "1 process (2 towers)" if world == 1 else f"{world} ranks (1 tower each)",
        "world_size": world,
        "batch": case.batch,
        "precision": case.precision,
        "channels_last": case.channels_last,
        "compile": case.compile,
        "status": status,
    }
    if result is None:
        return entry
    step = kit.spread(result["step_s"]["real"])
    images_s = case.batch / step["median"]
    devices = world if p.device == "cuda" else 1
    flop_s = flops_per_image(p.cfg, mode) * images_s
    return {
        **entry,
        "step_ms": {k: v * 1e3 for k, v in step.items() if k != "n"},
        "measurements": step["n"],
        "images_per_s": images_s,
        "flop_s": flop_s,
        "mfu_bf16_peak": flop_s / (peak * devices),
    }


def one_process_row(p: Plan, mode: str, case: Case, clock: Clock, peak: float) -> dict:
    import torch._dynamo

    job = Job(mode, p.cfg, p.device, (case,), p.warmup, p.steps, p.repeats)
    layout = single_process_layout(p.cfg.towers, p.device)
    if case.compile:
        torch._dynamo.reset()  # a fresh model per row: stay under Dynamo's recompile limit
    begun, result, status = time.monotonic(), None, "ok"
    try:
        with clock.alarm(), compile_backend(p.compile_backend):
            result = measure(job, case, layout)
    except OverBudget:
        status = "cut: budget"
    except Exception as err:  # a failed row (out of memory, no compiler) is a finding, not the end
        status = f"error: {_one_line(err)}"
    if p.device == "cuda":
        torch.cuda.empty_cache()
    # Wall time of the row: model, warm-up (compile included), measurements.
    return {**row(p, mode, case, 1, result, status, peak), "row_s": time.monotonic() - begun}


def two_rank_rows(p: Plan, cases: list[tuple[str, Case]], clock: Clock, peak: float) -> list[dict]:
    """The cases on 2 fresh ranks (NCCL on 2 GPUs; gloo on the CPU in the dry run).

    One launch per (mode, compiled) group, so a compile failure costs only its own rows.
    """
    rows = []
    groups: dict[tuple[str, bool], list[Case]] = {}
    for mode, case in cases:
        groups.setdefault((mode, case.compile), []).append(case)
    for (mode, _), mine in groups.items():
        if clock.left() <= 0:
            rows += [row(p, mode, c, 2, None, "not run: budget", peak) for c in mine]
            continue
        job = Job(mode, p.cfg, p.device, tuple(mine), p.warmup, p.steps, p.repeats)
        try:
            results = kit.run_ranks(rank_main, 2, (job,), threads=1, timeout_s=clock.left())
            rows += [row(p, mode, c, 2, r, "ok", peak) for c, r in zip(mine, results)]
        except Exception as err:
            rows += [row(p, mode, c, 2, None, f"error: {_one_line(err)}", peak) for c in mine]
    return rows


def _one_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {(lines[-1] if lines else '')[:300]}"


# -- the record --------------------------------------------------------------------------------


def write(out: Path, record: dict) -> None:
    """gpu_check.json (everything) and gpu_check.md (the tables), replaced atomically."""
    record["context"]["load_average_end"] = kit.load_average()
    for name, text in (
        ("gpu_check.json", json.dumps(record, indent=2, default=str) + "\n"),
        ("gpu_check.md", markdown(record)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def markdown(record: dict) -> str:
    tests, peaks = record["tests"], record["peaks"]
    lines = [
        f"# GPU check{' (dry run: tiny net on the CPU)' if record['dry_run'] else ''}",
        "",
        f"- machine: {kit.describe_context(record['context'])}",
        f"- command: `{record['command']}`; {record['elapsed_s']:.0f} s of {record['budget_s']:.0f} s"
        + ("" if record["finished"] else " (still running or stopped)"),
        f"- tests (`pytest -m gpu {TESTS}`): {tests.get('status', 'not run yet')} "
        f"{json.dumps(tests.get('counts', {}))}",
    ]
    for t in tests.get("tests", []):
        if t["outcome"] != "passed":
            lines.append(f"  - {t['name']}: {t['outcome']} {t['detail'][:160]}")
    for name, p in peaks.items():
        lines.append(f"- peak: {name} matmul {p['size']}^2 = {p['flop_s'] / 1e12:.2f} TFLOP/s")
    lines += [f"- note: {n}" for n in record["notes"]]
    lines += [
        "",
        "| mode | layout | batch | precision | channels_last | compile | step ms median (min-max) "
        "| images/s | MFU (bf16 peak) | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if "step_ms" in r:
            ms = r["step_ms"]
            timing = f"{ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f})"
            speed, mfu = f"{r['images_per_s']:,.0f}", f"{100 * r['mfu_bf16_peak']:.1f}%"
        else:
            timing = speed = mfu = "-"
        lines.append(
            f"| {r['mode']} | {r['layout']} | {r['batch']} | {r['precision']} | "
            f"{'on' if r['channels_last'] else 'off'} | {'on' if r['compile'] else 'off'} | "
            f"{timing} | {speed} | {mfu} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def run(out: str | Path, budget_s: float, dry_run: bool, command: str = "") -> dict:
    """Every step within `budget_s` seconds; returns the record written to `out`."""
    if budget_s <= RESERVE_S:
        raise GpuCheckError(f"--budget-s must be more than {RESERVE_S:g} seconds, got {budget_s:g}")
    if not dry_run and not torch.cuda.is_available():
        raise GpuCheckError("no CUDA GPU is visible; --dry-run runs the same steps tiny on the CPU")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise GpuCheckError(f"cannot write to --out {out}: {err.strerror or err}") from None
    begun, clock, p = time.monotonic(), Clock(budget_s), plan(dry_run)
    record = {
        "command": command or f"launch/gpu_check.py --out {out} --budget-s {budget_s:g}",
        "dry_run": dry_run,
        "budget_s": budget_s,
        "elapsed_s": 0.0,
        "finished": False,
        "plan": dataclasses.asdict(p),
        "context": kit.context(),
        "tests": {},
        "peaks": {},
        "rows": [],
        "notes": [],
    }

    def save() -> None:
        record["elapsed_s"] = time.monotonic() - begun
        write(out, record)

    save()
    record["tests"] = run_tests(out, min(TESTS_SHARE * budget_s, clock.left()))
    save()
    device = torch.device(p.device)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        try:
            with clock.alarm():
                record["peaks"][name] = kit.matmul_peak(device, dtype, p.peak_size)
        except OverBudget:
            break
    save()
    peak = record["peaks"].get("bf16", {}).get("flop_s", float("nan"))
    for mode, case in grid(p):
        if clock.left() <= 0:
            record["rows"].append(row(p, mode, case, 1, None, "not run: budget", peak))
            continue
        record["rows"].append(one_process_row(p, mode, case, clock, peak))
        save()
    gpus = torch.cuda.device_count() if p.device == "cuda" else 0
    if p.device == "cuda" and gpus < 2:
        record["notes"].append(f"2-rank rows skipped: they need 2 GPUs, {gpus} visible")
    else:
        # The dry run tries one training case on 2 gloo ranks: the code path, not figures.
        cases = grid(p) if p.device == "cuda" else [("train", Case(p.batches[0]))]
        record["rows"] += two_rank_rows(p, cases, clock, peak)
    record["finished"] = True
    save()
    return record


def problems(record: dict) -> list[str]:
    """What did not pass or did not run: empty when every test passed and every row ran."""
    found = []
    tests = record["tests"]
    if not tests.get("status", "").startswith("passed"):
        found.append(f"tests: {tests.get('status')}")
    found += [
        f"{r['mode']} {r['layout']} batch {r['batch']} {r['precision']}"
        f"{' channels_last' if r['channels_last'] else ''}{' compile' if r['compile'] else ''}: "
        f"{r['status']}"
        for r in record["rows"]
        if r["status"] != "ok"
    ]
    return found
