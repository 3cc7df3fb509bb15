"""The one-process net against the paper's facts: shapes, parameter counts, init, interchange.

Proves: the default net has 60,965,224 parameters and 55/27/13/6 feature maps (PAPER.md §1);
each ablation variant has its own, derived count; §5's initialization statistics hold; the
grouped (Caffe) layout round-trips; bad input and bad state dicts give errors naming the problem.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from repro.config import ModelConfig
from repro.net.model import AlexNet, split_classes
from repro.net.summary import format_summary, summarize, training_flops

PAPER = ModelConfig()
ONE_TOWER = ModelConfig(towers=1, widths=(48, 128, 192, 192, 256), fc_width=4096)
SMALL = ModelConfig(num_classes=7, widths=(8, 12, 16, 16, 12), fc_width=32, image_size=67)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_count(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def test_paper_parameter_count_and_summary_agree():
    model = AlexNet(PAPER)
    assert n_params(model) == 60_965_224
    assert sum(r.params_total for r in summarize(PAPER)) == 60_965_224
    # 4.1 GFLOP per training image (issue 6); 724M multiply-adds forward, Caffe's grouped count.
    assert sum(r.macs_total for r in summarize(PAPER)) == 724_406_816
    assert round(training_flops(PAPER) / 1e9, 2) == 4.14
    assert "60,965,224" in format_summary(PAPER)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # layers-145-half: one tower, conv5 and the fc layers at full width.
        (
            ONE_TOWER,
            conv_count(3, 48, 11)
            + conv_count(48, 128, 5)
            + conv_count(128, 192, 3)
            + conv_count(192, 192, 3)
            + conv_count(192, 256, 3)
            + 9216 * 4096
            + 4096
            + 4096 * 4096
            + 4096
            + 4096 * 1000
            + 1000,
        ),
        # layers-150: conv3, fc6 and fc7 read only their own tower.
        (
            dataclasses.replace(PAPER, exchange="fc8_only"),
            2
            * (
                conv_count(3, 48, 11)
                + conv_count(48, 128, 5)
                + conv_count(128, 192, 3)
                + conv_count(192, 192, 3)
                + conv_count(192, 128, 3)
                + 4608 * 2048
                + 2048
                + 2048 * 2048
                + 2048
            )
            + 4096 * 1000
            + 1000,
        ),
        # layers-147 (non-overlapping pooling) and layers-148 (no LRN) keep the weights.
        (dataclasses.replace(PAPER, pool="non_overlapping"), 60_965_224),
        (dataclasses.replace(PAPER, lrn=False), 60_965_224),
        (dataclasses.replace(PAPER, image_size=227, pad_right_bottom=0), 60_965_224),
    ],
    ids=["one_tower", "fc8_only", "non_overlapping", "no_lrn", "input227"],
)
def test_variant_parameter_counts(cfg, expected):
    assert n_params(AlexNet(cfg)) == expected
    assert sum(r.params_total for r in summarize(cfg)) == expected


@pytest.mark.parametrize("cfg", [PAPER, dataclasses.replace(PAPER, pool="non_overlapping")])
def test_feature_map_sides(cfg):
    """55/27/13/13/6 per PAPER.md §1, checked on the real modules with hooks."""
    model = AlexNet(dataclasses.replace(cfg, num_classes=10)).eval()
    tower = model.towers["0"]
    seen = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        getattr(tower, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:]))
        )
    # fc6 is called with every tower's part (its exchange is inside the layer): widths add up.
    tower.fc6.register_forward_hook(
        lambda m, i, o: seen.__setitem__("fc6_in", sum(part.shape[1] for part in i[0]))
    )
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 10)
    assert seen["conv1"] == (48, 55, 55)
    assert seen["conv2"] == (128, 27, 27)
    assert seen["conv3"] == (192, 13, 13) and seen["conv5"] == (128, 13, 13)
    assert seen["fc6_in"] == 2 * 128 * 6 * 6  # both towers' 4608 features


def test_input227_matches_padded224():
    """The original code's 224 + right/bottom zero pad equals a 227 input with those zeros."""
    a = AlexNet(SMALL).eval()
    b = AlexNet(dataclasses.replace(SMALL, image_size=70, pad_right_bottom=0)).eval()
    b.load_full_state_dict(a.full_state_dict())
    x = torch.randn(2, 3, 67, 67)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3))
    torch.testing.assert_close(a(x), b(padded), rtol=0, atol=0)


def test_initialization_statistics():
    """§5: weights N(0, 0.01); biases 1 for conv2, conv4, conv5, fc6, fc7; 0 elsewhere."""
    model = AlexNet(PAPER)
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for t, tower in model.towers.items():
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
            layer = getattr(tower, name)
            w = layer.weight.detach()
            # 17k+ samples per layer: the std estimate is within 2% of 0.01.
            assert abs(w.std().item() - 0.01) < 2e-4, (t, name, w.std().item())
            assert abs(w.mean().item()) < 5e-4, (t, name)
            assert torch.all(layer.bias == (1.0 if name in ones else 0.0)), (t, name)
    # The towers are different draws, not copies.
    assert not torch.equal(model.towers["0"].conv1.weight, model.towers["1"].conv1.weight)


def test_original_code_init_std_for_conv3_to_conv5():
    model = AlexNet(dataclasses.replace(PAPER, conv345_init_std=0.03, num_classes=10))
    tower = model.towers["1"]
    for name, std in (("conv2", 0.01), ("conv3", 0.03), ("conv4", 0.03), ("conv5", 0.03)):
        assert abs(getattr(tower, name).weight.std().item() - std) < std * 0.03, name


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = AlexNet(SMALL, seed=3), AlexNet(SMALL, seed=3), AlexNet(SMALL, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith("weight"))
    assert not torch.equal(sa["towers.0.fc6.weight"], sc["towers.0.fc6.weight"])


def test_split_classes_uneven():
    assert split_classes(1000, 2) == [500, 500]
    assert split_classes(5, 2) == [3, 2]
    assert split_classes(5, 1) == [5]


def test_grouped_round_trip_and_caffe_shapes():
    model = AlexNet(PAPER)
    grouped = model.grouped_state_dict()
    shapes = {k: tuple(v.shape) for k, v in grouped.items() if k.endswith("weight")}
    assert shapes == {
        "conv1.weight": (96, 3, 11, 11),
        "conv2.weight": (256, 48, 5, 5),
        "conv3.weight": (384, 256, 3, 3),
        "conv4.weight": (384, 192, 3, 3),
        "conv5.weight": (256, 192, 3, 3),
        "fc6.weight": (4096, 9216),
        "fc7.weight": (4096, 4096),
        "fc8.weight": (1000, 4096),
    }
    # Tower 0's channels come first.
    assert torch.equal(grouped["conv2.weight"][128:], model.towers["1"].conv2.weight)
    other = AlexNet(PAPER, seed=9)
    other.load_grouped_state_dict(grouped)
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(other.state_dict()[k], v), k


def test_grouped_fc8_with_odd_classes():
    model = AlexNet(dataclasses.replace(SMALL, num_classes=5)).eval()
    grouped = model.grouped_state_dict()
    assert grouped["fc8.weight"].shape == (5, 64)
    x = torch.randn(3, 3, 67, 67)
    fresh = AlexNet(dataclasses.replace(SMALL, num_classes=5), seed=1).eval()
    fresh.load_grouped_state_dict(grouped)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 227, 227), r"\(batch, 3, 224, 224\).*got \(2, 3, 227, 227\)"),
        ((2, 1, 224, 224), r"\(batch, 3, 224, 224\).*got \(2, 1, 224, 224\)"),
        ((3, 224, 224), r"got \(3, 224, 224\)"),
    ],
)
def test_wrong_input_shape_is_named(shape, match):
    model = AlexNet(dataclasses.replace(PAPER, num_classes=10))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


def test_integer_images_rejected():
    model = AlexNet(SMALL)
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 67, 67, dtype=torch.uint8))


def test_too_small_image_size_is_named():
    with pytest.raises(ValueError, match="model.image_size=40"):
        AlexNet(dataclasses.replace(SMALL, image_size=40))


def test_bad_state_dicts_are_named():
    model = AlexNet(SMALL)
    full = model.full_state_dict()
    missing = {k: v for k, v in full.items() if k != "towers.1.fc7.bias"}
    with pytest.raises(ValueError, match=r"missing \['towers.1.fc7.bias'\]"):
        model.load_full_state_dict(missing)
    extra = dict(full, **{"towers.2.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['towers.2.conv1.weight'\]"):
        model.load_full_state_dict(extra)
    wrong = dict(full, **{"towers.0.conv2.weight": torch.zeros(12, 8, 3, 3)})
    with pytest.raises(
        ValueError, match=r"towers.0.conv2.weight has shape \(12, 8, 3, 3\).*\(12, 8, 5, 5\)"
    ):
        model.load_full_state_dict(wrong)
    grouped = model.grouped_state_dict()
    grouped["fc8.weight"] = torch.zeros(8, 64)
    with pytest.raises(ValueError, match=r"fc8.weight has shape \(8, 64\), expected \(7, 64\)"):
        model.load_grouped_state_dict(grouped)
    del grouped["conv1.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['conv1.bias'\]"):
        model.load_grouped_state_dict(grouped)


def test_dropout_counter_travels_in_state_dict():
    model = AlexNet(SMALL).train()
    model(torch.randn(2, 3, 67, 67))
    model(torch.randn(2, 3, 67, 67))
    state = model.full_state_dict()
    assert state["towers.0._extra_state"] == {"dropout_draws": 2}
    fresh = AlexNet(SMALL)
    fresh.load_full_state_dict(state)
    assert fresh.towers["1"].dropout_draws == 2


@pytest.mark.parametrize(
    "argv, flops",
    [
        ((), "training 4.14 GFLOP"),
        (("model.towers=1",), "training 1.76 GFLOP"),
        (("MODEL_ONLY",), "training 1.76 GFLOP"),
    ],
)
def test_summary_command_without_a_config_is_the_papers_net(argv, flops, tmp_path):
    """`python launch/summary.py [overrides]`: the paper's net (it asked for a data folder),
    and a config of the model alone (it was refused for naming no data folder)."""
    import subprocess
    import sys
    from pathlib import Path

    if argv == ("MODEL_ONLY",):
        (tmp_path / "model.yaml").write_text("model: {towers: 1}\n")
        argv = (str(tmp_path / "model.yaml"),)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "launch" / "summary.py"), *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert flops in result.stdout
