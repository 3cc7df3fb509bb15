"""AlexNet as the paper built it: two towers, one per GPU, exchanging at conv3, fc6, fc7, fc8.

Per tower (PAPER.md §1, Figure 2), for a 224 input padded to 227 on the right and bottom:

    conv1 11x11/4, 48  -> ReLU -> LRN -> pool 3/2     (B, 48, 27, 27)   whole image in
    conv2 5x5, 128     -> ReLU -> LRN -> pool 3/2     (B, 128, 13, 13)  own tower only
    == exchange ==     conv3 reads both towers        (B, 256, 13, 13)  §3.5
    conv3 3x3, 192     -> ReLU                        (B, 192, 13, 13)
    conv4 3x3, 192     -> ReLU                        own tower only
    conv5 3x3, 128     -> ReLU -> pool 3/2            (B, 128, 6, 6)    own tower only
    == exchange ==                                    (B, 9216)
    fc6 2048 -> ReLU -> dropout   == exchange ==      (B, 4096)
    fc7 2048 -> ReLU -> dropout   == exchange ==      (B, 4096)
    fc8 classes/2                 == gather ==        (B, classes)      softmax in the loss

A process builds only the towers it holds (all of them in one process, one per rank across
ranks); parameter names (`towers.<t>.<layer>.<weight|bias>`), shapes and initial values are
the same in every layout. The exchanges live in repro/net/parallel.py; this file has no ranks.
A layer that reads every tower (conv3, fc6, fc7, fc8) does its exchange itself: it is called
with every local tower's part (`AlexNet.linked`), and across ranks the transfer overlaps the
layer's own arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from repro.config import ModelConfig
from repro.net.dist import Layout, single_process_layout
from repro.net.layers import (
    ContrastNorm,
    mask_key,
    mask_seed,
    max_pool,
    response_norm,
    spatial_sizes,
    tower_dropout,
)
from repro.net.parallel import LinkedConv2d, LinkedLinear, gather_for_replicated

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def relu(x: Tensor) -> Tensor:
    """§3.1's ReLU, in place: every input it gets here is a fresh layer output that no backward
    reads (a pass over the maps without a new allocation, as torchvision's alexnet does)."""
    return F.relu(x, inplace=True)


ONES_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")  # §5: these biases start at 1, others at 0


def split_classes(num_classes: int, towers: int) -> list[int]:
    """fc8 outputs per tower: as even as possible, tower 0 takes the remainder."""
    base, extra = divmod(num_classes, towers)
    return [base + (1 if t < extra else 0) for t in range(towers)]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-tower weight shape of each layer, (out, in, k, k) or (out, in); fc8's `out` is the largest share."""
    w1, w2, w3, w4, w5 = cfg.widths
    towers, fc = cfg.towers, cfg.fc_width
    linked = cfg.exchange == "paper"
    pool5 = spatial_sizes(cfg)["pool5"]
    return {
        "conv1": (w1, 3, 11, 11),
        "conv2": (w2, w1, 5, 5),
        "conv3": (w3, w2 * towers if linked else w2, 3, 3),
        "conv4": (w4, w3, 3, 3),
        "conv5": (w5, w4, 3, 3),
        "fc6": (fc, w5 * pool5 * pool5 * (towers if linked else 1)),
        "fc7": (fc, fc * towers if linked else fc),
        "fc8": (max(split_classes(cfg.num_classes, towers)), fc * towers),
    }


class Tower(nn.Module):
    """One tower's share of every layer (what one GTX 580 held in 2012)."""

    def __init__(self, cfg: ModelConfig, index: int, seed: int = 0):
        super().__init__()
        self.index = index
        shapes = layer_shapes(cfg)
        # §3.5: conv3, fc6, fc7 and fc8 read every tower (fc8 in every variant).
        linked = {"conv3", "fc6", "fc7", "fc8"} if cfg.exchange == "paper" else {"fc8"}
        for name in LAYERS[:5]:
            out, inp, k, _ = shapes[name]
            pad = {"conv1": 0, "conv2": 2}.get(name, 1)
            geometry = dict(stride=4 if name == "conv1" else 1, padding=pad)
            if name in linked:
                layer = LinkedConv2d(inp, out, k, **geometry, tower=index)
            else:
                layer = nn.Conv2d(inp, out, k, **geometry)
            setattr(self, name, layer)
        outs = {"fc6": cfg.fc_width, "fc7": cfg.fc_width}
        outs["fc8"] = split_classes(cfg.num_classes, cfg.towers)[index]
        for name in LAYERS[5:]:
            inp = shapes[name][1]
            if name in linked:
                setattr(self, name, LinkedLinear(inp, outs[name], tower=index))
            else:
                setattr(self, name, nn.Linear(inp, outs[name]))
        self.norm1, self.norm2 = response_norm(cfg), response_norm(cfg)
        self.cnorm2 = ContrastNorm() if cfg.cnorm2 else nn.Identity()
        self.pool = max_pool(cfg)
        self.norm_before_relu = cfg.lrn_before_relu_conv1
        # Masks drawn so far, a device tensor (a compiled or captured step counts without the
        # host); saved in the state dict as a number, see get_extra_state.
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64), persistent=False)
        self.mask_keys = {layer: mask_key(seed, index, layer) for layer in (6, 7)}

    def block1(self, x: Tensor) -> Tensor:
        """conv1 -> ReLU -> LRN -> pool (§3.1, §3.3, §3.4); the original code normed before the ReLU."""
        x = self.conv1(x)
        x = relu(self.norm1(x)) if self.norm_before_relu else self.norm1(relu(x))
        return self.pool(x)

    def block2(self, x: Tensor) -> Tensor:
        """conv2 -> ReLU -> LRN (-> cnorm2) -> pool."""
        return self.pool(self.cnorm2(self.norm2(relu(self.conv2(x)))))

    @property
    def dropout_draws(self) -> int:
        return int(self.draws)

    def get_extra_state(self) -> dict:
        return {"dropout_draws": self.dropout_draws}

    def set_extra_state(self, state: dict) -> None:
        self.draws.fill_(int(state["dropout_draws"]))


class AlexNet(nn.Module):
    """The two-tower net; `forward(images) -> logits` over all classes on every rank."""

    def __init__(self, cfg: ModelConfig, layout: Layout | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layout = layout or single_process_layout(cfg.towers)
        if self.layout.towers != cfg.towers:
            raise ValueError(
                f"layout has {self.layout.towers} towers but model.towers={cfg.towers}"
            )
        self.seed = seed
        self.sizes = spatial_sizes(cfg)
        # Built on the meta device and filled by reset_parameters: PyTorch's default init of
        # 60M weights would cost seconds only to be overwritten.
        with torch.device("meta"):
            towers = nn.ModuleDict({str(t): Tower(cfg, t, seed) for t in self.layout.local_towers})
        self.towers = towers.to_empty(device="cpu")
        for tower in self.towers.values():
            tower.draws.zero_()
        self.class_split = split_classes(cfg.num_classes, cfg.towers)
        self.reset_parameters()

    # -- the network, as Figure 2 draws it ------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        self.check_input(images)
        towers = list(self.towers.values())
        p = self.cfg.pad_right_bottom
        x = (
            F.pad(images, (0, p, 0, p)) if p else images
        )  # (B, 3, 227, 227): the original code's ceil
        h = [t.block1(x) for t in towers]  # (B, 48, 27, 27) per tower: both see the whole image
        h = [t.block2(a) for t, a in zip(towers, h)]  # (B, 128, 13, 13): own tower only
        h = [relu(a) for a in self.linked(h, "conv3")]  # §3.5: reads both towers' 128 maps
        h = [relu(t.conv4(a)) for t, a in zip(towers, h)]  # (B, 192, 13, 13): own tower only
        h = [t.pool(relu(t.conv5(a))) for t, a in zip(towers, h)]  # (B, 128, 6, 6)
        h = self.linked([a.flatten(1) for a in h], "fc6")  # fc6 reads both towers' 4608: (B, 2048)
        h = [self.dropout(relu(a), t, 6) for t, a in zip(towers, h)]  # (B, 2048)
        h = self.linked(h, "fc7")  # fc7 reads both towers' 2048: (B, 2048)
        h = [self.dropout(relu(a), t, 7) for t, a in zip(towers, h)]  # (B, 2048)
        logits = self.linked(h, "fc8")  # in every variant: (B, classes/2) per tower
        if self.training:
            self.count_draws(towers)
        return gather_for_replicated(logits, self.layout, self.class_split)  # (B, classes)

    def linked(self, parts: list[Tensor], name: str) -> list[Tensor]:
        """Layer `name` of every local tower; a cross-tower layer reads every tower's part.

        The exchange happens inside such a layer (repro/net/parallel.py: across ranks the
        transfer overlaps the layer's own arithmetic). With model.exchange='fc8_only'
        (layers-150) conv3, fc6 and fc7 are plain layers that read their own tower.
        """
        layers = [getattr(t, name) for t in self.towers.values()]
        if isinstance(layers[0], (LinkedConv2d, LinkedLinear)):
            return [layer(parts, self.layout) for layer in layers]
        return [layer(a) for layer, a in zip(layers, parts)]

    def dropout(self, h: Tensor, tower: Tower, layer: int) -> Tensor:
        """§4.2 dropout drawn by the tower that owns the neurons, before the exchange."""
        if not self.training or self.cfg.dropout == 0:
            return h
        seed = mask_seed(tower.mask_keys[layer], tower.draws)  # a device tensor: traceable
        return tower_dropout(h, self.cfg.dropout, seed, self.layout.replica, self.layout.replicas)

    def count_draws(self, towers: list[Tower]) -> None:
        """One more mask drawn per tower (the dropout seeds' coordinate; saved in checkpoints)."""
        for t in towers:
            t.draws.add_(1)  # in place on the device: no host sync, no recompile

    def check_input(self, images: Tensor) -> None:
        s = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (s, s):
            raise ValueError(
                f"AlexNet expects images of shape (batch, 3, {s}, {s}) "
                f"(model.image_size={s}), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"AlexNet expects floating-point images, got {images.dtype}")

    # -- initialization (§5), identical in every layout -------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """§5: weights N(0, 0.01), biases 1 for conv2, conv4, conv5, fc6, fc7, else 0.

        Each layer is drawn in full (both towers) from a generator seeded by (seed, layer)
        and sliced, so one process and two ranks start from the same numbers.
        """
        for index, name in enumerate(LAYERS):
            std = (
                self.cfg.conv345_init_std
                if name in ("conv3", "conv4", "conv5")
                else self.cfg.init_std
            )
            full = self.full_shape(name)
            gen = torch.Generator().manual_seed(self.seed * 1000 + index)
            weight = torch.randn(full, generator=gen) * std
            bias = self.cfg.bias_one if name in ONES_BIAS else 0.0
            for t, tower in self.towers.items():
                start, stop = self.rows(name, int(t))
                layer = getattr(tower, name)
                layer.weight.copy_(weight[start:stop])
                layer.bias.fill_(bias)

    def full_shape(self, name: str) -> tuple[int, ...]:
        """The whole layer's weight shape, towers stacked on dim 0 (the grouped Caffe layout)."""
        shape = layer_shapes(self.cfg)[name]
        rows = self.cfg.num_classes if name == "fc8" else shape[0] * self.cfg.towers
        return (rows, *shape[1:])

    def rows(self, name: str, tower: int) -> tuple[int, int]:
        """Tower `tower`'s rows [start, stop) of the whole layer's weight."""
        if name == "fc8":
            start = sum(self.class_split[:tower])
            return start, start + self.class_split[tower]
        per = layer_shapes(self.cfg)[name][0]
        return tower * per, (tower + 1) * per

    # -- state in every layout ----------------------------------------------------------------

    def full_state_dict(self) -> dict:
        """Every tower's parameters and dropout counters, on every rank (collective)."""
        from repro.net.parallel import gather_named_tensors

        return gather_named_tensors(self.state_dict(), self.layout)

    def load_full_state_dict(self, state: dict) -> None:
        """Load a full (all towers) state dict, taking this process's towers' entries.

        Missing, unexpected or misshapen entries raise an error naming them and the expected shape.
        """
        expected = AlexNet.expected_keys(self.cfg)
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(
                "state dict does not fit this model "
                f"({self.cfg.towers} tower(s), {self.cfg.num_classes} classes): "
                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}"
            )
        own = self.state_dict()
        for key, value in own.items():
            if isinstance(value, Tensor) and tuple(state[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"state dict entry {key} has shape {tuple(state[key].shape)}, "
                    f"this model expects {tuple(value.shape)}"
                )
        self.load_state_dict({k: state[k] for k in own})

    @staticmethod
    def expected_keys(cfg: ModelConfig) -> list[str]:
        keys = []
        for t in range(cfg.towers):
            keys += [f"towers.{t}.{n}.{p}" for n in LAYERS for p in ("weight", "bias")]
            keys.append(f"towers.{t}._extra_state")
        return keys

    # -- the grouped interchange layout (Caffe bvlc_alexnet) -------------------------------

    def grouped_state_dict(self) -> dict[str, Tensor]:
        """{conv1.weight: (96, 3, 11, 11), ..., fc8.bias: (classes,)}, tower 0's rows first.

        Collective across ranks: every rank gets the whole dict.
        """
        full = self.full_state_dict()
        return {
            f"{name}.{p}": torch.cat(
                [full[f"towers.{t}.{name}.{p}"] for t in range(self.cfg.towers)], dim=0
            )
            for name in LAYERS
            for p in ("weight", "bias")
        }

    @torch.no_grad()
    def load_grouped_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load the grouped layout, slicing each layer's rows for this process's towers."""
        expected = {f"{n}.{p}" for n in LAYERS for p in ("weight", "bias")}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise ValueError(f"grouped state dict: missing keys {missing}, unexpected keys {extra}")
        for name in LAYERS:
            full = self.full_shape(name)
            for p, shape in (("weight", full), ("bias", full[:1])):
                got = tuple(state[f"{name}.{p}"].shape)
                if got != shape:
                    raise ValueError(
                        f"grouped state dict: {name}.{p} has shape {got}, expected {shape}"
                    )
            for t, tower in self.towers.items():
                start, stop = self.rows(name, int(t))
                layer = getattr(tower, name)
                layer.weight.copy_(state[f"{name}.weight"][start:stop])
                layer.bias.copy_(state[f"{name}.bias"][start:stop])
