"""Turning benchmark records into numbers: aggregation, the token-equality check, JSON, table, plot.

Everything here works on the JSON's ``questions`` rows, so a saved report can be re-aggregated,
re-tabled and re-plotted without running anything again. Throughput is pooled: a group's tokens/s
is its total new tokens over its total decode time (long answers weigh more); the per-question
median is given beside it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from medusa.bench.runner import AUTOREGRESSIVE, HF_GENERATE, LOOKUP, MEDUSA, MEDUSA_LOOKUP, Record
from medusa.files import atomic_path, write_text

SCHEMA_VERSION = 1
OVERALL = "overall"

META_KEYS = (
    "command",
    "device",
    "dtype",
    "model",
    "heads",
    "tree_size",
    "max_new_tokens",
    "torch",
    "transformers",
    "timestamp",
)
SUMMARY_KEYS = (
    "prompts",
    "new_tokens",
    "prefill_seconds",
    "decode_seconds",
    "seconds",
    "tokens_per_second",
    "end_to_end_tokens_per_second",
    "median_tokens_per_second",
    "steps",
    "accepted",
    "mean_accepted",
    "speedup",
    "speedup_vs_hf_generate",
)
SAMPLE_KEYS = ("tokens", "prefill_seconds", "decode_seconds", "seconds", "steps", "accepted")
EQUALITY_KEYS = ("reference", "method", "compared", "mismatches", "first_mismatch")


# ----- the token-equality check -------------------------------------------------------------------


def first_difference(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Index of the first token that differs (a shorter list differs where it ends); None when equal."""
    for index, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return index
    return None if len(reference) == len(other) else min(len(reference), len(other))


def token_equality(records: Sequence[Record], reference: str, method: str) -> dict:
    """Count the prompts where ``method`` produced other tokens than ``reference``, and locate the first."""
    compared = mismatches = 0
    first = None
    for record in records:
        if reference not in record.samples or method not in record.samples:
            continue
        compared += 1
        expected, got = record.samples[reference].token_ids, record.samples[method].token_ids
        position = first_difference(expected, got)
        if position is None:
            continue
        mismatches += 1
        if first is None:
            first = {
                "question_id": record.question_id,
                "category": record.category,
                "turn": record.turn,
                "position": position,
                "reference_token": expected[position] if position < len(expected) else None,
                "method_token": got[position] if position < len(got) else None,
            }
    return {
        "reference": reference,
        "method": method,
        "compared": compared,
        "mismatches": mismatches,
        "first_mismatch": first,
    }


def equality_section(records: Sequence[Record], methods: Sequence[str]) -> dict:
    """Medusa against our autoregressive decoding (they must agree up to bf16 ties), then the others."""
    section = token_equality(records, AUTOREGRESSIVE, MEDUSA)
    section["others"] = {
        method: token_equality(records, AUTOREGRESSIVE, method)
        for method in methods
        if method not in (AUTOREGRESSIVE, MEDUSA)
    }
    return section


# ----- aggregation --------------------------------------------------------------------------------


def question_rows(records: Sequence[Record], keep_tokens: bool = False) -> list[dict]:
    """The JSON's per-prompt rows: counts and times per method, and the token ids if ``keep_tokens``."""
    rows = [
        {
            "id": record.question_id,
            "category": record.category,
            "turn": record.turn,
            "prompt_tokens": record.prompt_tokens,
            "methods": {
                name: {
                    "tokens": len(sample.token_ids),
                    "prefill_seconds": sample.prefill_seconds,
                    "decode_seconds": sample.decode_seconds,
                    "seconds": sample.seconds,
                    "steps": sample.steps,
                    "accepted": sample.accepted,
                }
                for name, sample in record.samples.items()
            },
        }
        for record in records
    ]
    if keep_tokens:
        for row, record in zip(rows, records):
            for name, sample in record.samples.items():
                row["methods"][name]["token_ids"] = list(sample.token_ids)
    return rows


def answer_agreement(rows: Sequence[dict], method: str, other_rows: Sequence[dict], other_method: str) -> dict:
    """How close two methods' answers are, on the prompts both reports ran with their token ids kept.

    Made for answers of different models (Medusa-2's adapted backbone against the original): the share
    of identical answers, and how many tokens the answers share before they first differ.
    """
    theirs = {(row["id"], row["turn"]): row["methods"].get(other_method) for row in other_rows}
    per_category: dict[str, list[tuple[bool, int, int]]] = {}
    for row in rows:
        mine, other = row["methods"].get(method), theirs.get((row["id"], row["turn"]))
        if not mine or not other or "token_ids" not in mine or "token_ids" not in other:
            continue
        a, b = mine["token_ids"], other["token_ids"]
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        per_category.setdefault(row["category"], []).append((a == b, common, len(b)))

    def summary(items: list[tuple[bool, int, int]]) -> dict:
        return {
            "prompts": len(items),
            "identical": sum(same for same, _, _ in items),
            "mean_common_prefix_tokens": statistics.fmean(c for _, c, _ in items) if items else None,
            "mean_reference_tokens": statistics.fmean(n for _, _, n in items) if items else None,
        }

    every = [item for items in per_category.values() for item in items]
    if not every:
        raise ValueError(
            f"no prompt has token ids for both {method} and {other_method}: run medusa bench --keep-tokens"
        )
    return {"overall": summary(every), "per_category": {c: summary(items) for c, items in per_category.items()}}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def summarize(rows: Sequence[dict], method: str) -> dict:
    """Pooled totals and rates of one method over some rows (speedups are filled in by ``aggregate``)."""
    samples = [row["methods"][method] for row in rows if method in row["methods"]]
    tokens = sum(s["tokens"] for s in samples)
    prefill = sum(s["prefill_seconds"] for s in samples)
    decode = sum(s["decode_seconds"] for s in samples)
    steps = sum(s["steps"] for s in samples)
    accepted = sum(s["accepted"] for s in samples)
    per_question = [s["tokens"] / s["decode_seconds"] for s in samples if s["decode_seconds"] > 0]
    return {
        "prompts": len(samples),
        "new_tokens": tokens,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "seconds": prefill + decode,
        "tokens_per_second": _ratio(tokens, decode),
        "end_to_end_tokens_per_second": _ratio(tokens, prefill + decode),
        "median_tokens_per_second": statistics.median(per_question) if per_question else None,
        "steps": steps,
        "accepted": accepted,
        "mean_accepted": _ratio(accepted, steps),
        "speedup": None,
        "speedup_vs_hf_generate": None,
    }


def categories_in(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(row["category"] for row in rows))


def speedup(rows: Sequence[dict], method: str, baseline: str) -> float | None:
    """Tokens/s of ``method`` over ``baseline``'s, on the prompts that both ran."""
    shared = [row for row in rows if method in row["methods"] and baseline in row["methods"]]
    rate, base_rate = summarize(shared, method)["tokens_per_second"], summarize(shared, baseline)["tokens_per_second"]
    return rate / base_rate if rate is not None and base_rate else None


def aggregate(rows: Sequence[dict], methods: Sequence[str]) -> dict:
    """``{method: {"overall": summary, "per_category": {category: summary}}}`` with speedups.

    ``speedup`` is tokens/s over our autoregressive decoding's, ``speedup_vs_hf_generate`` over
    transformers' eager ``generate``, each on the prompts both methods ran; None where the baseline did not.
    """
    groups = {OVERALL: list(rows)} | {c: [r for r in rows if r["category"] == c] for c in categories_in(rows)}
    result: dict = {method: {"overall": None, "per_category": {}} for method in methods}
    for group, members in groups.items():
        for method in methods:
            summary = summarize(members, method)
            for key, baseline in (("speedup", AUTOREGRESSIVE), ("speedup_vs_hf_generate", HF_GENERATE)):
                if baseline in methods:
                    summary[key] = speedup(members, method, baseline)
            if group == OVERALL:
                result[method]["overall"] = summary
            else:
                result[method]["per_category"][group] = summary
    return result


# ----- the JSON file ------------------------------------------------------------------------------


def build_report(meta: dict, records: Sequence[Record], methods: Sequence[str], keep_tokens: bool = False) -> dict:
    rows = question_rows(records, keep_tokens)
    return {
        "schema": SCHEMA_VERSION,
        "meta": dict(meta),
        "methods": aggregate(rows, methods),
        "questions": rows,
        "equality": equality_section(records, methods),
    }


def validate_report(report: dict) -> None:
    """Raise ``ValueError`` naming the first thing missing from a benchmark report."""

    def need(mapping: object, keys: Sequence[str], where: str) -> None:
        if not isinstance(mapping, dict):
            raise ValueError(f"{where} must be an object, got {type(mapping).__name__}")
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")

    need(report, ("schema", "meta", "methods", "questions", "equality"), "report")
    need(report["meta"], META_KEYS, "meta")
    if not report["methods"]:
        raise ValueError("report has no methods")
    for method, result in report["methods"].items():
        need(result, ("overall", "per_category"), f"methods.{method}")
        need(result["overall"], SUMMARY_KEYS, f"methods.{method}.overall")
        for category, summary in result["per_category"].items():
            need(summary, SUMMARY_KEYS, f"methods.{method}.per_category.{category}")
    if not isinstance(report["questions"], list):
        raise ValueError("questions must be a list")
    for index, row in enumerate(report["questions"]):
        need(row, ("id", "category", "turn", "prompt_tokens", "methods"), f"questions[{index}]")
        for method, sample in row["methods"].items():
            need(sample, SAMPLE_KEYS, f"questions[{index}].methods.{method}")
    need(report["equality"], EQUALITY_KEYS, "equality")


def merge_reports(reports: Sequence[dict]) -> dict:
    """One report from several runs of the same setup on different questions (a long run in parts)."""
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]
    for report in reports:
        validate_report(report)
    same = (
        "model",
        "device",
        "dtype",
        "tree_size",
        "max_new_tokens",
        "heads",
        "lookup_nodes",
        "lookup_tree_size",
        "cuda_graphs",
        "compile",
    )
    for report in reports[1:]:
        differing = [key for key in same if report["meta"].get(key) != first["meta"].get(key)]
        if differing:
            raise ValueError(f"reports differ in {', '.join(differing)}; only runs of one setup can be merged")
    rows = [row for report in reports for row in report["questions"]]
    keys = [(row["id"], row["turn"]) for row in rows]
    repeated = sorted({key for key in keys if keys.count(key) > 1}, key=str)
    if repeated:
        raise ValueError(f"question {repeated[0][0]} turn {repeated[0][1]} is in more than one report")
    methods = list(dict.fromkeys(m for report in reports for m in report["methods"]))

    def merged_equality(parts: list[dict]) -> dict:
        return {
            "reference": parts[0]["reference"],
            "method": parts[0]["method"],
            "compared": sum(p["compared"] for p in parts),
            "mismatches": sum(p["mismatches"] for p in parts),
            "first_mismatch": next((p["first_mismatch"] for p in parts if p["first_mismatch"]), None),
        }

    equality = merged_equality([r["equality"] for r in reports])
    others = {m for r in reports for m in r["equality"].get("others", {})}
    equality["others"] = {
        m: merged_equality([r["equality"]["others"][m] for r in reports if m in r["equality"].get("others", {})])
        for m in methods
        if m in others
    }
    meta = dict(first["meta"])
    meta["merged_from"] = [r["meta"]["command"] for r in reports]
    meta["prompts"] = len(rows)
    return {
        "schema": SCHEMA_VERSION,
        "meta": meta,
        "methods": aggregate(rows, methods),
        "questions": rows,
        "equality": equality,
    }


_INTEGER_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")


def report_json(report: dict) -> str:
    """Indented JSON with lists of integers on one line: kept token ids would otherwise take a line each."""

    def one_line(match: re.Match) -> str:
        if "\n" not in match.group(0):  # inside a string (indented JSON breaks lines only between values)
            return match.group(0)
        return "[" + ", ".join(match.group(1).replace(",", " ").split()) + "]"

    return _INTEGER_LIST.sub(one_line, json.dumps(report, indent=1)) + "\n"


def write_report(report: dict, path: str | Path) -> Path:
    validate_report(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, report_json(report))
    return path


# ----- presentation -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def report_table(report: dict) -> Table:
    """One row per (category, method): rates, accepted tokens per step, speedups."""
    methods = list(report["methods"])
    meta = report["meta"]
    table = Table(
        title=f"Spec-Bench on {meta['device']} ({meta['model']}, {meta['dtype']}, "
        f"{meta['max_new_tokens']} new tokens max)"
    )
    for column in (
        "category",
        "method",
        "prompts",
        "tokens/s",
        "median tok/s",
        "accepted/step",
        "speedup vs AR",
        "vs hf-generate",
    ):
        table.add_column(column, justify="left" if column in ("category", "method") else "right")
    categories = list(report["methods"][methods[0]]["per_category"]) + [OVERALL]
    for category in categories:
        for index, method in enumerate(methods):
            result = report["methods"][method]
            s = result["overall"] if category == OVERALL else result["per_category"][category]
            table.add_row(
                category if index == 0 else "",
                method,
                str(s["prompts"]),
                _fmt(s["tokens_per_second"]),
                _fmt(s["median_tokens_per_second"]),
                _fmt(s["mean_accepted"], 2),
                _fmt(s["speedup"], 2, "x"),
                _fmt(s["speedup_vs_hf_generate"], 2, "x"),
                end_section=index == len(methods) - 1,
            )
    return table


def equality_line(report: dict) -> str:
    eq = report["equality"]
    # Our other lossless methods must match too; transformers' are compared in the JSON only.
    others = {m: o for m, o in eq.get("others", {}).items() if m in (MEDUSA_LOOKUP, LOOKUP) and o["compared"]}
    if not eq["compared"] and not others:
        return "token equality: not checked (needs autoregressive and one of medusa, medusa-lookup, lookup)"
    parts = []
    for section in ([eq] if eq["compared"] else []) + list(others.values()):
        part = (
            f"{section['method']} vs {section['reference']}: "
            f"{section['mismatches']} of {section['compared']} prompts differ"
        )
        first = section["first_mismatch"]
        if first:
            part += f" (first: question {first['question_id']} turn {first['turn']}, token {first['position']})"
        parts.append(part)
    return "token equality, " + "; ".join(parts)


def _threads_text(meta: dict) -> str:
    return (
        f" ({meta['cpu_threads']} torch thread(s))"
        if meta.get("device_type") == "cpu" and meta.get("cpu_threads")
        else ""
    )


def _heads_text(meta: dict) -> str:
    heads = meta["heads"]
    if not heads:
        return "none"
    text = f"{heads['num_heads']} x {heads['num_layers']} layer(s)" + (
        ", shared lm_head" if heads.get("share_lm_head") else ""
    )
    text += ", sequential" if heads.get("head_type") == "sequential" else ""  # runs before the key are Medusa's
    return text + (f" ({meta['heads_source']})" if meta.get("heads_source") else "")


def _lookup_text(meta: dict) -> str:
    nodes = meta.get("lookup_nodes")
    if not nodes:
        return ""
    total = meta.get("lookup_tree_size")
    if total:  # the lookup methods' own tree: the one tuned with its chain, or the heads' tree and the chain
        return f" (medusa-lookup: {total} nodes, {nodes} of them a lookup chain)"
    return f" (+{nodes} lookup nodes in the lookup methods)"


def overall_markdown_table(report: dict) -> str:
    """Each method's overall row: the table the README's performance section shows for a run."""
    lines = [
        "| method | prompts | tokens/s | median tokens/s per prompt | accepted tokens/step | speedup vs autoregressive "
        "| speedup vs hf-generate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, result in report["methods"].items():
        s = result["overall"]
        lines.append(
            f"| {method} | {s['prompts']} | {_fmt(s['tokens_per_second'])} | {_fmt(s['median_tokens_per_second'])} | "
            f"{_fmt(s['mean_accepted'], 2)} | {_fmt(s['speedup'], 2, 'x')} | "
            f"{_fmt(s['speedup_vs_hf_generate'], 2, 'x')} |"
        )
    return "\n".join(lines)


def markdown_summary(report: dict) -> str:
    """Markdown tables of a report, for its summary.md in docs/benchmarks."""
    meta = report["meta"]
    methods = list(report["methods"])
    lines = [
        f"- Device: {meta['device']}{_threads_text(meta)}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}; {meta['dtype']}, batch 1, greedy.",
        f"- Model: {meta['model']}; heads: {_heads_text(meta)}; tree of {meta['tree_size']} nodes{_lookup_text(meta)}; "
        f"max {meta['max_new_tokens']} new tokens; {meta.get('prompts', len(report['questions']))} prompts.",
        f"- Command: `{meta['command']}`",
        f"- {equality_line(report)}.",
        "",
        overall_markdown_table(report),
    ]
    lines += [
        "",
        "Per category: tokens/s (speedup vs autoregressive, accepted tokens per step).",
        "",
        "| category | prompts | " + " | ".join(methods) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for category in report["methods"][methods[0]]["per_category"]:
        cells = []
        for method in methods:
            s = report["methods"][method]["per_category"][category]
            cells.append(
                f"{_fmt(s['tokens_per_second'])} ({_fmt(s['speedup'], 2, 'x')}, {_fmt(s['mean_accepted'], 2)})"
            )
        prompts = report["methods"][methods[0]]["per_category"][category]["prompts"]
        lines.append(f"| {category} | {prompts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str | Path) -> Path:
    """Two panels: speedup over our autoregressive decoding, and accepted tokens per step, per category."""
    figure = report_figure(report)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120)
    return path


def report_figure(report: dict):
    """The figure ``plot_report`` saves (a matplotlib ``Figure``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(report["methods"])
    categories = list(report["methods"][methods[0]]["per_category"]) + [OVERALL]

    def values(method: str, key: str) -> list[float]:
        result = report["methods"][method]
        picked = [result["per_category"][c] if c != OVERALL else result["overall"] for c in categories]
        return [s[key] if s[key] is not None else 0.0 for s in picked]

    figure = Figure(figsize=(max(7.0, 0.7 * len(categories) + 2.0), 8.0), layout="constrained")
    FigureCanvasAgg(figure)
    width = 0.8 / len(methods)
    positions = range(len(categories))
    meta = report["meta"]
    for row, (key, label) in enumerate(
        (("speedup", "speedup vs our autoregressive decoding"), ("mean_accepted", "accepted tokens per step"))
    ):
        axis = figure.add_subplot(2, 1, row + 1)
        for index, method in enumerate(methods):
            offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
            axis.bar(offsets, values(method, key), width, label=method)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(
            list(positions),
            categories,
            rotation=30 if len(categories) > 6 else 0,
            ha="right" if len(categories) > 6 else "center",
        )
        axis.set_ylabel(label)
    figure.suptitle(
        f"Spec-Bench: {meta['model']}, {meta['dtype']}, batch 1, greedy\n{meta['device']}", fontsize="medium"
    )
    _fitting_legend(figure, *axis.get_legend_handles_labels())
    return figure


def _fitting_legend(figure, handles: list, labels: list[str]) -> None:
    """A legend below the panels in as few rows as fit the figure's width: every method shows, at any count."""
    renderer = figure.canvas.get_renderer()
    for ncols in range(len(labels), 0, -1):
        legend = figure.legend(handles, labels, loc="outside lower center", ncols=ncols)
        if ncols == 1 or legend.get_window_extent(renderer).width <= 0.98 * figure.bbox.width:
            return
        legend.remove()
