"""Small architectures, the other road to a small model: designed compact rather than compressed.

- SqueezeNet (Iandola et al. 2016): Fire modules, a 1x1 "squeeze" to few channels feeding
  parallel 1x1 and 3x3 "expand" convolutions, no fully connected layer (a 1x1 conv to the
  classes, then global average pooling). Scaled here to 28x28 inputs.
- MobileNet (Howard et al. 2017): depthwise-separable blocks, a 3x3 depthwise convolution per
  channel followed by a 1x1 pointwise convolution, each with batch norm and ReLU.
- Flattened convolutions (Jin et al. 2015): a C x Y x X filter replaced by a C x 1 x 1
  (pointwise), a 1 x Y x 1 (vertical, per channel) and a 1 x 1 x X (horizontal, per channel)
  filter in sequence, on the LeNet-5 layout.
"""

from __future__ import annotations

import torch
from torch import nn


class Fire(nn.Module):
    """squeeze (1x1, s1x1 channels) -> ReLU -> [expand 1x1 (e1x1) | expand 3x3 (e3x3)] -> ReLU."""

    def __init__(self, in_channels: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The block's output.

        Args:
            inputs: a batch of feature maps, (N, C, H, W).

        Returns:
            The output feature maps.
        """
        squeezed = torch.relu(self.squeeze(inputs))
        return torch.relu(torch.cat([self.expand1x1(squeezed), self.expand3x3(squeezed)], dim=1))


class SqueezeNet(nn.Module):
    """A SqueezeNet for 28x28 images: conv 3x3, four Fire modules, 1x1 conv to classes, average pool."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.fire2 = Fire(32, 16, 32, 32)
        self.fire3 = Fire(64, 16, 32, 32)
        self.fire4 = Fire(64, 32, 64, 64)
        self.fire5 = Fire(128, 32, 64, 64)
        self.dropout = nn.Dropout(0.3)
        self.conv10 = nn.Conv2d(128, num_classes, 1)
        # Without batch norm, PyTorch's default conv init (gain 1/sqrt(3)) shrinks the signal at
        # each of the nine ReLU convolutions until the logits carry no gradient and training sits
        # at chance. He init keeps the variance through the ReLUs; the classifier starts small, as
        # in the original SqueezeNet (Caffe's gaussian 0.01 for conv10).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.conv10.weight, mean=0.0, std=0.01)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs.

        Args:
            inputs: a batch, (N, in_channels, 28, 28).

        Returns:
            Logits, (N, num_classes).
        """
        hidden = torch.max_pool2d(torch.relu(self.conv1(inputs)), 2)  # 14x14
        hidden = torch.max_pool2d(self.fire3(self.fire2(hidden)), 2)  # 7x7
        hidden = self.fire5(self.fire4(hidden))
        return self.conv10(self.dropout(hidden)).mean(dim=(2, 3))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (one filter per channel) + BN + ReLU, then 1x1 pointwise + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pointwise_norm = nn.BatchNorm2d(out_channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The block's output.

        Args:
            inputs: a batch of feature maps, (N, C, H, W).

        Returns:
            The output feature maps.
        """
        hidden = torch.relu(self.depthwise_norm(self.depthwise(inputs)))
        return torch.relu(self.pointwise_norm(self.pointwise(hidden)))


class MobileNet(nn.Module):
    """A MobileNet for 28x28 images: conv 3x3, four depthwise-separable blocks, average pool, fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(32)
        self.blocks = nn.Sequential(
            DepthwiseSeparable(32, 64, stride=2),  # 14x14
            DepthwiseSeparable(64, 128),
            DepthwiseSeparable(128, 128, stride=2),  # 7x7
            DepthwiseSeparable(128, 256),
        )
        self.fc = nn.Linear(256, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs.

        Args:
            inputs: a batch, (N, in_channels, 28, 28).

        Returns:
            Logits, (N, num_classes).
        """
        hidden = self.blocks(torch.relu(self.norm1(self.conv1(inputs))))
        return self.fc(hidden.mean(dim=(2, 3)))


class FlattenedConv(nn.Module):
    """C x 1 x 1 pointwise, then 1 x Y x 1 vertical and 1 x 1 x X horizontal per-channel filters."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.vertical = nn.Conv2d(out_channels, out_channels, (kernel_size, 1), groups=out_channels, bias=False)
        self.horizontal = nn.Conv2d(out_channels, out_channels, (1, kernel_size), groups=out_channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The block's output.

        Args:
            inputs: a batch of feature maps, (N, C, H, W).

        Returns:
            The output feature maps.
        """
        return self.horizontal(self.vertical(self.pointwise(inputs)))


class FlattenedLeNet5(nn.Module):
    """LeNet-5 with both convolutions flattened (20 and 50 channels, 5x5 receptive fields)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = FlattenedConv(in_channels, 20, 5)
        self.conv2 = FlattenedConv(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs.

        Args:
            inputs: a batch, (N, in_channels, 28, 28).

        Returns:
            Logits, (N, num_classes).
        """
        hidden = torch.max_pool2d(torch.relu(self.conv1(inputs)), 2)
        hidden = torch.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        return self.fc2(torch.relu(self.fc1(hidden.flatten(1))))
