"""What every launch/ entry point shares (repro/cli.py), called in-process.

Proves: a Ctrl-C that lands while `run` still imports torch, or before main reaches `run`,
ends the command with `PROG: interrupted` and exit code 130, not a traceback.
"""

from __future__ import annotations

import importlib.abc
import sys

import pytest

import repro.run.faults  # noqa: F401 (present, so the test can take it away)
from repro import cli


class _CtrlCOn(importlib.abc.MetaPathFinder):
    """An import finder that raises KeyboardInterrupt when `name` is looked for."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, name, path, target=None):
        if name == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_run_imports_torch_is_one_line_and_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "repro.run.faults")  # imported afresh, as at start-up
    monkeypatch.setattr(sys, "meta_path", [_CtrlCOn("repro.run.faults"), *sys.meta_path])
    try:
        code = cli.run("train", lambda: 0)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped run(): the user sees a traceback")
    assert (code, capsys.readouterr().err) == (130, "train: interrupted\n")


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
