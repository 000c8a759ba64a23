"""The run report: the paper's Table 1 row and per-layer table (beside the paper's own numbers),
the stages' logs, and Figures 4-6, as Markdown + JSON + PNG in the run directory.

Sizes come from the written file's header; the compressed model's metric from the decoded file.
The metric is the task's (top-1 accuracy for classification, the paper's setting); the paper's
rows are shown only for the paper's own networks as classifiers.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from deepshrink.compressed import file_sizes
from deepshrink.encode.sizes import format_size_table
from deepshrink.files import atomic_output
from deepshrink.paper import PAPER
from deepshrink.report.figures import plot_codebooks, plot_distributions, plot_tradeoff
from deepshrink.tables import render_table


def shown(value: float | None, metric_name: str) -> str:
    """A metric's value as a reader expects it: accuracies in percent, anything else as a number
    (None, from a run without data: "not measured").

    Args:
        value: the metric's value, or None.
        metric_name: the metric's name.

    Returns:
        The text.
    """
    if value is None:
        return "not measured"
    return f"{100 * value:.2f}%" if "accuracy" in metric_name else f"{value:.4f}"


def change(result) -> str:
    """The compressed model's metric against the reference's: in points for an accuracy.

    Args:
        result: the RunResult.

    Returns:
        E.g. "-0.12 points".
    """
    if result.reference_metric is None:
        return "no data to measure on"
    difference = result.compressed_metric - result.reference_metric
    return f"{100 * difference:+.2f} points" if "accuracy" in result.metric_name else f"{difference:+.4f}"


def _paper_row(result):
    """The paper's own numbers for this network, when it is one of the paper's classifiers."""
    return PAPER.get(result.model_name) if result.task == "classification" else None


def table1(result, markdown: bool = False) -> str:
    """The paper's Table 1 row for this run, with the paper's own row when it has one.

    Args:
        result: the RunResult.
        markdown: a Markdown table.

    Returns:
        The table.
    """
    classification = result.task == "classification"
    name = result.metric_name
    header = ["network"]
    header += (
        ["top-1 error (reference)", "top-1 error (compressed)"]
        if classification
        else [f"{name} (reference)", f"{name} (compressed)"]
    )
    header += ["parameters", "compressed", "ratio"]
    values = (
        [f"{100 * (1 - result.reference_metric):.2f}%", f"{100 * (1 - result.compressed_metric):.2f}%"]
        if classification and result.reference_metric is not None
        else [shown(result.reference_metric, name), shown(result.compressed_metric, name)]
    )
    rows = [
        [
            f"{result.model_name} (ours, {result.data_name})",
            *values,
            f"{result.parameter_bytes / 1000:,.0f} KB",
            f"{result.file_bytes / 1000:,.1f} KB",
            f"{result.ratio:.1f}x",
        ]
    ]
    paper = _paper_row(result)
    if paper is not None:
        rows.append(
            [
                f"{result.model_name} (paper, MNIST)",
                f"{100 * paper.reference_error:.2f}%",
                f"{100 * paper.compressed_error:.2f}%",
                paper.original_size,
                paper.compressed_size,
                f"{paper.ratio:.0f}x",
            ]
        )
    return render_table(header, rows, markdown)


def paper_comparison(model_name: str, rows, markdown: bool = True) -> str | None:
    """Our per-layer columns next to the paper's Table 2 / 3 (P+Q+H columns).

    Args:
        model_name: the model (the paper has LeNet-300-100 and LeNet-5).
        rows: from size_report.
        markdown: a Markdown table.

    Returns:
        The table, or None for a model the paper does not have.
    """
    paper = PAPER.get(model_name)
    if paper is None:
        return None
    ours = {row.name.removesuffix(".weight"): row for row in rows if row.weight_bits is not None}
    header = [
        "layer",
        "kept (ours / paper)",
        "weight bits P+Q+H (ours / paper)",
        "index bits P+Q+H (ours / paper)",
        "compress rate P+Q+H (ours / paper)",
    ]
    body = []
    for layer in paper.layers:
        row = ours.get(layer.layer)
        if row is None:
            continue
        index = "-" if row.index_bits_coded is None else f"{row.index_bits_coded:.2f}"
        body.append(
            [
                f"{layer.layer} ({layer.paper_name})",
                f"{100 * row.kept / row.weights:.1f}% / {100 * layer.kept:.0f}%",
                f"{row.weight_bits_coded:.2f} / {layer.weight_bits_coded}",
                f"{index} / {layer.index_bits_coded}",
                f"{row.rate:.1f}x / {1 / layer.rate_coded:.1f}x",
            ]
        )
    return render_table(header, body, markdown)


def plan_lines(result) -> list[str]:
    """What a recipe's target chose for each layer, and why (plan.py).

    Args:
        result: the RunResult.

    Returns:
        The report's lines.
    """
    from deepshrink.plan import format_plan

    plan = result.plan
    if "ratio" in plan.target:
        goal = f"a file {plan.target['ratio']:g}x smaller than fp32"
        measured = (
            f" Without retraining, these settings made a {plan.measured_bytes:,}-byte file; "
            f"after retraining the file is {result.file_bytes:,} bytes ({result.ratio:.1f}x)."
        )
        if result.ratio < plan.target["ratio"]:
            goal = result.file_bytes * result.ratio / plan.target["ratio"]
            why = (
                "no choice the plan measured came under it: allow higher sparsities or fewer bits"
                if plan.measured_bytes > goal
                # Retraining moves the codes' statistics, and with them the entropy-coded size.
                else "retraining made the coded weights larger than planned: ask for a slightly higher ratio"
            )
            measured += f" **That is short of the target's {plan.target['ratio']:g}x**: {why}."
    else:
        goal = f"{result.metric_name} at most {plan.target['max_metric_drop']:g}% of the reference's worse"
        measured = (
            f" Without retraining, the whole changed the validation {result.metric_name} by "
            f"{-plan.measured_drop:+.4f}; after retraining, the test {result.metric_name} changed by "
            f"{change(result)} ({result.ratio:.1f}x)."
        )
    examples = plan.target.get("examples")
    split = "the validation split" + (f" (its first {examples:,} examples at most)" if examples else "")
    if plan.after_pruning:
        how = (
            "Pruning learned each layer's sparsity; after it, each layer was shared alone at each candidate "
            f"width, and the {result.metric_name} measured on {split} without retraining (the "
            "drops below, from the pruned model); the widths minimise the summed drop for the size (or the "
            "size for the drop). Estimated drop of the whole from the reference, pruning's included, before "
        )
    else:
        how = (
            "Each layer was pruned alone to each candidate sparsity and shared alone at each candidate width, "
            f"and the {result.metric_name} measured on {split} without retraining (the drops "
            "below); the settings minimise the summed drop for the size (or the size for the drop). "
            "Estimated drop of the whole, before "
        )
    drops = [drop for kinds in plan.sensitivity.values() for values in kinds.values() for drop in values.values()]
    if drops and not any(drops):
        measured += (
            f" **Every drop measured was 0**: on {split} the candidates could not be told apart, so they were "
            "chosen by size alone; a larger validation split (and the target's `examples`, if it caps it) "
            "measures them."
        )
    return [
        "## Automatic settings",
        "",
        f"The recipe's target: {goal}. {how}retraining: {plan.estimated_drop:+.4f}.{measured}",
        "",
        format_plan(plan, markdown=True),
        "",
    ]


def stage_lines(result) -> list[str]:
    """One line per stage: ran or cached, its time, its validation metric and key.

    Args:
        result: the RunResult.

    Returns:
        The lines.
    """
    lines = []
    for stage in result.stages:
        state = "cached" if stage.cached else "ran"
        detail = ""
        metrics = stage.result.metrics
        if "validation_metric" in metrics:
            detail = f", validation {result.metric_name} {shown(metrics['validation_metric'], result.metric_name)}"
        if "kept_fraction" in metrics:
            detail += f", {100 * metrics['kept_fraction']:.2f}% of weights kept"
        cleared = stage.result.log.get("dead_units", [])
        if cleared:
            units = ", ".join(f"{item['unread'] + item['folded']} of {item['layer']}" for item in cleared)
            detail += f", biases of dead units cleared ({units})"
        lines.append(f"- {stage.name}: {state} in {stage.seconds:.1f} s{detail} (key {stage.key[:12]})")
    return lines


def write_report(result, recipe, model: nn.Module, tradeoff: dict | None) -> dict:
    """RUN_DIR/report.md, report.json and the figures; returns the JSON data.

    Args:
        result: the RunResult.
        recipe: the Recipe run.
        model: the compressed model (for Figure 4).
        tradeoff: the Figure 6 curves, or None.

    Returns:
        The report's JSON data.

    Raises:
        OutputError: a file cannot be written.
    """
    run_dir = Path(result.run_dir)
    rows, totals = file_sizes(result.path)
    figures = _draw_figures(result, model, rows, tradeoff, run_dir)
    lines = _markdown_lines(result, rows, totals, figures, tradeoff)
    data = {
        "model": result.model_name,
        "file": result.path.name,
        "file_bytes": result.file_bytes,
        "parameter_bytes": result.parameter_bytes,
        "ratio": result.ratio,
        "data": result.data_name,
        "task": result.task,
        "metric": result.metric_name,
        "higher_is_better": result.higher_is_better,
        "evaluated_on": result.evaluated_on,
        "targets": result.targets,
        "processes": result.processes,
        "reference_metric": result.reference_metric,
        "compressed_metric": result.compressed_metric,
        "layers": [asdict(row) | {"rate": row.rate, "rate_fixed": row.rate_fixed} for row in rows],
        "totals": totals,
        "stages": [stage.to_dict() for stage in result.stages],
        "recipe": recipe.to_dict(),
        "figures": figures,
        "tradeoff": tradeoff,
        "plan": result.plan.to_dict() if result.plan is not None else None,
        "teacher": result.teacher,
    }
    with atomic_output(run_dir / "report.md") as temporary:
        temporary.write_text("\n".join(lines))
    with atomic_output(run_dir / "report.json") as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=float))
    return data


def _draw_figures(result, model: nn.Module, rows, tradeoff: dict | None, run_dir: Path) -> dict[str, str]:
    """The run's figures, drawn into `run_dir`: {"figure4" | "figure5" | "figure6": file name}."""
    from deepshrink.stages.quantize import sharing_records

    records = {}
    for stage in result.stages:  # the k-means records behind Figure 4, from the stage that shared weights
        records.update(sharing_records(stage.result))
    # A layer pruned to nothing has no weights to draw (a tiny layer at a high sparsity).
    records = {name: record for name, record in records.items() if len(record.sample)}
    figures = {}
    if records:
        figures["figure4"] = plot_codebooks(model, records, run_dir / "figure4-codebook.png").name
    if any(row.weight_bits is not None for row in rows):
        figures["figure5"] = plot_distributions(result.path, run_dir / "figure5-distributions.png").name
    if tradeoff is not None:
        plot_tradeoff(tradeoff, run_dir / "figure6-tradeoff.png")
        figures["figure6"] = "figure6-tradeoff.png"
    return figures


def _setting_sentence(result) -> str:
    """The task and data, and what about them changed the run (no targets, no test split, no
    data at all, several processes)."""
    return (
        f"Task: {result.task}; data: {result.data_name}"
        + ("; targets made from the original model's outputs (the data has none)" if result.targets != "given" else "")
        + ("; no test split, so the validation split reports" if result.evaluated_on == "validation" else "")
        + (
            "; no data was given, so the weights were pruned and shared without retraining or "
            "fine-tuning, BatchNorm was left unfolded, and no metric was measured"
            if result.evaluated_on == "nothing"
            else ""
        )
        + (
            f"; retrained on {result.processes} processes (torchrun), each on its shard of the training split, "
            "with the same masks and codebooks on every one"
            if result.processes > 1
            else ""
        )
        + _teacher_clause(result)
        + "."
    )


def _teacher_clause(result) -> str:
    """What distillation retrained against, where it was not the reference."""
    teacher = getattr(result, "teacher", None)
    if teacher is None:
        return ""
    what = (
        f"the mean of {teacher['members']} trained copies of the model, the reference among them"
        if teacher["members"] is not None
        else "the teacher given to run()"
    )
    measured = (
        f" ({result.evaluated_on} {result.metric_name} {shown(teacher['metric'], result.metric_name)})"
        if teacher["metric"] is not None
        else ""
    )
    return f"; distillation retrained against {what}{measured}, not the reference alone"


def _markdown_lines(result, rows, totals: dict, figures: dict[str, str], tradeoff: dict | None) -> list[str]:
    """report.md, line by line."""
    lines = [
        f"# deepshrink report: {result.model_name}",
        "",
        f"File `{result.path.name}`: {result.file_bytes:,} bytes, {result.ratio:.1f}x smaller than the "
        f"{result.parameter_bytes:,} bytes of fp32 parameters. {_measured(result)}",
        "",
        _setting_sentence(result),
        "",
        "## Table 1",
        "",
        table1(result, markdown=True),
        "",
        "## Per layer (the paper's Tables 2-3 columns, from the file's bytes)",
        "",
        format_size_table(rows, totals, markdown=True),
        "",
    ]
    comparison = paper_comparison(result.model_name, rows) if _paper_row(result) else None
    if comparison is not None:
        lines += [f"Beside the paper's {PAPER[result.model_name].table} (MNIST):", "", comparison, ""]
    if result.plan is not None:
        lines += plan_lines(result)
    lines += ["## Stages", "", *stage_lines(result), ""]
    return lines + _figure_lines(result, figures, tradeoff)


def _figure_lines(result, figures: dict[str, str], tradeoff: dict | None) -> list[str]:
    """The figures with their captions, and the Figure 6 points as a table."""
    captions = {
        "figure4": "Figure 4: centroid initialisation on the weights' CDF, and the codebook before and after "
        "fine-tuning (largest layer)",
        "figure5": "Figure 5: distribution of weight codes and index gaps (largest layer), what Huffman exploits",
        "figure6": f"Figure 6: {result.evaluated_on} {result.metric_name} against compression ratio for pruning "
        "only, quantization only, both, and SVD low-rank, each from the reference with brief retraining",
    }
    lines = []
    if figures:
        lines += ["## Figures", ""]
        for key, name in figures.items():
            lines += [f"![{key}]({name})", "", captions[key], ""]
    if tradeoff is not None:
        header = ["method", "setting", "bytes", "ratio", f"{result.evaluated_on} {result.metric_name}"]
        body = [
            [
                point["method"],
                point["setting"],
                f"{point['bytes']:,}",
                f"{point['ratio']:.1f}x",
                shown(point["metric"], result.metric_name),
            ]
            for point in tradeoff["points"]
        ]
        lines += ["Figure 6 data:", "", render_table(header, body, markdown=True), ""]
        for point in tradeoff.get("skipped", []):
            lines += [f"Not drawn: {point['method']} at {point['setting']} ({point['reason']}).", ""]
    return lines


def stage_figure(model: nn.Module, stage_result, directory: Path) -> Path | None:
    """The figure one stage's report gets: the codebooks on the weights (Figure 4) for a stage
    that shared weights, the code and gap distributions (Figure 5) for one that wrote a file.

    Args:
        model: the model after the stage.
        stage_result: the stage's result.
        directory: where to write the figure.

    Returns:
        The figure's path, or None for a stage without one.
    """
    from deepshrink.stages.quantize import sharing_records

    records = sharing_records(stage_result)
    if records:
        return plot_codebooks(model, records, directory / "codebooks.png")
    written = [Path(path) for path in stage_result.files if str(path).endswith(".dcz")]
    if written:
        rows, _ = file_sizes(written[0])
        if any(row.weight_bits is not None for row in rows):
            return plot_distributions(written[0], directory / "distributions.png")
    return None


def summary(result) -> str:
    """What the CLI prints at the end of a run.

    Args:
        result: the RunResult.

    Returns:
        The text.
    """
    rows, totals = file_sizes(result.path)
    parts = [format_size_table(rows, totals), "", table1(result)]
    comparison = paper_comparison(result.model_name, rows, markdown=False) if _paper_row(result) else None
    if comparison is not None:
        parts += ["", comparison]
    parts += [
        "",
        f"file: {result.path} ({result.file_bytes:,} bytes, {result.ratio:.1f}x)",
        _measured(result)
        if result.reference_metric is None
        else f"{result.evaluated_on} {result.metric_name} ({result.task}, {result.data_name}): "
        f"{shown(result.reference_metric, result.metric_name)} reference, "
        f"{shown(result.compressed_metric, result.metric_name)} decoded from the file ({change(result)})",
        f"report: {Path(result.run_dir) / 'report.md'}",
    ]
    return "\n".join(parts)


def _measured(result) -> str:
    """One sentence: the metric before and decoded from the file, on which split."""
    if result.reference_metric is None:
        return "Nothing was measured: the run had no data."
    name = result.metric_name
    return (
        f"{result.evaluated_on.capitalize()} {name} {shown(result.reference_metric, name)} before, "
        f"{shown(result.compressed_metric, name)} decoded from the file ({change(result)})."
    )
