"""A word-level LSTM language model whose output layer reads its embedding's matrix (tied
weights, as most language models are), compressed as one tensor, against the same trained model
untied into two copies and compressed with the same recipe, in the same run.

The text is real: the Python standard library's own source (the .py files of the running
Python's stdlib, in sorted order, up to --megabytes), cut into words and symbols; the 4,999
most frequent are the vocabulary, the rest one unknown token. The first 90% of the windows
train, the last 10% (other files) test. The task is the next token after 16: top-1 accuracy and
cross-entropy (nats per token) on the test windows.

    .venv/bin/python benchmarks/tied_language_model.py --megabytes 1.5

Prints the machine, the reference's size and metrics, then one line per variant: file bytes,
ratio against the fp32 parameters, and the decoded model's accuracy and cross-entropy.
"""

from __future__ import annotations

import argparse
import collections
import re
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import deepshrink
from deepshrink.runtime.bench import machine_description

WINDOW = 16
VOCABULARY = 5000
TOKEN = re.compile(r"[A-Za-z_]+|\S")


class TiedLanguageModel(nn.Module):
    """Embedding -> LSTM -> the last step's state -> an output layer tied to the embedding."""

    def __init__(self, vocabulary: int = VOCABULARY, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.lstm = nn.LSTM(width, width, batch_first=True)
        self.out = nn.Linear(width, vocabulary)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        states, _ = self.lstm(self.embed(tokens))
        return self.out(states[:, -1])


def corpus(megabytes: float) -> str:
    """The stdlib's .py files in sorted order, up to `megabytes` of text."""
    limit = int(megabytes * 1e6)
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= limit:
            break
    return "".join(parts)[:limit]


def windows(text: str) -> dict:
    words = TOKEN.findall(text)
    counts = collections.Counter(words)
    index = {word: position + 1 for position, (word, _) in enumerate(counts.most_common(VOCABULARY - 1))}
    ids = np.array([index.get(word, 0) for word in words], dtype=np.int64)
    starts = np.arange(len(ids) - WINDOW)
    inputs = ids[starts[:, None] + np.arange(WINDOW)]
    targets = ids[starts + WINDOW]
    cut = int(0.9 * len(starts))
    return {"x": inputs[:cut], "y": targets[:cut], "x_test": inputs[cut:], "y_test": targets[cut:]}


def untied(model: TiedLanguageModel) -> TiedLanguageModel:
    model.out.weight = nn.Parameter(model.embed.weight.detach().clone())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=1.5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--run-dir", default="runs/tied-language-model")
    arguments = parser.parse_args()
    torch.manual_seed(0)
    print(machine_description())
    arrays = windows(corpus(arguments.megabytes))
    data = deepshrink.load_arrays(arrays, validation=0.05)
    print(f"{len(arrays['y']):,} training and {len(arrays['y_test']):,} test windows, vocabulary {VOCABULARY}")
    model = TiedLanguageModel()
    config = deepshrink.TrainConfig(epochs=arguments.epochs, learning_rate=2e-3, optimizer="adam", batch_size=256)
    started = time.perf_counter()
    deepshrink.fit(model, deepshrink.make_loader(data.train, 256, shuffle=True), config, progress=False)
    test = deepshrink.make_loader(data.test, 2000, shuffle=False)
    reference = deepshrink.evaluate(model.eval(), test)
    print(
        f"reference: trained {time.perf_counter() - started:.0f} s; "
        f"{4 * sum(parameter.numel() for parameter in model.parameters()):,} fp32 parameter bytes; "
        f"test top-1 {reference.metric:.4f}, cross-entropy {reference.loss:.4f}"
    )
    recipe = {
        "prune": {"sparsity": {"*": 0.8}, "rounds": 2, "retrain_epochs": 1, "learning_rate": 0.02},
        "quantize": {"bits": {"*": 5}, "finetune_epochs": 1},
        "encode": {"coder": "ans", "unshared": "int8"},
    }
    variants = {"tied (one tensor)": model, "untied (two copies)": untied(TiedLanguageModel())}
    variants["untied (two copies)"].load_state_dict(model.state_dict())  # the same trained values
    for name, variant in variants.items():
        started = time.perf_counter()
        run_dir = Path(arguments.run_dir) / name.split()[0]
        result = deepshrink.run(variant, recipe, data, run_dir=run_dir, progress=False)
        fresh = TiedLanguageModel() if name.startswith("tied") else untied(TiedLanguageModel())
        decoded, _ = deepshrink.load_compressed(result.path, fresh)
        after = deepshrink.evaluate(decoded.eval(), test)
        print(
            f"{name}: {result.file_bytes:,} bytes, {result.ratio:.1f}x of {result.parameter_bytes:,}; test top-1 "
            f"{after.metric:.4f}, cross-entropy {after.loss:.4f}; {time.perf_counter() - started:.0f} s"
        )


if __name__ == "__main__":
    main()
