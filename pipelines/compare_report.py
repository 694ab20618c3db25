"""The report of `tokgen compare`: `comparison.md`, `comparison.json` and the bar chart `comparison.png`.

One row per model, every figure named by its space and its kind (exact, estimate, two-stage bound,
tokens only, no density; see `pipelines/compare.py`), so that a reader never compares a bound with
an exact likelihood unawares. The chart draws test NLL in nats per image, coloured by kind, with the
published figure of the same protocol as a tick where the config gives one; it uses matplotlib's
object-oriented `Figure` with the Agg canvas, never `pyplot`, so no global figure state is created.
JSON has no NaN or Infinity, so non-finite numbers are written as null.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def _number(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def kind_cell(row: dict) -> str:
    """The kind of the NLL, with the parts a reader needs to judge it: the VAE's -ELBO, the bound's two terms."""
    parts = []
    if "negative_elbo_nats" in row:
        parts.append(f"-ELBO {_number(row['negative_elbo_nats'])}")
    if "searched_decoder_nll_nats" in row:
        parts.append(f"best searched code: -log p(x \\| z) {_number(row['searched_decoder_nll_nats'])} + -log p_prior(z) "
                     f"{_number(row['searched_prior_nll_nats'])}, {_number(row['searched_changed_tokens'])} tokens changed "
                     f"per image; the encoder's codes: {_number(row['encoder_bound_nats'])}")
    elif "decoder_nll_nats" in row:
        parts.append(f"-log p(x \\| z) {_number(row['decoder_nll_nats'])} + -log p_prior(z) {_number(row['prior_nll_nats'])}")
    if "positions_per_l1_penalty" in row:
        parts.append("L1 strength chosen per position on validation: " + ", ".join(
            f"{value} for {count}" for value, count in row["positions_per_l1_penalty"].items()))
    return row["likelihood"] + (f" ({'; '.join(parts)})" if parts else "")


def markdown_table(report: dict) -> str:
    header = ("| model | prior | tokenizer | NLL (nats/image) | bits/dim | bits/token | kind | published | parameters "
              "| train (s) | sampling (ms/image) | Frechet (floor) | samples |")
    lines = [f"# Comparison `{report['name']}`", "",
             f"Data: {report['data'].get('source')} {report['data'].get('path') or ''} "
             f"(splits {report['split_sizes']}; binarised: {report['binarize']}; "
             f"{'class-conditional' if report['conditional'] else 'unconditional'}), device {report['device']}. "
             "Every NLL is on the whole test split.", "", header, "|" + " --- |" * 13]
    for row in report["models"]:
        nll = _number(row.get("nll_nats_per_image")) if row["likelihood"] != "no density" else "no density"
        if "val_nll_nats_per_image" in row:
            nll += f" (val {_number(row['val_nll_nats_per_image'])})"
        frechet = (f"{_number(row['frechet_distance'])} ({_number(row.get('frechet_floor'))})"
                   if "frechet_distance" in row else "-")
        parameters = f"{row['parameters']:,}" + (f" + {row['tokenizer_parameters']:,} tok." if row["tokenizer_parameters"] else "")
        milliseconds = row["sample_seconds_per_image"] * 1000.0
        lines.append(f"| {row['name']} | {row['prior']} | {row['tokenizer']} | {nll} | {_number(row.get('bits_per_dim'), 4)} "
                     f"| {_number(row.get('bits_per_token'), 4)} | {kind_cell(row)} | {_number(row.get('published_nats'))} "
                     f"| {parameters} | {_number(row.get('train_seconds'), 1)} | {_number(milliseconds, 2)} | {frechet} "
                     f"| [grid]({row['sample_grid_relative']}) |")
    lines += ["", "Kinds: *exact* = the model's own likelihood of the (binarised) pixels; *estimate* = the VAE's "
              "importance-weighted estimate with k samples (a stochastic lower bound on log p, so its NLL is an upper "
              "estimate; the negative ELBO is in comparison.json); *bound (two-stage)* = -log p(x | z) - log p_prior(z) "
              "with z = encode(x), an upper bound on the two-stage model's NLL (*codes searched*: -log of the sum of "
              "p(x | z) p_prior(z) over the distinct codes z that a search of each image's codes scored, still a bound "
              "since p(x) is the sum over all z); *tokens only* = NLL of the token "
              "sequence, not comparable with image NLLs; *no density* = a GAN (judge it by the Frechet distance in "
              "tokgen's classifier features, beside the real-vs-real floor). Training time excludes a shared "
              "tokenizer's (see tokenizer_train_seconds in comparison.json). A model whose training sets `eval_every` "
              "keeps the weights of its evaluation with the lowest validation loss (early stopping; `selected_step` in "
              "comparison.json); the others are scored as their training ends. With `evaluation.score_validation`, "
              "(val N) is the same figure on the validation split, for choosing between settings without the test split.", ""]
    return "\n".join(lines)


def bar_chart(report: dict, path: Path) -> Path:
    rows = report["models"]
    figure = Figure(figsize=(8, 0.45 * len(rows) + 1.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    values = [row.get("nll_nats_per_image") or 0.0 for row in rows]
    colours = {"exact": "tab:blue", "estimate": "tab:orange", "bound": "tab:green"}
    for position, row, value in zip(positions, rows, values):
        kind = row["likelihood"].split(" ")[0].rstrip(",")
        if row.get("nll_nats_per_image") is None:
            label = "no density" if row["likelihood"] == "no density" else "tokens only"
            axes.text(0, position, f"  {label}", va="center", fontsize=8)
            continue
        axes.barh(position, value, color=colours.get(kind, "tab:gray"), label=kind)
        axes.text(value, position, f" {value:.1f}", va="center", fontsize=8)
        if row.get("published_nats"):
            axes.plot([row["published_nats"]] * 2, [position - 0.4, position + 0.4], color="black", linewidth=1.5)
    axes.set_yticks(positions, [row["name"] for row in rows])
    axes.invert_yaxis()
    axes.set_xlabel("test NLL, nats per image (black tick: published figure)")
    handles = {label: handle for handle, label in zip(*axes.get_legend_handles_labels())}
    if handles:
        axes.legend(handles.values(), handles.keys(), loc="lower right", fontsize=8)
    published = [row["published_nats"] for row in rows if row.get("published_nats")]
    axes.set_xlim(0, max(values + published + [1.0]) * 1.15)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    return path


def _finite(value):
    """JSON has no NaN or Infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def write_reports(directory: Path, report: dict) -> None:
    (directory / "comparison.json").write_text(json.dumps(_finite(report), indent=2, default=str) + "\n")
    (directory / "comparison.md").write_text(markdown_table(report))
    bar_chart(report, directory / "comparison.png")
    logger.info("comparison written to %s", directory / "comparison.md")
