"""Which form to run on this CPU: tiled and blocked (where they apply), per-entry and grouped.

AlexNet's FC shapes at 9% and 4% kept and LeNet-300-100's fc1 at 8%, 5-bit codebooks, random
masks; both forms built from the same CSR arrays, timed with dense torch in the same run,
interleaved (five rounds of ten calls, median), at batch 1, 8 and 64. Run it with
DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f on an AVX-512 CPU for
the AVX2 path (the CPU name alone keeps the host's AVX-512 features in numba's code). The result
decides `forms._automatic_form` on CPUs without AVX-512.

    DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f \
        .venv/bin/python benchmarks/form_choice.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numba
import numpy as np
import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_choice import LAYERS, random_weight  # noqa: E402

from deepshrink.runtime import forms  # noqa: E402
from deepshrink.runtime.bench import machine_description, median_seconds  # noqa: E402
from deepshrink.runtime.forms import CodebookWeight  # noqa: E402

# The forms that need a CPU's vector instructions: built only where they can run.
VECTOR_FORMS = {"tiled": forms.TiledCodes, "blocked": forms.Avx2BlockedCodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/form_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    results = {"machine": machine_description(), "command": " ".join(sys.argv), "rows": []}
    print(json.dumps(results["machine"]))
    for name, rows, columns, density in LAYERS:
        weight = random_weight(rows, columns, density)
        row_index, column_index, codes = weight.entries()
        order = np.lexsort((column_index, row_index))
        indptr = np.concatenate(([0], np.cumsum(np.bincount(row_index, minlength=rows))))
        arrays = (indptr, column_index[order].astype(np.uint16), codes[order].astype(np.uint8))
        built_forms = {
            form: CodebookWeight(*arrays, weight.storage.codebook, (rows, columns), form=form)
            for form in ("tiled", "blocked", "per-entry", "grouped")
            if form not in VECTOR_FORMS or VECTOR_FORMS[form].fits(weight.storage.codebook)
        }
        dense = weight.to_dense()
        for batch in (1, 8, 64):
            inputs = np.random.default_rng(1).standard_normal((batch, columns)).astype(np.float32)
            tensor = torch.from_numpy(inputs)
            times = {key: [] for key in (*built_forms, "dense")}
            for _ in range(5):
                for form, built in built_forms.items():
                    times[form].append(median_seconds(lambda built=built, x=inputs: built.product(x), 10, 1))
                times["dense"].append(
                    median_seconds(lambda x=tensor, matrix=dense: functional.linear(x, matrix), 10, 1)
                )
            medians = {key: statistics.median(values) * 1e6 for key, values in times.items()}
            row = {"layer": name, "batch": batch, "threads": args.threads, **medians}
            results["rows"].append(row)
            print(
                f"{args.threads}t {name:22} b{batch:<3} "
                + " ".join(
                    f"{key} {value:9.1f} us ({medians['dense'] / value:5.2f}x)" for key, value in medians.items()
                ),
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
