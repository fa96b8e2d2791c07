"""The quality benchmark's figure, drawn from its result records (``benchmarks/results/quality_*.json``).

Left: perplexity against weight bits for the weight-only schemes (W4 / W3 / W2, activations in FP), one
line per method - FP, RTN, GPTQ, AutoRound, CBQ - on a log axis, because RTN at 2 bits is orders of
magnitude off. Right: the relative output error after each block of the quantized model against the FP
model on the calibration rows, RTN (dashed) against CBQ (solid), one colour per scheme: where along the
depth CBQ's cross-block training pays off.

Only what the records hold is drawn: a peer that did not run is named in the legend as not run, and
records made before the benchmark kept RTN's per-block errors show CBQ's alone (said in the panel title).
matplotlib is optional (``pip install -e ".[plot]"``): :func:`plot_unavailable` says why it cannot draw.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

#: methods of the left panel, in legend order: (label, key of the row or of row["peers"], style)
METHODS = (
    ("FP", "fp", {"color": "black", "linestyle": ":", "marker": None}),
    ("RTN", "rtn", {"color": "tab:red", "linestyle": "--", "marker": "s"}),
    ("GPTQ", "gptq", {"color": "tab:orange", "linestyle": "-", "marker": "^"}),
    ("GPTQ (act-order, MSE grid)", "gptq-tuned", {"color": "tab:orange", "linestyle": "--", "marker": "^"}),
    ("AutoRound (200 iters)", "autoround", {"color": "tab:purple", "linestyle": "-", "marker": "v"}),
    ("AutoRound (50 iters)", "autoround-light", {"color": "tab:purple", "linestyle": "--", "marker": "v"}),
    ("CBQ (shipped recipe)", "cbq", {"color": "tab:blue", "linestyle": "-", "marker": "o"}),
    # a record whose "cbq" run is not CBQ (full-rank offsets or no overlap: quality.is_cbq) is drawn as what it is
    ("offset rounding, earlier recipe (not CBQ)", "not_cbq", {"color": "tab:gray", "linestyle": "-", "marker": "x"}),
)
PEER_KEYS = ("gptq", "gptq-tuned", "autoround", "autoround-light")
#: the extensions beyond the paper a recipe may carry (keys of a record's ``recipe_deviations``), as the plot names
#: them beside the CBQ point they touch: a figure labelled CBQ says what besides CBQ produced it
EXTENSION_NAMES = (
    ("extensions.gptq", "GPTQ start"), ("extensions.clip_search", "clip search"), ("rounding.rank", "wide LoRA"),
    ("extensions.column_scale", "column scale"), ("extensions.rotation", "rotation"),
    ("extensions.end_to_end", "end-to-end phase"), ("extensions.correction", "low-rank correction"),
    ("extensions.mixed", "mixed precision"),
)
#: keys inside an extension's section that widen what it trains, named after the extension's own name when a record's
#: recipe sets them true (the norms trained in the end-to-end phase are a lever of their own, measured apart)
EXTENSION_OPTIONS = {"extensions.end_to_end": ("norms",)}
SCHEME_COLOURS = ("tab:green", "tab:blue", "tab:red", "tab:brown", "tab:pink")


def plot_unavailable() -> str | None:
    """Why the plot cannot be drawn here (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]')"
    return None


def _weight_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of weight-only schemes, most bits first."""
    from cbq_lightning.quant.scheme import parse_scheme

    chosen = [r for r in records if not parse_scheme(r["row"]["scheme"]).quantizes_activations]
    return sorted(chosen, key=lambda r: -parse_scheme(r["row"]["scheme"]).w_bits)


def _value(row: dict[str, Any], key: str) -> float | None:
    if key in PEER_KEYS:
        peer = (row.get("peers") or {}).get(key)
        return peer.get("ppl") if peer and peer.get("status") == "ok" else None
    if key in ("cbq", "not_cbq"):  # the row's recipe run goes to one of the two lines, by what it trained
        return row.get("cbq") if bool(row.get("is_cbq")) == (key == "cbq") else None
    return row.get(key)


def extensions(record: dict[str, Any]) -> list[str]:
    """The extensions the record's CBQ cell ran with (its recipe's deviations from the paper settings), each with the
    options inside it that widen what it trains (:data:`EXTENSION_OPTIONS`): a lever measured on its own is named too."""
    import yaml

    from benchmarks.quality import today_key

    deviations = {today_key(key): shipped for key, (_, shipped) in (record.get("recipe_deviations") or {}).items()}
    names = []
    for key, name in EXTENSION_NAMES:
        if key in deviations:
            section = yaml.safe_load(deviations[key])
            options = [option for option in EXTENSION_OPTIONS.get(key, ())
                       if isinstance(section, dict) and section.get(option) is True]
            names.append(f"{name} with {', '.join(options)}" if options else name)
    return names


def block_errors(record: dict[str, Any]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(cbq, rtn)`` as ``[(block, relative error)]``; RTN's from the RTN run of the same invocation
    (``rtn_block_errors``) or from the CBQ run's RTN reference (``advanced.monitor.rtn_reference``), else empty."""
    errors = (record.get("cbq_report") or {}).get("block_errors") or []
    cbq = [(e["block"], e["quantized"]) for e in errors if e.get("quantized") is not None]
    rtn = [(e["block"], e["quantized"]) for e in record.get("rtn_block_errors") or [] if e.get("quantized") is not None]
    if not rtn:
        rtn = [(e["block"], e["rtn"]) for e in errors if e.get("rtn") is not None]
    return cbq, rtn


def _subtitle(records: list[dict[str, Any]]) -> str:
    row = records[0]["row"]
    evaluation = row.get("eval") or {}
    model = ((records[0].get("cbq_report") or {}).get("model") or {}).get("name_or_path", "")
    windows = f"{evaluation.get('windows')} x {evaluation.get('seqlen')} tokens" if evaluation.get("windows") else ""
    return ", ".join(part for part in (model, evaluation.get("dataset", ""), windows) if part)


def plot_quality(records: list[dict[str, Any]], path: Path) -> Path:
    """Draw the two panels from the benchmark records (``quality_<scheme>.json`` contents) into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cbq_lightning.quant.scheme import parse_scheme

    chosen = _weight_only(records)
    if not chosen:
        raise ValueError("no weight-only scheme (W<b>A16) among the records: nothing to plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bits = [parse_scheme(r["row"]["scheme"]).w_bits for r in chosen]
    for label, key, style in METHODS:
        points = [(b, _value(r["row"], key)) for b, r in zip(bits, chosen, strict=True)]
        points = [(b, v) for b, v in points if v is not None]
        if not points:
            if key in PEER_KEYS:  # a peer that did not run is named, not silently missing
                left.plot([], [], label=f"{label} (not run)", **style)
            continue
        xs, ys = zip(*points, strict=True)
        if key == "cbq":  # the extensions every point ran with in the legend, a point's own ones beside it
            named = {b: extensions(r) for b, r in zip(bits, chosen, strict=True) if _value(r["row"], key) is not None}
            common = [name for name in next(iter(named.values())) if all(name in n for n in named.values())]
            label = f"{label}\n+ " + ", ".join(common) if common else label
            for b, value in points:
                own = [name for name in named[b] if name not in common]
                if own:
                    last = b == bits[-1]  # the rightmost point's names go below its left, inside the axes and under the line
                    # wrapped: two neighbouring points' names share the width between their ticks
                    names = "\n".join(textwrap.fill(f"+ {name}", width=20, subsequent_indent="  ") for name in own)
                    left.annotate(names, (b, value), textcoords="offset points",
                                  xytext=(-6 if last else 6, -12 if last else -6), ha="right" if last else "left", va="top",
                                  fontsize="small", color=style["color"])
        left.plot(xs, ys, label=label, linewidth=1.8, markersize=6, **style)
    left.set_yscale("log")
    bottom, top = left.get_ylim()
    left.set_ylim(bottom / 6, top)  # room under the lowest points for the (wrapped) lines naming their extensions
    left.set_xticks(bits, [f"W{b}\n{r['row']['scheme']}" for b, r in zip(bits, chosen, strict=True)])
    left.set_xlim(max(bits) + 0.3, min(bits) - 0.3)  # fewer bits to the right
    left.set_xlabel("weight bits (activations not quantized)")
    left.set_ylabel("perplexity (log scale)")
    left.set_title("Perplexity vs weight bits")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    missing_rtn = []
    for colour, record in zip(SCHEME_COLOURS, chosen, strict=False):
        scheme = record["row"]["scheme"]
        cbq, rtn = block_errors(record)
        if cbq:
            name = "CBQ" if record["row"].get("is_cbq") else "offset rounding (not CBQ)"
            right.plot(*zip(*cbq, strict=True), color=colour, linestyle="-", marker="o", markersize=3,
                       label=f"{scheme} {name}")
        if rtn:
            right.plot(*zip(*rtn, strict=True), color=colour, linestyle="--", marker="s", markersize=3,
                       label=f"{scheme} RTN")
        else:
            missing_rtn.append(scheme)
    right.set_yscale("log")
    right.set_xlabel("block")
    right.set_ylabel("relative output error vs FP (log scale)")
    title = "Per-block output error on the calibration rows"
    if missing_rtn:
        title += f"\n(no RTN per-block errors recorded for {', '.join(missing_rtn)})"
    right.set_title(title)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize="small")
    fig.suptitle(_subtitle(chosen))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
