"""Finding unreadable image files: repro/data/imagecheck.py.

Proves: a truncated JPEG, a text file named .jpg, an empty file and a file with JPEG markers
around garbage are each found with a reason, and nothing else is; the list lands in
<root>/bad_files.txt with paths relative to root and reads back as absolute paths; the cheap
check used at loader build time catches the first three without decoding; files listed in
bad_files.txt are skipped by the screen even when they look fine; the warning names every
file up to 20 and summarises the rest; the check's progress bars end at their totals.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repro.data import check, imagecheck

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path) -> tuple[Path, dict[str, Path]]:
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    good = []
    for i, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("JPEG", "JPEG")]):
        path = tmp_path / "train" / "a" / f"good{i}.{ext}"
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, fmt)
        good.append(path)
    bad = {
        "truncated": tmp_path / "train" / "a" / "truncated.jpg",
        "text": tmp_path / "val" / "a" / "text.jpg",
        "empty": tmp_path / "val" / "a" / "empty.png",
        "garbage": tmp_path / "train" / "a" / "garbage.jpeg",
    }
    bad["truncated"].write_bytes(good[0].read_bytes()[:200])
    bad["text"].write_text("<html>404 not found</html>")
    bad["empty"].write_bytes(b"")
    bad["garbage"].write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 3 + b"\xff\xd9")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image name: never read")
    return tmp_path, bad


def test_find_bad_images_names_each_and_writes_the_list(folder):
    root, bad = folder
    found = dict(check.find_bad_images(root, progress=False))
    assert set(found) == {str(p) for p in bad.values()}
    assert "empty" in found[str(bad["empty"])]
    assert "not an image DALI decodes" in found[str(bad["text"])]
    assert "truncated" in found[str(bad["truncated"])]
    assert "unreadable header" in found[str(bad["garbage"])]  # PIL finds no frame header
    listing = (root / imagecheck.BAD_FILES_NAME).read_text()
    assert '["train/a/truncated.jpg", ' in listing and str(root) + "/val" not in listing
    assert imagecheck.read_bad_files(root) == found
    # A list of paths is checked the same way and writes nothing.
    (root / imagecheck.BAD_FILES_NAME).unlink()
    some = [str(bad["text"]), str(root / "train" / "a" / "good1.png")]
    assert [p for p, _ in check.find_bad_images(some, progress=False)] == [some[0]]
    assert not (root / imagecheck.BAD_FILES_NAME).exists()


def test_quick_check_catches_the_cheap_cases(folder):
    root, bad = folder
    assert imagecheck.quick_check(str(bad["empty"])) == "empty file"
    assert imagecheck.quick_check(str(bad["text"])).startswith("not an image DALI decodes")
    assert imagecheck.quick_check(str(bad["truncated"])).startswith("truncated JPEG")
    assert imagecheck.quick_check(str(bad["garbage"])) is None  # needs a full decode
    for good in sorted((root / "train" / "a").glob("good*")):
        assert imagecheck.quick_check(str(good)) is None


def test_screen_uses_the_listed_files_and_the_quick_check(folder):
    root, bad = folder
    paths = imagecheck.list_image_files(root)
    assert len(paths) == 7 and not any(p.endswith(".txt") for p in paths)
    quick = dict(imagecheck.screen(paths, root))
    # The header read (PIL) also finds the garbage between JPEG markers.
    assert set(quick) == {str(bad[k]) for k in ("truncated", "text", "empty", "garbage")}
    good = str(root / "train" / "a" / "good1.png")
    imagecheck.write_bad_files(root, [(good, "corrupt")])
    listed = dict(imagecheck.screen(paths, root))
    assert listed[good] == "corrupt" and len(listed) == 5


def test_warning_names_files_and_summarises_many():
    few = [(f"/d/{i}.jpg", "empty file") for i in range(3)]
    with pytest.warns(UserWarning, match="skipping 3") as caught:
        imagecheck.warn_skipped(few, "/d")
    assert all(p in str(caught[0].message) for p, _ in few)
    many = [(f"/d/{i}.jpg", "empty file") for i in range(25)]
    with pytest.warns(UserWarning, match=r"and 5 more"):
        imagecheck.warn_skipped(many, "/d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        imagecheck.warn_skipped([], "/d")  # nothing skipped: no warning


def test_command_line(folder, capsys):
    root, bad = folder
    check.main([str(root)])
    out = capsys.readouterr().out
    assert "4 bad file(s)" in out and str(bad["text"]) in out
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        check.find_bad_images(root / "missing")


def test_check_progress_bars_reach_their_totals(folder, capsys):
    root, _ = folder
    check.find_bad_images(root, progress=True)
    bars = {}  # description -> its last (count, total)
    for line in capsys.readouterr().err.replace("\r", "\n").splitlines():
        found = re.match(r"\s*([a-z ]+):.*?(\d+)/(\d+)", line)
        if found:
            bars[found[1]] = (int(found[2]), int(found[3]))
    assert bars["reading headers"] == (7, 7)  # every file under root
    assert bars["decoding"][0] == bars["decoding"][1] > 0
