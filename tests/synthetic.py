"""Small non-image tasks made with numpy, for tests that need a real model trained on real
structure without a download: multi-label tone detection in two-channel signals, with a 1-D
convolutional network that has BatchNorm."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FREQUENCIES = (3.0, 7.0, 13.0, 21.0)


def tone_signals(count: int, length: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` signals of shape (2, length): each of the tones in FREQUENCIES is present or not
    (the labels, float 0/1), at a random phase and channel mix, in noise."""
    generator = np.random.default_rng(seed)
    labels = (generator.random((count, len(FREQUENCIES))) < 0.5).astype(np.float32)
    time = np.arange(length) / length
    signals = generator.normal(0, 0.6, (count, 2, length)).astype(np.float32)
    for index, frequency in enumerate(FREQUENCIES):
        phase = generator.uniform(0, 2 * np.pi, (count, 1))
        mix = generator.uniform(0.3, 1.0, (count, 2, 1))
        tone = np.sin(2 * np.pi * frequency * time[None, :] + phase)[:, None, :] * mix
        signals += labels[:, index, None, None] * tone.astype(np.float32)
    return signals, labels


def tone_network(width: int = 16) -> nn.Module:
    """A 1-D CNN with BatchNorm after each convolution, giving one logit per tone."""
    return nn.Sequential(
        nn.Conv1d(2, width, 7, padding=3),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Conv1d(width, 2 * width, 7, padding=3),
        nn.BatchNorm1d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, len(FREQUENCIES)),
    )


def trained_tone_network(signals: np.ndarray, labels: np.ndarray, epochs: int = 4, seed: int = 0) -> nn.Module:
    """tone_network trained with binary cross-entropy (multilabel) on the arrays."""
    import deepshrink

    torch.manual_seed(seed)
    model = tone_network()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(signals), torch.from_numpy(labels))
    loader = deepshrink.make_loader(dataset, 64, shuffle=True, seed=seed)
    config = deepshrink.TrainConfig(epochs=epochs, learning_rate=0.05, seed=seed)
    deepshrink.fit(model, loader, config, task="multilabel", progress=False)
    return model.eval()
