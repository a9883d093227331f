"""Benchmark bookkeeping: the token-equality check, per-category aggregation, the JSON schema, table and plot."""

from __future__ import annotations

import json

import pytest

from helpers.bench import META, METHODS, hand_made_records, sample
from medusa.bench.report import (
    aggregate,
    answer_agreement,
    build_report,
    equality_line,
    first_difference,
    markdown_summary,
    merge_reports,
    plot_report,
    report_figure,
    report_table,
    token_equality,
    validate_report,
    write_report,
)
from medusa.bench.runner import Record


@pytest.mark.parametrize(
    "reference, other, expected",
    [([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2, 3], [1, 2], 2), ([1], [1, 2], 1), ([], [], None)],
)
def test_first_difference(reference, other, expected):
    assert first_difference(reference, other) == expected


def test_token_equality_counts_mismatches_and_finds_the_first():
    result = token_equality(hand_made_records(), "autoregressive", "medusa")
    assert result["compared"] == 3
    assert result["mismatches"] == 2
    assert result["first_mismatch"] == {
        "question_id": 2,
        "category": "writing",
        "turn": 1,
        "position": 3,
        "reference_token": 3,
        "method_token": 9,
    }
    same = token_equality(hand_made_records(), "autoregressive", "hf-generate")
    assert (same["compared"], same["mismatches"], same["first_mismatch"]) == (3, 0, None)


def test_token_equality_only_compares_prompts_with_both_methods():
    records = hand_made_records()
    del records[0].samples["medusa"]
    assert token_equality(records, "autoregressive", "medusa")["compared"] == 2
    assert token_equality(records, "autoregressive", "prompt-lookup")["compared"] == 0


def test_per_category_and_overall_aggregation_give_the_worked_numbers():
    report = build_report(META, hand_made_records(), METHODS)
    ar, medusa, hf = (report["methods"][m] for m in METHODS)
    writing = medusa["per_category"]["writing"]
    assert writing["prompts"] == 2 and writing["new_tokens"] == 150
    assert writing["tokens_per_second"] == pytest.approx(150 / 1.5)
    assert ar["per_category"]["writing"]["tokens_per_second"] == pytest.approx(150 / 4.0)
    assert writing["speedup"] == pytest.approx((150 / 1.5) / (150 / 4.0))
    assert writing["speedup_vs_hf_generate"] == pytest.approx((150 / 1.5) / (150 / 6.0))
    assert writing["median_tokens_per_second"] == pytest.approx(100.0)  # both prompts at 100 tokens/s
    assert ar["per_category"]["writing"]["median_tokens_per_second"] == pytest.approx((50 + 25) / 2)
    assert writing["mean_accepted"] == pytest.approx(152 / 60)
    assert writing["seconds"] == pytest.approx(2.5) and writing["prefill_seconds"] == pytest.approx(1.0)
    assert writing["end_to_end_tokens_per_second"] == pytest.approx(150 / 2.5)
    assert medusa["per_category"]["qa"]["speedup"] == pytest.approx(1.0)
    overall = medusa["overall"]
    assert overall["prompts"] == 3 and overall["new_tokens"] == 160
    assert overall["tokens_per_second"] == pytest.approx(160 / 2.5)
    assert overall["speedup"] == pytest.approx((160 / 2.5) / (160 / 5.0))
    assert overall["mean_accepted"] == pytest.approx(162 / 70)
    assert ar["overall"]["speedup"] == pytest.approx(1.0) and ar["overall"]["mean_accepted"] == 1.0
    assert hf["overall"]["speedup_vs_hf_generate"] == pytest.approx(1.0)
    assert list(ar["per_category"]) == ["writing", "qa"]


def test_speedups_are_absent_without_their_baseline():
    rows = build_report(META, hand_made_records(), METHODS)["questions"]
    result = aggregate(rows, ["medusa"])
    assert result["medusa"]["overall"]["speedup"] is None
    assert result["medusa"]["overall"]["speedup_vs_hf_generate"] is None
    assert result["medusa"]["overall"]["tokens_per_second"] == pytest.approx(64.0)


def test_report_has_the_documented_schema_and_survives_json(tmp_path):
    report = build_report(META, hand_made_records(), METHODS)
    path = write_report(report, tmp_path / "out" / "bench.json")
    loaded = json.loads(path.read_text())
    validate_report(loaded)
    assert set(loaded) == {"schema", "meta", "methods", "questions", "equality"}
    assert loaded["meta"]["device"] == "test cpu"
    question = loaded["questions"][1]
    assert question["id"] == 2 and question["category"] == "writing" and question["turn"] == 1
    assert question["methods"]["medusa"] == {
        "tokens": 50,
        "prefill_seconds": 0.5,
        "decode_seconds": 0.5,
        "seconds": 1.0,
        "steps": 20,
        "accepted": 52,
    }
    assert loaded["equality"]["mismatches"] == 2 and loaded["equality"]["compared"] == 3
    assert loaded["equality"]["others"]["hf-generate"]["mismatches"] == 0


def test_kept_token_ids_take_one_line_each_and_read_back_unchanged(tmp_path):
    report = build_report(META, hand_made_records(), METHODS)
    report["questions"][0]["methods"]["medusa"]["token_ids"] = [12, 7, 49151, 0]
    report["meta"]["scores"] = [0.5, 2]  # a list that is not all integers keeps its layout
    report["meta"]["command"] = "medusa bench --tree [[0],[1,2]]"  # and text that looks like one is left alone
    path = write_report(report, tmp_path / "bench.json")
    text = path.read_text()
    assert '"token_ids": [12, 7, 49151, 0]' in text
    assert '"scores": [\n' in text
    assert json.loads(text) == json.loads(json.dumps(report))


@pytest.mark.parametrize("path", [("meta", "device"), ("equality", "first_mismatch"), ("schema",)])
def test_validation_names_what_is_missing(path):
    report = build_report(META, hand_made_records(), METHODS)
    holder = report
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(ValueError, match=path[-1]):
        validate_report(report)


def test_validation_checks_each_summary_and_question():
    report = build_report(META, hand_made_records(), METHODS)
    del report["methods"]["medusa"]["per_category"]["qa"]["mean_accepted"]
    with pytest.raises(ValueError, match="methods.medusa.per_category.qa lacks mean_accepted"):
        validate_report(report)
    report = build_report(META, hand_made_records(), METHODS)
    del report["questions"][2]["methods"]["hf-generate"]["steps"]
    with pytest.raises(ValueError, match=r"questions\[2\].methods.hf-generate lacks steps"):
        validate_report(report)


def test_table_markdown_and_plot(tmp_path):
    report = build_report(META, hand_made_records(), METHODS)
    table = report_table(report)
    assert table.row_count == 3 * len(METHODS)  # two categories and overall
    markdown = markdown_summary(report)
    assert "| medusa | 3 | 64.0 | " in markdown and "2.00x" in markdown
    assert "| writing | 2 | 37.5 (1.00x, 1.00) | 100.0 (2.67x, 2.53) |" in markdown
    assert "2 of 3 prompts differ (first: question 2 turn 1, token 3)" in equality_line(report)
    png = plot_report(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speedups_use_only_the_prompts_both_methods_ran():
    records = hand_made_records()
    del records[1].samples["hf-generate"]  # transformers ran on prompts 1 and 3 only
    report = build_report(META, records, METHODS)
    medusa = report["methods"]["medusa"]["overall"]
    assert medusa["tokens_per_second"] == pytest.approx(160 / 2.5)  # all of its own prompts
    assert medusa["speedup_vs_hf_generate"] == pytest.approx((110 / 2.0) / (110 / 4.5))  # prompts 1 and 3
    assert report["methods"]["hf-generate"]["overall"]["prompts"] == 2


def test_merging_parts_gives_the_report_of_the_whole():
    records = hand_made_records()
    whole = build_report(META, records, METHODS)
    parts = [build_report(META, records[:2], METHODS), build_report(META, records[2:], METHODS)]
    merged = merge_reports(parts)
    validate_report(merged)
    assert merged["methods"] == whole["methods"]
    assert merged["questions"] == whole["questions"]
    assert {k: merged["equality"][k] for k in ("compared", "mismatches", "first_mismatch")} == {
        k: whole["equality"][k] for k in ("compared", "mismatches", "first_mismatch")
    }
    assert merged["equality"]["others"]["hf-generate"]["compared"] == 3
    assert merged["meta"]["prompts"] == 3 and len(merged["meta"]["merged_from"]) == 2


def test_merging_refuses_overlaps_and_other_setups():
    records = hand_made_records()
    with pytest.raises(ValueError, match="question 1 turn 1 is in more than one report"):
        merge_reports([build_report(META, records[:2], METHODS), build_report(META, records[:1], METHODS)])
    other = dict(META, model="other")
    with pytest.raises(ValueError, match="differ in model"):
        merge_reports([build_report(META, records[:2], METHODS), build_report(other, records[2:], METHODS)])
    with pytest.raises(ValueError, match="differ in lookup_nodes"):
        merge_reports(
            [
                build_report(dict(META, lookup_nodes=10), records[:2], METHODS),
                build_report(dict(META, lookup_nodes=4), records[2:], METHODS),
            ]
        )
    with pytest.raises(ValueError, match="differ in compile"):  # a compiled part is faster: not one setup
        merge_reports(
            [
                build_report(dict(META, compile=True), records[:2], METHODS),
                build_report(dict(META, compile=False), records[2:], METHODS),
            ]
        )


def test_answer_agreement_between_two_runs_kept_with_their_tokens():
    records = hand_made_records()
    with_tokens = build_report(META, records, METHODS, keep_tokens=True)
    assert with_tokens["questions"][1]["methods"]["medusa"]["token_ids"][:4] == [0, 1, 2, 9]
    assert "token_ids" not in build_report(META, records, METHODS)["questions"][0]["methods"]["medusa"]
    rows = with_tokens["questions"]
    # medusa against autoregressive: prompt 1 identical (100), prompt 2 differs at 3 (of 50), prompt 3 at 9 (of 10)
    result = answer_agreement(rows, "medusa", rows, "autoregressive")
    assert result["overall"] == {
        "prompts": 3,
        "identical": 1,
        "mean_common_prefix_tokens": (100 + 3 + 9) / 3,
        "mean_reference_tokens": (100 + 50 + 10) / 3,
    }
    assert result["per_category"]["qa"]["identical"] == 0 and result["per_category"]["writing"]["prompts"] == 2
    # Only prompts that both runs have count.
    assert answer_agreement(rows[:1], "medusa", rows, "autoregressive")["overall"]["prompts"] == 1
    with pytest.raises(ValueError, match="--keep-tokens"):
        answer_agreement(build_report(META, records, METHODS)["questions"], "medusa", rows, "autoregressive")


def test_equality_line_names_our_lookup_methods_too():
    records = hand_made_records()
    for record in records:
        record.samples["lookup"] = record.samples["autoregressive"]
    report = build_report(META, records, (*METHODS, "lookup"))
    line = equality_line(report)
    assert "medusa vs autoregressive: 2 of 3 prompts differ" in line and "lookup vs autoregressive: 0 of 3" in line
    assert "hf-generate" not in line  # transformers' methods stay in the JSON
    for record in records:
        del record.samples["medusa"]
    without_medusa = build_report(META, records, ("autoregressive", "lookup"))
    assert equality_line(without_medusa) == "token equality, lookup vs autoregressive: 0 of 3 prompts differ"
    alone = build_report(META, records, ("medusa",))
    assert equality_line(alone).startswith("token equality: not checked")


def test_plot_legend_shows_every_method_inside_the_figure():
    """Six methods and one category: the legend wraps onto more rows instead of running off the figure."""
    methods = ("autoregressive", "medusa", "medusa+lookup", "prompt-lookup", "hf-generate", "hf-assisted-lookup")
    records = [Record(1, "qa", 1, 10, {method: sample(10, 1.0 + index) for index, method in enumerate(methods)})]
    figure = report_figure(build_report(META, records, methods))
    figure.canvas.draw()
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == list(methods)
    box, bounds = legend.get_window_extent(), figure.bbox
    assert bounds.x0 <= box.x0 and box.x1 <= bounds.x1 and bounds.y0 <= box.y0


def test_piped_tables_print_in_full(tmp_path, capsys):
    """`medusa bench --merge ... | cat`: long method and category names are not cut to fit 80 columns."""
    from medusa.cli import main

    methods = ("autoregressive", "medusa", "medusa+lookup", "prompt-lookup", "hf-generate", "hf-assisted-lookup")
    parts = []
    for number, category in ((1, "mathematical_reasoning"), (2, "retrieval_augmented_generation")):
        records = [Record(number, category, 1, 10, {method: sample(10, 1.0) for method in methods})]
        parts.append(tmp_path / f"part{number}.json")
        write_report(build_report(META, records, methods), parts[-1])
    assert main(["bench", "--merge", *map(str, parts), "--output-dir", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert all(name in out for name in (*methods, "mathematical_reasoning", "retrieval_augmented_generation"))
