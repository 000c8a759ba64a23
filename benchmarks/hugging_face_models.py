"""Hugging Face transformers models, compressed as users bring them: a GPT-2 language model
(its output layer tied to its token embedding, its layers GPT-2's own Conv1D) and a BERT
sequence classifier, each called with token ids and an attention mask and returning a
ModelOutput whose `logits` the task scores.

The models are transformers' own classes at small sizes, initialised here (nothing is
downloaded) and trained on real text: the Python standard library's source, cut into words and
symbols as `tied_language_model.py` does (a 4,999-word vocabulary and one unknown token).
- GPT-2: windows of 12 to 32 tokens, padded to 32 (attention mask 0 there); each position's
  label is the next token, -100 past the window's end (task token-classification).
- BERT: windows of 12 to 32 tokens from eight of the library's largest files; the label is the
  file (task classification).
Each data set trains on the first 85% of its text and tests on the rest (other code).

    pip install transformers==5.25.0      # not a dependency of deepshrink; only this benchmark needs it
    .venv/bin/python benchmarks/hugging_face_models.py

Prints the machine, then for each model: its fp32 parameter bytes, the reference's test metric,
and the compressed file's bytes, ratio, test metric (decoded from the file) and the run's time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

import deepshrink
from deepshrink.runtime.bench import machine_description
from deepshrink.train import select_output

sys.path.insert(0, str(Path(__file__).parent))
from tied_language_model import TOKEN, VOCABULARY, corpus  # noqa: E402

LENGTH = 32
PAD = 0  # the unknown token's id doubles as padding; the mask keeps it out


def _ids(words: list[str], index: dict[str, int]) -> np.ndarray:
    return np.array([index.get(word, 0) for word in words], dtype=np.int64)


def _vocabulary(text: str) -> dict[str, int]:
    counts = collections.Counter(TOKEN.findall(text))
    return {word: position + 1 for position, (word, _) in enumerate(counts.most_common(VOCABULARY - 1))}


def _padded_windows(ids: np.ndarray, count: int, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` windows of `ids`, 12 to LENGTH tokens each, padded; and their attention masks."""
    starts = generator.integers(0, len(ids) - LENGTH - 1, count)
    lengths = generator.integers(12, LENGTH + 1, count)
    windows = ids[starts[:, None] + np.arange(LENGTH + 1)]
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int64)
    return windows, mask


def language_model_data(text: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """Next-token prediction at every position of padded windows; -100 labels the padding."""
    ids = _ids(TOKEN.findall(text), _vocabulary(text))
    cut = int(0.85 * len(ids))
    generator = np.random.default_rng(seed)
    arrays = {}
    for split, part, number in (("x", ids[:cut], count), ("x_test", ids[cut:], count // 4)):
        windows, mask = _padded_windows(part, number, generator)
        inputs = np.where(mask == 1, windows[:, :LENGTH], PAD)
        labels = np.where(mask == 1, windows[:, 1:], -100)
        arrays[f"{split}.input_ids"], arrays[f"{split}.attention_mask"] = inputs, mask
        arrays["y" if split == "x" else "y_test"] = labels
    return arrays


def classification_data(count: int, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Which of eight large stdlib files a window comes from."""
    files = sorted(
        (path for path in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")),
        key=lambda path: -path.stat().st_size,
    )[:8]
    texts = [path.read_text(errors="replace") for path in files]
    index = _vocabulary("".join(texts))
    generator = np.random.default_rng(seed)
    parts: dict[str, list] = collections.defaultdict(list)
    for label, text in enumerate(texts):
        ids = _ids(TOKEN.findall(text), index)
        cut = int(0.85 * len(ids))
        for split, part, number in (("x", ids[:cut], count // 8), ("x_test", ids[cut:], count // 32)):
            windows, mask = _padded_windows(part, number, generator)
            parts[f"{split}.input_ids"].append(np.where(mask == 1, windows[:, :LENGTH], PAD))
            parts[f"{split}.attention_mask"].append(mask)
            parts["y" if split == "x" else "y_test"].append(np.full(number, label, dtype=np.int64))
    return {name: np.concatenate(values) for name, values in parts.items()}, [path.name for path in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--run-dir", default="runs/hugging-face")
    parser.add_argument("--optimizer", default="adamw", help="the prune stage's (sgd: at learning rate 0.05)")
    arguments = parser.parse_args()
    try:
        import transformers
    except ImportError:
        raise SystemExit("this benchmark needs transformers: pip install transformers==5.25.0") from None
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    print(machine_description())
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    language = language_model_data(corpus(arguments.megabytes), arguments.examples, 0)
    files, names = classification_data(arguments.examples, 1)
    print(f"BERT's files: {', '.join(names)}")
    cases = {
        "GPT-2 language model": (
            lambda: GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=VOCABULARY, n_embd=128, n_layer=2, n_head=4, n_positions=LENGTH,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
                )
            ),
            language,
            "token-classification",
        ),
        "BERT classifier": (
            lambda: BertForSequenceClassification(
                BertConfig(
                    vocab_size=VOCABULARY, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=LENGTH, num_labels=8,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                )
            ),
            files,
            "classification",
        ),
    }  # fmt: skip
    recipe = {
        "output": "logits",
        # AdamW, as transformers are trained: SGD at the paper's rates wrecked the BERT classifier
        # (test top-1 0.71 -> 0.13, chance 0.125) where it spared the GPT-2 (BENCHMARKS.md).
        "prune": {
            "sparsity": {"*": 0.8},
            "rounds": 2,
            "retrain_epochs": 1,
            "optimizer": "adamw",
            "learning_rate": 5e-4,
            "weight_decay": 0.01,
        },
        "quantize": {"bits": {"*": 5}, "finetune_epochs": 1},
        "encode": {"coder": "ans", "unshared": "int8"},
    }
    if arguments.optimizer == "sgd":
        recipe["prune"] |= {"optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 5e-4}
    for name, (build, arrays, task) in cases.items():
        torch.manual_seed(0)
        model = build()
        data = deepshrink.load_arrays(arrays, validation=0.05)
        started = time.perf_counter()
        config = deepshrink.TrainConfig(epochs=arguments.epochs, learning_rate=1e-3, optimizer="adam", batch_size=64)
        # Scored by its logits while it trains; run() finds the hook and adds no second one.
        select_output(model, "logits")
        loader = deepshrink.make_loader(data.train, 64, shuffle=True)
        deepshrink.fit(model, loader, config, task=task, progress=False)
        trained = time.perf_counter() - started
        started = time.perf_counter()
        result = deepshrink.run(model, recipe | {"task": task}, data, run_dir=Path(arguments.run_dir) / name.split()[0])
        report = result.report
        print(
            f"{name}: {result.parameter_bytes:,} fp32 parameter bytes (trained {trained:.0f} s); test "
            f"{report['metric']} {report['reference_metric']:.4f} -> {report['compressed_metric']:.4f}; "
            f"{result.file_bytes:,} bytes, {result.ratio:.1f}x; {time.perf_counter() - started:.0f} s"
        )


if __name__ == "__main__":
    main()
