"""The two-tower net under "one weird trick" (PAPER.md §7): convolutions per rank, fc6-fc8 split.

Each of K ranks holds both towers' conv1-conv5 and runs them on its own b images, as one
process does; fc6, fc7 and fc8 are each split into K shares of the WHOLE layer's output units
(tower 0's rows first, as in the grouped Caffe layout), so with K = 4 rank 0 holds the first
half of tower 0's fc6 rows and nothing of tower 1's, and with 10 classes rank 1 holds fc8
rows 3-5 of tower 0 and row 0 of tower 1:

    conv1 ... pool5, both towers, own images          (b, 128, 6, 6) per tower
    cat towers, == gather along the batch ==          (K*b, 9216)
    fc6 share -> ReLU -> dropout                      (K*b, 4096/K)
    == gather along the units ==                      (K*b, 4096)
    fc7 share -> ReLU -> dropout, == gather ==        (K*b, 4096)
    fc8 share, == gather along the classes ==         (K*b, classes) on every rank

Parameter names are the one-process names (`towers.<t>.<layer>.<weight|bias>`); an fc tensor
holds this rank's rows of that tower's layer, possibly none (shape (0, in)), so every rank
has the same names and `full_state_dict` concatenates the rows in rank order into the
one-process state: a checkpoint moves between this form, 'towers' and one process. Like
model.py, this file has no ranks in it: the layout says which share a process holds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from repro.config import ModelConfig
from repro.net.dist import Layout, single_process_layout
from repro.net.hybrid import (
    gather_batch_for_split_layer,
    gather_units_for_replicated,
    gather_units_for_split_layer,
)
from repro.net.layers import mask_seed, tower_dropout
from repro.net.model import LAYERS, AlexNet, Tower, layer_shapes, split_classes

SPLIT = ("fc6", "fc7", "fc8")
"""The layers split by output units across the ranks; conv1-conv5 are whole on every rank."""


def is_split(key: str) -> bool:
    """'towers.0.fc6.weight' -> True: a state entry that holds only this rank's rows."""
    parts = key.split(".")
    return len(parts) > 2 and parts[2] in SPLIT


class HybridAlexNet(AlexNet):
    """`forward(b images) -> (K*b, classes)` logits of every rank's images, on every rank."""

    shares: dict[str, list[int]] | None = None
    """Units of each whole fc layer per rank (None while AlexNet.__init__ builds whole towers)."""

    def __init__(self, cfg: ModelConfig, layout: Layout, seed: int = 0):
        if layout.towers != cfg.towers or layout.tower_group is not None:
            raise ValueError(
                f"the hybrid net holds all {cfg.towers} towers' convolutions on every rank; "
                f"got a layout with {layout.towers} tower(s) and a tower group"
            )
        # Whole towers first, drawn exactly as one process draws them (§5), then cut down: the
        # whole fc layers live for the length of this call only.
        super().__init__(cfg, single_process_layout(cfg.towers), seed)
        self.layout = layout
        whole = {"fc6": cfg.fc_width * cfg.towers, "fc7": cfg.fc_width * cfg.towers}
        whole["fc8"] = cfg.num_classes
        self.shares = {name: split_classes(n, layout.replicas) for name, n in whole.items()}
        with torch.no_grad():
            for t, tower in self.towers.items():
                for name in SPLIT:
                    self._keep_own_rows(getattr(tower, name), name, int(t))

    def _keep_own_rows(self, layer: nn.Linear, name: str, t: int) -> None:
        start, stop = self.rows(name, t)
        first = super().rows(name, t)[0]
        own = slice(start - first, stop - first)
        layer.weight = nn.Parameter(layer.weight[own].clone())  # (rows here, in)
        layer.bias = nn.Parameter(layer.bias[own].clone())
        layer.out_features = stop - start

    def rows(self, name: str, tower: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of the whole layer that belong to tower `tower`.

        Used by reset_parameters and load_grouped_state_dict, so both fill only the own rows.
        """
        start, stop = super().rows(name, tower)
        if self.shares is None or name not in SPLIT:
            return start, stop
        k, sizes = self.layout.replica, self.shares[name]
        lo, hi = max(start, sum(sizes[:k])), min(stop, sum(sizes[: k + 1]))
        return lo, max(lo, hi)

    # -- the network ---------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        self.check_input(images)
        towers = list(self.towers.values())
        p = self.cfg.pad_right_bottom
        x = F.pad(images, (0, p, 0, p)) if p else images  # (b, 3, 227, 227)
        h = [t.block1(x) for t in towers]  # (b, 48, 27, 27) per tower
        h = [t.block2(a) for t, a in zip(towers, h)]  # (b, 128, 13, 13)
        h = [F.relu(a) for a in self.linked(h, "conv3")]  # both towers here: (b, 192, 13, 13)
        h = [F.relu(t.conv4(a)) for t, a in zip(towers, h)]
        h = [t.pool(F.relu(t.conv5(a))) for t, a in zip(towers, h)]  # (b, 128, 6, 6)
        x = torch.cat([a.flatten(1) for a in h], dim=1)  # (b, 9216), tower 0's features first
        x = gather_batch_for_split_layer(x, self.layout)  # (K*b, 9216): every rank's images
        h = [self.dropout(F.relu(self.fc(t, "fc6", x)), t, 6) for t in towers]
        x = gather_units_for_split_layer(torch.cat(h, 1), self.layout, self.shares["fc6"])
        h = [self.dropout(F.relu(self.fc(t, "fc7", x)), t, 7) for t in towers]
        x = gather_units_for_split_layer(torch.cat(h, 1), self.layout, self.shares["fc7"])
        logits = torch.cat([self.fc(t, "fc8", x) for t in towers], 1)  # (K*b, own classes)
        if self.training:
            self.count_draws(towers)
        return gather_units_for_replicated(logits, self.layout, self.shares["fc8"])

    def fc(self, tower: Tower, name: str, x: Tensor) -> Tensor:
        """This rank's rows of `tower`'s layer `name` on the whole (K*b, in) input.

        The layer's own forward takes per-tower parts (repro/net/parallel.py, linked layers);
        here the input is already whole, so its weight and bias are applied directly. fc6/fc7
        read both towers (§3.5); with model.exchange='fc8_only' only their own.
        """
        layer = getattr(tower, name)
        if name != "fc8" and self.cfg.exchange != "paper":
            width = x.shape[1] // self.cfg.towers
            x = x[:, tower.index * width : (tower.index + 1) * width]
        return F.linear(x, layer.weight, layer.bias)

    def dropout(self, h: Tensor, tower: Tower, layer: int) -> Tensor:
        """§4.2 with one process's mask: the tower's mask for all K*b rows, this rank's units.

        `tower_dropout` draws the (K*b, fc_width) mask one process draws for the concatenated
        batch, from the same seed; this rank keeps the columns of its share of the tower.
        """
        if not self.training or self.cfg.dropout == 0 or h.shape[1] == 0:
            return h
        name = f"fc{layer}"
        start = self.rows(name, tower.index)[0] - super().rows(name, tower.index)[0]
        seed = mask_seed(tower.mask_keys[layer], tower.draws)  # as AlexNet.dropout
        ones = h.new_ones((h.shape[0], self.cfg.fc_width))
        mask = tower_dropout(ones, self.cfg.dropout, seed, 0, 1)  # (K*b, fc): 0 or 1/(1-p)
        return h * mask[:, start : start + h.shape[1]]

    # -- state in the one-process form ---------------------------------------------------------

    def gather_shares(self, local: dict) -> dict:
        """Whole tensors from every rank's named shares (a collective): fc rows concatenated in
        rank order; every other entry is the same on every rank and taken from this one."""
        local = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in local.items()}
        if self.layout.replica_group is None:
            return local
        split = {k: v for k, v in local.items() if is_split(k)}
        parts: list[dict | None] = [None] * self.layout.replicas
        dist.all_gather_object(parts, split, group=self.layout.replica_group)
        return {**local, **{k: torch.cat([p[k] for p in parts]) for k in split}}

    def take_shares(self, full: dict) -> dict:
        """This rank's shares of whole named tensors (the inverse of gather_shares)."""
        out = {}
        for key, value in full.items():
            if is_split(key):
                _, t, name, _ = key.split(".")
                start, stop = self.rows(name, int(t))
                first = super().rows(name, int(t))[0]
                value = value[start - first : stop - first]
            out[key] = value
        return out

    def full_state_dict(self) -> dict:
        """Every tower's whole parameters and dropout counters, on every rank (collective)."""
        return self.gather_shares(self.state_dict())

    def load_full_state_dict(self, state: dict) -> None:
        """Load a one-process (whole towers) state dict, keeping this rank's fc rows."""
        expected = self.whole_shapes()
        missing = sorted(set(AlexNet.expected_keys(self.cfg)) - set(state))
        extra = sorted(set(state) - set(AlexNet.expected_keys(self.cfg)))
        if missing or extra:
            raise ValueError(
                "state dict does not fit this model "
                f"({self.cfg.towers} tower(s), {self.cfg.num_classes} classes): "
                f"missing {missing[:6]}, unexpected {extra[:6]}"
            )
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"state dict entry {key} has shape {tuple(state[key].shape)}, "
                    f"this model expects {shape}"
                )
        self.load_state_dict(self.take_shares(state))

    def whole_shapes(self) -> dict[str, tuple[int, ...]]:
        """One process's shape of every parameter: each tower's whole layers."""
        shapes = {}
        for t in range(self.cfg.towers):
            for name in LAYERS:
                start, stop = super().rows(name, t)
                weight = (stop - start, *layer_shapes(self.cfg)[name][1:])
                shapes[f"towers.{t}.{name}.weight"] = weight
                shapes[f"towers.{t}.{name}.bias"] = weight[:1]
        return shapes
