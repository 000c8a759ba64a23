"""Reliability: hostile .dcz files through every reader, longer than the test suite runs them.

Cases (tests/hostile.py makes them, checksums recomputed after each lie):
- every truncation of a small LeNet-300-100 file (97% pruned, 4-bit codes);
- every single-bit flip of its header's JSON, and a sample of bit flips in its buffers, each
  decoded in memory and, when it decodes, loaded by the runtime and compared with the dense model;
- the crafted files (one per header field and lie) through the library's readers and the CLI's
  inspect, decode, predict --mode sparse and bench, each file in its own process limited to
  2 GiB of address space, whose peak resident memory is recorded;
- the hypothesis fuzz target of the test suite (any JSON value in any field of any record)
  for --fuzz-seconds;
- random lies in 54 files of every coder, layout and form of the other
  tensors, for --variants-seconds.

Every outcome must be a clean error or a load whose outputs equal the decoded dense model.

    .venv/bin/python benchmarks/hostile_files.py [--body-flips 3000] [--fuzz-seconds 600] [--variants-seconds 300]
    .venv/bin/python benchmarks/hostile_files.py --only-variants      # the last kind alone
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import hostile  # noqa: E402

from deepshrink.compressed import save_compressed  # noqa: E402
from deepshrink.errors import DeepshrinkError  # noqa: E402
from deepshrink.runtime.bench import machine_description  # noqa: E402


def in_memory(cases: dict[str, bytes], directory: Path) -> collections.Counter:
    """Decode each case; where it decodes, load it in the runtime and compare with the dense model."""
    outcomes = collections.Counter()
    for data in cases.values():
        try:
            hostile.decode_bytes(data)
        except DeepshrinkError as error:
            outcomes[f"refused ({type(error).__name__})"] += 1
            continue
        outcomes[f"decoded, then {hostile.load_or_refuse(data, directory)}"] += 1
    return outcomes


def crafted(valid: bytes, directory: Path) -> tuple[collections.Counter, dict]:
    """Each crafted file in its own memory-limited process, through every reader."""
    files = {"valid": valid, **hostile.crafted_files(valid)}
    readers = ",".join([*hostile.READERS[:4], "cli-inspect", "cli-decode", "cli-predict", "cli-bench"])
    outcomes, peaks, bad = collections.Counter(), {}, []
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    for name, data in files.items():
        case_directory = directory / f"case-{len(peaks)}"
        case_directory.mkdir()
        (case_directory / "case.dcz").write_bytes(data)
        finished = subprocess.run(
            [sys.executable, hostile.__file__, str(case_directory), readers],
            capture_output=True,
            text=True,
            timeout=600,
            env=environment,
            check=False,
        )
        lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
        if finished.returncode != 0:
            bad.append((name, f"runner exit {finished.returncode}: {finished.stderr[-300:]}"))
        for line in lines:
            if "outcome" in line:
                outcomes[line["outcome"] if line["outcome"].startswith("BAD") else line["outcome"].split(":")[0]] += 1
                if line["outcome"].startswith("BAD"):
                    bad.append((name, line["reader"], line["outcome"]))
            if "peak_rss_kib" in line:
                peaks[name] = line["peak_rss_kib"] / 1024
    worst = max(peaks, key=peaks.get)
    return outcomes, {"peak_mib_valid": peaks["valid"], "peak_mib_worst": peaks[worst], "worst": worst, "bad": bad}


def fuzz(valid: bytes, seconds: float, directory: Path) -> dict:
    """The test suite's hypothesis fuzz target, in batches of 200 examples with a new seed each,
    until `seconds` have passed."""
    from hypothesis import HealthCheck, given, seed, settings

    outcomes = collections.Counter()

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=hostile.fuzz_strategy())
    def target(case):
        outcomes[hostile.fuzz_case(valid, case, directory)] += 1

    started, batch = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        try:
            seed(batch)(target)()
        except Exception as error:  # hypothesis re-raises the shrunk failing example
            outcomes[f"FAILED: {type(error).__name__}: {str(error)[:200]}"] += 1
        batch += 1
    return {"executions": sum(outcomes.values()), "seconds": time.perf_counter() - started, "outcomes": outcomes}


VALUES = [None, True, False, 0, 1, -1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 255, 256, 2**31, 2**32, 2**63, 2**64, -(2**63)]
VALUES += [0.5, 1e308, -0.0, "", "x", "ans", "huffman", "fixed", "csr", "csc", "dense", "none", "previous", "int8"]
VALUES += ["float16", "float32", "bool", "int64", "bfloat16", "shared", "raw", "zstd", "same", [], {}, [0], [1, 1]]


def _paths(value, prefix: str = ""):
    """Every path into a JSON value ("tensors.3.streams.codes.bits")."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from _paths(inner, f"{prefix}.{index}")
    if prefix:
        yield prefix


def _set_path(value, path: str, new) -> None:
    *outer, last = path.split(".")
    for key in outer:
        value = value[int(key)] if isinstance(value, list) else value[key]
    if isinstance(value, list):
        value[int(last)] = new
    else:
        value[last] = new


def variants(seconds: float, directory: Path, seed: int = 0) -> dict:
    """Random lies in files of every coder (huffman, ans, fixed), layout (csr, csc, dense) and
    form of the other tensors (lossless, float16, int8), of LeNet-300-100 and LeNet-5 (90%
    pruned, 4 bits; under ans, with three quarters of the largest layer's rows empty): one or
    two header fields anywhere set to a value from VALUES or a random integer, one to eight bits
    of a buffer flipped, two buffers swapped, or a buffer cut short, checksums recomputed; each
    loaded (`hostile.load_or_refuse`) until `seconds` have passed."""
    import copy
    import random

    files = {}
    for model_name in ("lenet-300-100", "lenet-5"):
        for coder in ("huffman", "ans", "fixed"):
            # Under ans, three quarters of the largest layer's rows empty: rANS-coded row counts (2.6).
            model = hostile.small_model(model_name, sparsity=0.9, bits=4, dead_rows=0.75 if coder == "ans" else 0.0)
            for layout in ("csr", "csc", "dense"):
                for unshared in ("lossless", "float16", "int8"):
                    path = directory / f"{model_name}-{coder}-{layout}-{unshared}.dcz"
                    options = {"coder": coder, "layout": layout, "unshared": unshared}
                    save_compressed(
                        model, path, model_name=model_name, metadata={"input_shape": [1, 28, 28]}, **options
                    )
                    files[path.stem] = (model_name, path.read_bytes())
    generator = random.Random(seed)
    outcomes, bad = collections.Counter(), {}
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        name = generator.choice(sorted(files))
        model_name, data = files[name]
        header, buffers = hostile.split(data)
        kind = generator.choice(["field", "field", "two fields", "bits", "swap", "cut"])
        changed = list(buffers)
        if kind in ("field", "two fields"):
            header = copy.deepcopy(header)
            for _ in range(1 if kind == "field" else 2):
                new = generator.choice(VALUES) if generator.random() < 0.7 else generator.randint(-3, 5000)
                with contextlib.suppress(KeyError, IndexError, ValueError, TypeError):
                    _set_path(header, generator.choice(list(_paths(header))), copy.deepcopy(new))
        elif kind == "bits":
            index = generator.randrange(len(buffers))
            flipped = bytearray(buffers[index])
            for _ in range(generator.choice([1, 1, 2, 8]) if flipped else 0):
                flipped[generator.randrange(len(flipped))] ^= 1 << generator.randrange(8)
            changed[index] = bytes(flipped)
        elif kind == "swap":
            first, second = generator.randrange(len(buffers)), generator.randrange(len(buffers))
            changed[first], changed[second] = changed[second], changed[first]
        else:
            index = generator.randrange(len(buffers))
            changed[index] = changed[index][: generator.randrange(len(changed[index]) + 1)]
        try:
            outcome = hostile.load_or_refuse(hostile.frame(header, changed), directory, model_name)
        except Exception as error:  # noqa: BLE001 - what the benchmark is looking for
            outcome = f"BAD: {type(error).__name__}: {str(error)[:160]}"
            bad.setdefault(outcome[:100], (name, kind))
        outcomes[outcome.split(":")[0]] += 1
    return {
        "files": len(files),
        "cases": sum(outcomes.values()),
        "seconds": time.perf_counter() - started,
        "outcomes": outcomes,
        "bad": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body-flips", type=int, default=3000)
    parser.add_argument("--fuzz-seconds", type=float, default=600)
    parser.add_argument("--variants-seconds", type=float, default=300)
    parser.add_argument("--only-variants", action="store_true", help="only the lies in files of every coder and form")
    parser.add_argument("--out", default="benchmarks/results/hostile_files.json")
    args = parser.parse_args()
    results = {"cpu": machine_description(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        results["variants"] = variants(args.variants_seconds, directory)
        print("variants", results["variants"], flush=True)
        if args.only_variants:
            args.out = args.out.replace(".json", "_variants.json")
            Path(args.out).write_text(json.dumps(results, indent=2, default=dict) + "\n")
            print(f"wrote {args.out}")
            return
        valid = save_compressed(hostile.small_model(), directory / "valid.dcz", model_name=hostile.MODEL).read_bytes()
        results["file_bytes"] = len(valid)
        kinds = {
            "truncations": {f"truncated-{end}": valid[:end] for end in range(len(valid))},
            "header bit flips": hostile.header_bit_flips(valid),
            "body bit flips": hostile.body_bit_flips(valid, args.body_flips),
        }
        for kind, cases in kinds.items():
            started = time.perf_counter()
            outcomes = in_memory(cases, directory)
            results[kind] = {"cases": len(cases), "seconds": time.perf_counter() - started, "outcomes": outcomes}
            print(kind, results[kind], flush=True)
        started = time.perf_counter()
        outcomes, memory = crafted(valid, directory)
        results["crafted"] = {"files": len(hostile.crafted_files(valid)) + 1, "outcomes": outcomes, **memory}
        results["crafted"]["seconds"] = time.perf_counter() - started
        print("crafted", results["crafted"], flush=True)
        results["fuzz"] = fuzz(valid, args.fuzz_seconds, directory)
        print("fuzz", results["fuzz"], flush=True)
    results["cpu"]["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2, default=dict) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
