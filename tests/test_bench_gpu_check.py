"""The prepared GPU check works before a GPU ever sees it, on a machine without DALI or wandb.

Proves:
- `launch/gpu_check.py --dry-run` (what CI runs) performs every step tiny on the CPU with
  `nvidia.dali` and `wandb` unimportable: the GPU-marked tests run (and are skipped here), the
  matmul peaks, every 1-process row of the grid (training and inference; fp32, bf16,
  bf16 + channels_last; eager and compiled) and the 2-rank rows, and it writes
  gpu_check.json and a gpu_check.md table whose rows are the JSON's;
- the model, the synthetic source and the benchmarks' step import and run without DALI,
  and training on image folders without DALI ends with one line naming DALI and the fix,
  exit code 2, and no run folder;
- the budget holds: a row that runs past it is cut, the rest are marked not run, and the
  files are complete; tests cut by it keep the outcomes of those that ended; bad input (a budget too small, an unwritable folder, no GPU without
  --dry-run) is refused with a message naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repro.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''
import sys

class _Missing:
    """Imports of these packages fail, as on a machine where they are not installed."""
    names = ("nvidia.dali", "wandb")

    def find_spec(self, name, path=None, target=None):
        if any(name == n or name.startswith(n + ".") for n in self.names):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _Missing())
'''


def without_dali(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run python with DALI and wandb unimportable (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_without_dali_or_wandb_does_every_step(tmp_path):
    out = tmp_path / "check"
    result = without_dali(tmp_path, "launch/gpu_check.py", "--out", str(out), "--dry-run")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["context"]["versions"]["dali"] is None  # the blocker was in force
    assert record["dry_run"] and record["finished"]

    tests = record["tests"]
    names = {t["name"] for t in tests["tests"]}
    assert tests["status"] == "passed" and tests["counts"] == {"skipped": len(names)}
    assert {
        "test_training_steps_on_cuda_match_cpu_fp32",
        "test_nccl_gradient_average_equals_the_whole_batch",
    } <= {n.split("[")[0] for n in names}
    assert set(record["peaks"]) == {"bf16", "fp32"}

    rows = record["rows"]
    one = [r for r in rows if r["world_size"] == 1]
    grid = {(r["mode"], r["precision"], r["channels_last"], r["compile"]) for r in one}
    assert len(one) == len(grid) == 2 * 3 * 2  # modes x precisions x compile, batch 4
    assert {r["world_size"] for r in rows} == {1, 2}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"]["median"])
        assert 0 < r["mfu_bf16_peak"] < 1

    table = [ln for ln in (out / "gpu_check.md").read_text().splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| mode | layout | batch")
    assert len(table) == 1 + len(rows)  # header, then one line per row, in the JSON's order
    assert all(ln.endswith("| ok |") for ln in table[1:])


def test_training_on_images_without_dali_is_one_line_and_no_run_folder(tmp_path):
    run = tmp_path / "run"
    result = without_dali(
        tmp_path, "launch/train.py", "configs/demo.yaml", f"data.root={tmp_path / 'digits'}",
        f"train.run_dir={run}", "wandb.mode=disabled", "train.device=cpu",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: decoding images needs")
    assert "nvidia-dali-cuda130" in lines[0] and "data.source=synthetic" in lines[0]
    assert not run.exists() and not (tmp_path / "digits").exists()


def test_budget_cuts_a_long_row_and_marks_the_rest(tmp_path, monkeypatch):
    def slow(job, case, layout):
        time.sleep(60)

    monkeypatch.setattr(gpu_check, "measure", slow)
    monkeypatch.setattr(gpu_check, "run_tests", lambda out, s: {"status": "passed", "counts": {}})
    # The peaks take no time, so the first row meets the alarm whatever the machine's load.
    peak = {"flop_s": 1e12, "size": 256, "seconds": 0.0}
    monkeypatch.setattr(gpu_check.kit, "matmul_peak", lambda device, dtype, size: peak)
    monkeypatch.setattr(gpu_check, "RESERVE_S", 1.0)
    record = gpu_check.run(tmp_path, budget_s=4.0, dry_run=True)
    statuses = [r["status"] for r in record["rows"]]
    assert statuses[0] == "cut: budget"  # the alarm stopped the sleeping row
    assert set(statuses[1:]) == {"not run: budget"}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rows"] == json.loads(
        json.dumps(record["rows"])
    )
    assert gpu_check.problems(record)  # a cut check is not a clean one


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(gpu_check.GpuCheckError, match="--budget-s must be more than"):
        gpu_check.run(tmp_path, budget_s=1, dry_run=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(gpu_check.GpuCheckError, match="cannot write to --out"):
        gpu_check.run(tmp_path / "a_file" / "out", budget_s=60, dry_run=True)
    if not torch.cuda.is_available():
        with pytest.raises(gpu_check.GpuCheckError, match="no CUDA GPU.*--dry-run"):
            gpu_check.run(tmp_path, budget_s=60, dry_run=False)


def test_tests_cut_by_the_budget_keep_the_outcomes_of_those_that_ended(tmp_path):
    """pytest killed mid-way writes no JUnit file: the outcomes come from its -v lines."""
    tests = tmp_path / "test_stand_in.py"
    tests.write_text(
        "import time, pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_passes(): pass\n"
        "def test_is_skipped(): pytest.skip('no second GPU')\n"
        "def test_runs_past_the_budget(): time.sleep(120)\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    # pytest starts and ends the first two in ~0.8 s here; the third is killed at 6 s.
    result = gpu_check.run_tests(out, seconds=6, tests=str(tests))
    assert result["status"] == "cut: budget (6 s)"
    assert not (out / "gpu_tests.xml").exists()
    assert result["counts"] == {"passed": 1, "skipped": 1}
    assert [c["name"] for c in result["tests"]] == ["test_passes", "test_is_skipped"]
