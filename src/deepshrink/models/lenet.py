"""The paper's MNIST reference networks (Han et al. 2016, Tables 2 and 3)."""

from __future__ import annotations

import torch
from torch import nn


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 fully connected network with ReLU, 266,610 parameters."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs.

        Args:
            inputs: a batch whose examples flatten to `in_features` values, e.g. (N, 1, 28, 28).

        Returns:
            Logits, (N, num_classes).
        """
        hidden = torch.relu(self.fc1(inputs.flatten(1)))
        hidden = torch.relu(self.fc2(hidden))
        return self.fc3(hidden)


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10.

    431,080 parameters for 28x28 inputs. Caffe's variant has no activation between the convs
    and the pooling; we add ReLU after each conv, which trains better and adds no parameters.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The network's outputs.

        Args:
            inputs: a batch, (N, in_channels, image_size, image_size).

        Returns:
            Logits, (N, num_classes).
        """
        hidden = torch.max_pool2d(torch.relu(self.conv1(inputs)), 2)
        hidden = torch.max_pool2d(torch.relu(self.conv2(hidden)), 2)
        hidden = torch.relu(self.fc1(hidden.flatten(1)))
        return self.fc2(hidden)
