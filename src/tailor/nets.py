"""Static networks: the plain nn.Modules that a subnet is extracted to, retrained and exported.

One block class (`MBConv`) and one network class (`StaticNet`) serve every architecture; the
supernet's elastic blocks (supernet.py) copy their active slices into these.
"""
from __future__ import annotations

import torch
from torch import nn

from tailor.space import Arch, SearchSpace, mid_channels, se_channels

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = torch.relu(self.reduce(s))
        return x * nn.functional.hardsigmoid(self.expand(s))


class MBConv(nn.Module):
    """Inverted bottleneck: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project, residual if shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, kernel: int, mid: int, se: bool, act: str,
                 expand_conv: bool = True):
        super().__init__()
        Act = ACTIVATIONS[act]
        self.expand = nn.Sequential(*conv_bn(cin, mid, 1), Act()) if expand_conv else nn.Identity()
        self.depthwise = nn.Sequential(*conv_bn(mid, mid, kernel, stride, groups=mid), Act())
        self.se = SqueezeExcite(mid, se_channels(mid)) if se else nn.Identity()
        self.project = nn.Sequential(*conv_bn(mid, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class Stem(nn.Module):
    """Stem conv and the fixed first block: identical in every architecture of the space."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        c = space.cfg
        self.conv = nn.Sequential(*conv_bn(3, c.stem_channels, 3, c.stem_stride), nn.Hardswish())
        self.first = MBConv(c.stem_channels, c.first_block_channels, 1, 3, c.stem_channels, False, "relu",
                            expand_conv=False)

    def forward(self, x):
        return self.first(self.conv(x))


class Head(nn.Module):
    """Final 1x1 expansion, global pooling, feature mixer and classifier (MobileNetV3's head)."""

    def __init__(self, space: SearchSpace, num_classes: int):
        super().__init__()
        c = space.cfg
        self.final = nn.Sequential(*conv_bn(c.widths[-1], c.final_expand_channels, 1), nn.Hardswish())
        self.features = nn.Sequential(nn.Linear(c.final_expand_channels, c.feature_channels), nn.Hardswish())
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.feature_channels, num_classes)

    def forward(self, x):
        x = self.final(x).mean((2, 3))  # (N, C, H, W) -> (N, C)
        return self.classifier(self.dropout(self.features(x)))


class StaticNet(nn.Module):
    """One architecture of the space as a plain module: normalised NCHW float -> logits."""

    def __init__(self, space: SearchSpace, arch: Arch, num_classes: int):
        super().__init__()
        space.validate(arch)
        self.arch = str(arch)
        self.stem = Stem(space)
        self.blocks = nn.Sequential(*[
            MBConv(cin, cout, s, k, mid_channels(cin, e), space.cfg.se[i], space.cfg.activations[i])
            for i, _, cin, cout, s, _, k, e in space.block_shapes(arch)])
        self.head = Head(space, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def count_madds(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of every Conv2d and Linear, counted with forward hooks on a real forward pass."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
