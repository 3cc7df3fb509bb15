"""Config loading: every shipped config loads, overrides parse by type, every mistake is a
ConfigError naming the key, where it came from and what would be valid, YAML round-trips, and
`base:` chains layer in order and refuse cycles."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from repro.config import (
    CHOICES,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_for_layout,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ROOT = ["data.root=/tmp/data"]  # the defaults alone name no data folder


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.image_size == cfg.data.crop
    validate_for_layout(cfg, replicas=1)


def test_paper_yaml_mirrors_every_field_and_holds_the_recipe() -> None:
    import yaml

    raw = yaml.safe_load((CONFIGS / "paper.yaml").read_text())
    assert {s: set(v) for s, v in raw.items()} == {
        s: set(v) for s, v in config_to_dict(Config()).items()
    }
    cfg = load_config(CONFIGS / "paper.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 0.0005)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.max_drops) == (128, 90, 3)
    assert cfg.data.source == "imagenet" and cfg.train.run_dir == "runs/paper"


def test_original_2012_preset() -> None:
    cfg = load_config(CONFIGS / "original_2012.yaml")
    assert cfg.optim.schedule == "steps" and cfg.optim.drop_epochs == (25, 51, 79)
    assert cfg.train.epochs == 91 and cfg.optim.bias_lr_mult == 2.0
    assert not cfg.optim.bias_weight_decay and cfg.model.conv345_init_std == 0.03
    assert cfg.model.lrn_before_relu_conv1 and cfg.model.cnorm2
    assert cfg.train.lighting_off_from_epoch == cfg.train.freeze_conv1_from_epoch == 71


@pytest.mark.parametrize(
    "name, changed",
    [
        (
            "ablation_one_tower",
            {"model.towers": 1, "model.widths": (48, 128, 192, 192, 256), "model.fc_width": 4096},
        ),
        ("ablation_no_overlap_pool", {"model.pool": "non_overlapping"}),
        ("ablation_no_lrn", {"model.lrn": False}),
        ("ablation_no_exchange", {"model.exchange": "fc8_only"}),
    ],
)
def test_ablation_changes_only_its_factor(name: str, changed: dict) -> None:
    paper = config_to_dict(load_config(CONFIGS / "paper.yaml"))
    ablation = config_to_dict(load_config(CONFIGS / f"{name}.yaml"))
    diff = {
        f"{s}.{k}": v
        for s, body in ablation.items()
        for k, v in body.items()
        if paper[s][k] != v and s != "wandb" and k != "run_dir"
    }
    assert diff == {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}
    assert ablation["train"]["run_dir"] == f"runs/{name}"


def test_overrides_of_each_type() -> None:
    cfg = load_config(
        CONFIGS / "paper.yaml",
        [
            "optim.lr=0.02",
            "optim.weight_decay=5e-4",  # YAML 1.1 reads this as a string
            "optim.momentum=0",  # an int for a float field
            "train.batch_size=256",
            "model.lrn=false",
            "train.compile=off",  # YAML 1.1 would read a boolean
            "wandb.name=2012",  # YAML would read an int
            "optim.schedule=steps",
            "optim.drop_epochs=[25, 51, 79]",
            "wandb.tags=[a, 'b c']",
            "data.stats=",
        ],
    )
    assert cfg.optim.lr == 0.02 and cfg.optim.weight_decay == 0.0005
    assert cfg.optim.momentum == 0.0 and isinstance(cfg.optim.momentum, float)
    assert cfg.train.batch_size == 256 and cfg.model.lrn is False
    assert cfg.train.compile == "off" and cfg.wandb.name == "2012"
    assert cfg.optim.drop_epochs == (25, 51, 79) and cfg.wandb.tags == ("a", "b c")
    assert cfg.data.stats == ""


def test_yaml_on_off_in_a_file_mean_the_strings(tmp_path: Path) -> None:
    p = write(tmp_path / "c.yaml", "data: {root: x}\ntrain:\n  compile: off\n  channels_last: on\n")
    cfg = load_config(p)
    assert (cfg.train.compile, cfg.train.channels_last) == ("off", "on")


ERRORS = [
    # (overrides, substrings the message must contain)
    (["optim.lrr=0.1"], ["optim.lrr", "command line", "did you mean 'optim.lr'", "momentum"]),
    (["optm.lr=0.1"], ["optm", "did you mean 'optim'", "model, data, optim, train, wandb"]),
    (["lr=0.1"], ["section.key=value", "did you mean optim.lr=0.1"]),
    (["optim.lr=fast"], ["optim.lr", "command line", "expected float", "str 'fast'"]),
    (["train.epochs=1.5"], ["train.epochs", "expected int", "float 1.5"]),
    (["train.epochs=true"], ["train.epochs", "expected int", "bool True"]),
    (["model.lrn=1"], ["model.lrn", "expected bool", "int 1"]),
    (["model.widths=7"], ["model.widths", "expected a list of int"]),
    (["model.widths=[48, true, 1, 1, 1]"], ["model.widths", "bool True"]),
    (["optim.lr=-0.01"], ["optim.lr", "command line", "> 0"]),
    (["optim.lr=0"], ["optim.lr", "> 0"]),
    (["optim.lr=.inf"], ["optim.lr", "finite"]),
    (["optim.momentum=1.0"], ["optim.momentum", "[0, 1)"]),
    (["optim.weight_decay=-1e-4"], ["optim.weight_decay", ">= 0"]),
    (
        ["train.batch_size=129"],
        [
            "train.batch_size",
            "divisible by model.towers = 2 (the default), e.g. train.batch_size=128",
        ],
    ),
    (["train.epochs=0"], ["train.epochs", ">= 1"]),
    (["model.dropout=1"], ["model.dropout", "[0, 1)"]),
    (["model.num_classes=1"], ["model.num_classes", ">= 2"]),
    (["model.widths=[48, 128, 192, 192]"], ["model.widths", "5 positive ints"]),
    (["model.widths=[48, 128, 0, 192, 128]"], ["model.widths", "5 positive ints"]),
    (["data.crop=300"], ["data.crop", "<= data.resize = 256"]),
    (["model.image_size=227"], ["model.image_size", "must equal data.crop = 224"]),
    (["data.root="], ["data.root", "must name the data folder", "'folders'"]),
    (["data.source=imagenet"], ["data.val_labels", "defaults"]),
    (["optim.schedule=steps"], ["optim.drop_epochs", "'steps'"]),
    (["optim.drop_epochs=[51, 25]"], ["optim.drop_epochs", "increasing"]),
    (["model.towers=3"], ["model.towers", "1, 2"]),
]
ERRORS += [
    ([f"{key}=bogus"], [key, "command line", *(repr(c) for c in choices)])
    for key, choices in CHOICES.items()
    if key != "model.towers"
]


@pytest.mark.parametrize("overrides, needles", ERRORS, ids=lambda x: str(x)[:40])
def test_each_mistake_is_a_config_error_naming_key_and_place(overrides, needles) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*ROOT, *overrides])
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_an_indivisible_batch_names_each_origin_and_the_nearest_valid_values() -> None:
    """The batch from the command line, the tower count from the file: each named as such."""
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "demo.yaml", ["train.batch_size=63"])
    assert str(info.value) == (
        "command line: train.batch_size = 63: must be divisible by model.towers = 2 (set in "
        f"{CONFIGS / 'demo.yaml'}), e.g. train.batch_size=62 or train.batch_size=64"
    )
    with pytest.raises(ConfigError, match=r"= 2 \(set on the command line\), e\.g\. .*=2 or"):
        load_config(None, [*ROOT, "model.towers=2", "train.batch_size=3"])


def test_choice_error_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'overlapping'"):
        load_config(None, [*ROOT, "model.pool=overlaping"])


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    cases = {
        "modle:\n  towers: 2\n": ["unknown section 'modle'", "did you mean 'model'"],
        "model:\n  tower: 2\n": ["model.tower", "did you mean 'model.towers'", "widths"],
        "optim:\n  lr: fast\n": ["optim.lr", "expected float", "str 'fast'"],
        "wandb:\n  name: 2012\n": ["wandb.name", "expected str", "quote it"],
        "optim:\n  lr: -1.0\n": ["optim.lr", "> 0"],
        "model: 3\n": ["section 'model' must be a mapping"],
        "- a\n- b\n": ["must be a mapping of sections"],
        "optim:\n  lr: 0.1\n  lr: 0.2\n": ["line 4", "given twice"],
        "optim: [unclosed\n": ["not valid YAML"],
    }
    for i, (text, needles) in enumerate(cases.items()):
        prefix = "" if text.startswith("-") else "data: {root: x}\n"
        p = write(tmp_path / f"bad{i}.yaml", prefix + text)
        with pytest.raises(ConfigError) as info:
            load_config(p)
        message = str(info.value)
        assert str(p) in message, message
        for needle in needles:
            assert needle in message, message
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*ROOT, "optim.lr=-1", "optim.momentum=2"])
    assert "2 problems" in str(info.value) and "optim.momentum" in str(info.value)


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "original_2012.yaml",
        ["train.compile=off", "wandb.tags=[x, 'y z']", "model.init_std=1e-5", "data.stats=none"],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["optim"]["drop_epochs"] == [25, 51, 79]  # lists, not tuples


def test_config_from_dict_errors_say_checkpoint() -> None:
    data = config_to_dict(load_config(CONFIGS / "paper.yaml"))
    data["optim"]["lr"] = "high"
    with pytest.raises(ConfigError, match=r"^checkpoint: optim\.lr: expected float"):
        config_from_dict(data)


def test_base_chain_layers_in_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    write(
        tmp_path / "a.yaml",
        "data: {root: x}\noptim: {lr: 0.05, momentum: 0.5}\ntrain: {epochs: 3}\n",
    )
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\noptim: {lr: 0.02}\n")
    c = write(tmp_path / "sub" / "c.yaml", "base: b.yaml\ntrain: {epochs: 7}\n")
    cfg = load_config(c, ["optim.momentum=0.8"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.02, 0.8, 7)
    assert cfg.data.root == "x"


def test_base_errors_name_the_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "self.yaml")
    write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: cannot read"):
        load_config(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: base: expected a file name"):
        load_config(tmp_path / "d.yaml")


def test_a_base_that_is_not_a_config_is_one_short_line(tmp_path: Path) -> None:
    """Notes, a script or a binary named by `base:`: one line naming both files, the file's
    text cut short (it used to print the whole file)."""
    notes = "These are my notes about the run, not a config.\n" * 200
    write(tmp_path / "notes.txt", notes)
    (tmp_path / "tool.bin").write_bytes(bytes(range(256)) * 8)
    for base, needle in (("notes.txt", "not a config file: it must be a mapping"),
                         ("tool.bin", "not a config file (not UTF-8 text)")):  # fmt: skip
        write(tmp_path / "run.yaml", f"base: {base}\n")
        with pytest.raises(ConfigError) as info:
            load_config(tmp_path / "run.yaml")
        message = str(info.value)
        assert needle in message and message.startswith(str(tmp_path / base))
        assert message.endswith(f"(named by `base:` in {tmp_path / 'run.yaml'})")
        assert "\n" not in message and len(message) < 400, message


def test_validate_for_layout_checks_replicas_times_towers() -> None:
    cfg = load_config(None, [*ROOT, "train.batch_size=128"])
    validate_for_layout(cfg, replicas=4)  # 128 = 4 replicas x 2 towers x 16
    with pytest.raises(ConfigError, match=r"multiple of 6.*batch_size=126.*batch_size=132"):
        validate_for_layout(cfg, replicas=3)


def test_frozen_and_defaults_are_the_paper() -> None:
    cfg = load_config(None, ROOT)
    assert cfg == dataclasses.replace(
        Config(), data=dataclasses.replace(Config().data, root="/tmp/data")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_builds_its_network(path):
    """Validation alone does not know the net's smallest input: build the layer table too."""
    from repro.net.summary import summarize

    cfg = load_config(path, ["data.root=/data/anywhere"])
    rows = summarize(cfg.model)
    assert rows[-1].layer == "fc8" and rows[-1].params_total > 0
