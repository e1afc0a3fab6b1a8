"""The search space: `Arch` values, sampling, encodings and analytic MAdds.

An architecture is data: per elastic unit, the (kernel, expand) of each block that runs. Its
string form, e.g. ``k3e4.k5e6_k7e3.k3e3.k5e4_...`` (units split by ``_``, blocks by ``.``), is the
key used everywhere (LUT, predictor, reports, model names).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

from tailor.config import SpaceConfig

Block = tuple[int, int]  # (kernel, expand ratio)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` (never below 90% of v), as MobileNet does."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def conv_out(size: int, stride: int) -> int:
    # 'same' padding (k // 2) with odd kernels: the output size does not depend on the kernel.
    return (size - 1) // stride + 1


_BLOCK_RE = re.compile(r"^k(\d+)e(\d+)$")


@dataclass(frozen=True)
class Arch:
    units: tuple[tuple[Block, ...], ...]

    def __str__(self) -> str:
        return "_".join(".".join(f"k{k}e{e}" for k, e in unit) for unit in self.units)

    @classmethod
    def parse(cls, s: str) -> "Arch":
        units = []
        for u in s.strip().split("_"):
            blocks = []
            for b in u.split("."):
                m = _BLOCK_RE.match(b)
                if not m:
                    raise ValueError(f"bad architecture string {s!r}: block {b!r} is not of the form k<kernel>e<expand>")
                blocks.append((int(m.group(1)), int(m.group(2))))
            units.append(tuple(blocks))
        return cls(tuple(units))

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(u) for u in self.units)

    def blocks(self):
        """(unit index, block index, kernel, expand) for every block that runs."""
        for i, unit in enumerate(self.units):
            for j, (k, e) in enumerate(unit):
                yield i, j, k, e


class SearchSpace:
    """A SpaceConfig at a given input resolution: what is legal, how big, how costly."""

    def __init__(self, cfg: SpaceConfig, image_size: int):
        self.cfg = cfg
        self.image_size = image_size
        self.n_units = len(cfg.widths)
        self.max_depth = max(cfg.depths)

    # ------------------------------------------------------------ legality and sampling
    def validate(self, arch: Arch) -> Arch:
        c = self.cfg
        if len(arch.units) != self.n_units:
            raise ValueError(f"architecture {arch} has {len(arch.units)} units, the space has {self.n_units}")
        for i, unit in enumerate(arch.units):
            if len(unit) not in c.depths:
                raise ValueError(f"architecture {arch}: unit {i} has depth {len(unit)}, allowed {c.depths}")
            for k, e in unit:
                if k not in c.kernels or e not in c.expands:
                    raise ValueError(f"architecture {arch}: block k{k}e{e} in unit {i} is outside kernels "
                                     f"{c.kernels} / expands {c.expands}")
        return arch

    def sample(self, rng: random.Random, kernels=None, depths=None, expands=None) -> Arch:
        """Uniform over the (possibly restricted) choices, independently per unit and block."""
        kernels, depths, expands = kernels or self.cfg.kernels, depths or self.cfg.depths, expands or self.cfg.expands
        return Arch(tuple(
            tuple((rng.choice(kernels), rng.choice(expands)) for _ in range(rng.choice(depths)))
            for _ in range(self.n_units)))

    def uniform(self, depth: int, kernel: int, expand: int) -> Arch:
        return Arch(tuple(tuple((kernel, expand) for _ in range(depth)) for _ in range(self.n_units)))

    @cached_property
    def max_arch(self) -> Arch:
        return self.uniform(max(self.cfg.depths), max(self.cfg.kernels), max(self.cfg.expands))

    @cached_property
    def min_arch(self) -> Arch:
        return self.uniform(min(self.cfg.depths), min(self.cfg.kernels), min(self.cfg.expands))

    @cached_property
    def mid_arch(self) -> Arch:
        mid = lambda v: v[len(v) // 2]  # noqa: E731
        return self.uniform(mid(self.cfg.depths), mid(self.cfg.kernels), mid(self.cfg.expands))

    # ------------------------------------------------------------ encoding
    def encode(self, arch: Arch) -> list[float]:
        """Fixed-length one-hot encoding (inactive block slots are all zero), for predictors."""
        c = self.cfg
        out: list[float] = []
        for unit in arch.units:
            out += [float(len(unit) == d) for d in c.depths]
            for j in range(self.max_depth):
                k, e = unit[j] if j < len(unit) else (None, None)
                out += [float(k == x) for x in c.kernels] + [float(e == x) for x in c.expands]
        return out

    @property
    def encoding_size(self) -> int:
        c = self.cfg
        return self.n_units * (len(c.depths) + self.max_depth * (len(c.kernels) + len(c.expands)))

    # ------------------------------------------------------------ shapes and cost
    def unit_geometry(self):
        """(in_channels, out_channels, stride, input resolution) of each unit's first block."""
        c = self.cfg
        size = conv_out(self.image_size, c.stem_stride)
        cin = c.first_block_channels
        for w, s in zip(c.widths, c.strides):
            yield cin, w, s, size
            size = conv_out(size, s)
            cin = w

    @property
    def final_resolution(self) -> int:
        size = conv_out(self.image_size, self.cfg.stem_stride)
        for s in self.cfg.strides:
            size = conv_out(size, s)
        return size

    def block_shapes(self, arch: Arch):
        """For every running block: (unit, block, in_ch, out_ch, stride, in_res, kernel, expand)."""
        geo = list(self.unit_geometry())
        for i, j, k, e in arch.blocks():
            cin, cout, s, res = geo[i]
            if j > 0:
                cin, s, res = cout, 1, conv_out(res, s)
            yield i, j, cin, cout, s, res, k, e

    def madds(self, arch: Arch, num_classes: int) -> int:
        """Multiply-adds of convolutions and linear layers (what the hook counter counts)."""
        return self.fixed_madds(num_classes) + sum(
            block_madds(cin, cout, s, res, k, e, self.cfg.se[i]) for i, _, cin, cout, s, res, k, e in self.block_shapes(arch))

    def fixed_madds(self, num_classes: int) -> int:
        """Stem, first block, final expand, feature mixer and classifier: the same for every Arch."""
        c = self.cfg
        r = conv_out(self.image_size, c.stem_stride)
        stem = r * r * c.stem_channels * 3 * 9
        first = r * r * c.stem_channels * 9 + r * r * c.stem_channels * c.first_block_channels
        f = self.final_resolution
        final = f * f * c.widths[-1] * c.final_expand_channels
        head = c.final_expand_channels * c.feature_channels + c.feature_channels * num_classes
        return stem + first + final + head


def mid_channels(cin: int, expand: int) -> int:
    return make_divisible(cin * expand)


def se_channels(mid: int) -> int:
    return make_divisible(mid // 4)


def block_madds(cin: int, cout: int, stride: int, res: int, kernel: int, expand: int, se: bool) -> int:
    mid = mid_channels(cin, expand)
    out = conv_out(res, stride)
    m = res * res * cin * mid + out * out * mid * kernel * kernel + out * out * mid * cout
    if se:
        m += 2 * mid * se_channels(mid)
    return m
