"""What every launch/ entry point shares (repro/cli.py), called in-process.

Proves: a Ctrl-C that lands while `run` still imports torch, or before main reaches `run`,
ends the command with `PROG: interrupted` and exit code 130, not a traceback; during a
command each of repro's warnings prints once, as one line `PROG: warning: ...`, and other
packages' warnings as Python prints them.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from pathlib import Path

import pytest

import repro
import repro.run.faults  # noqa: F401 (present, so the test can take it away)
from repro import cli
from repro.config import ReproWarning


class _CtrlCOn(importlib.abc.MetaPathFinder):
    """An import finder that raises `error` (a Ctrl-C unless said) when `name` is looked for."""

    def __init__(self, name: str, error: BaseException | None = None):
        self.name, self.error = name, error or KeyboardInterrupt()

    def find_spec(self, name, path, target=None):
        if name == self.name:
            raise self.error
        return None


def test_ctrl_c_while_run_imports_torch_is_one_line_and_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "repro.run.faults")  # imported afresh, as at start-up
    monkeypatch.setattr(sys, "meta_path", [_CtrlCOn("repro.run.faults"), *sys.meta_path])
    try:
        code = cli.run("train", lambda: 0)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped run(): the user sees a traceback")
    assert (code, capsys.readouterr().err) == (130, "train: interrupted\n")


def test_a_failing_import_at_start_keeps_its_own_error(monkeypatch):
    """A broken install (torch failing to import) is reported as itself, not as a name the
    except clauses could not find (it was an UnboundLocalError)."""
    monkeypatch.delitem(sys.modules, "repro.run.faults")
    broken = ImportError("libtorch_cpu.so: cannot open shared object file")
    monkeypatch.setattr(sys, "meta_path", [_CtrlCOn("repro.run.faults", broken), *sys.meta_path])
    with pytest.raises(ImportError, match="libtorch_cpu.so"):
        cli.run("train", lambda: 0)


def test_ctrl_c_before_run_is_one_line_and_130(monkeypatch, capsys):
    def main() -> int:
        raise KeyboardInterrupt  # as if in parse_args

    monkeypatch.setattr(sys, "argv", ["launch/predict.py", "ckpt.pt"])
    try:
        with pytest.raises(SystemExit) as ended:
            cli.exit_with(main)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped exit_with(): the user sees a traceback")
    assert (ended.value.code, capsys.readouterr().err) == (130, "predict: interrupted\n")


def test_our_warnings_are_one_line_and_once_per_command(capsys):
    # As load_stats's warning arrives: reported from the loaders' line that called it.
    loaders = Path(repro.__file__).parent / "data" / "loaders.py"
    ours = {"filename": str(loaders), "module": "repro.data.loaders"}

    def command() -> int:
        for _ in range(2):  # the training and validation loaders each load the statistics
            warnings.warn_explicit(
                "no statistics file /d/stats.npz", ReproWarning, lineno=94, **ours
            )
            with warnings.catch_warnings():  # as the loop does in between
                warnings.simplefilter("ignore")
        warnings.warn_explicit("a torch notice", FutureWarning, "/lib/torch/nn.py", 7)
        # torch's warnings name the line that called torch, often one of ours: still theirs.
        warnings.warn_explicit("a torch notice from our line", UserWarning, lineno=95, **ours)
        return 0

    with pytest.warns((FutureWarning, UserWarning)) as caught:  # passed on to Python's printer
        assert cli.run("train", command) == 0
    assert sorted(str(w.message) for w in caught) == [
        "a torch notice", "a torch notice from our line"
    ]  # fmt: skip
    assert capsys.readouterr().err == "train: warning: no statistics file /d/stats.npz\n"
