"""Everything written from one evaluation report: tables (Markdown), loss-by-position CSV and PNG.

All outputs are rendered from one JSON-ready ``report`` dict (the content of ``results.json``),
so the table, the CSV and the plot cannot disagree with it::

    {"protocol": {...}, "data": {...}, "context_lengths": [2048, 8192],
     "models": [{"name": ..., "results": [{"context_length": 2048, "perplexity": ..., "mean_nll": ...,
                                           "bits_per_byte": ..., "tokens": ..., "buckets": [...]}]}]}
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

CSV_FIELDS = ("model", "protocol", "context_length", "bucket_start", "bucket_end", "mean_nll", "count")
FILES = {"json": "results.json", "table": "table.md", "csv": "loss_by_position.csv", "png": "loss_by_position.png"}


def context_label(c: int) -> str:
    """2048 → '2K', 1048576 → '1M', 3000 → '3000'."""
    if c >= 2**20 and c % 2**20 == 0:
        return f"{c // 2**20}M"
    if c >= 1024 and c % 1024 == 0:
        return f"{c // 1024}K"
    return str(c)


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


PROTOCOL_TITLES = {"non-overlapping": "non-overlapping windows", "sliding": "sliding windows"}


def protocols(report: dict) -> list[str]:
    """The protocols of a report, in order (reports before sliding windows were added have one)."""
    return report["protocol"].get("protocols") or ["non-overlapping"]


def _by_context(model: dict, protocol: str = "non-overlapping") -> dict[int, dict]:
    return {r["context_length"]: r for r in model["results"] if r.get("protocol", "non-overlapping") == protocol}


def _interval_cell(r: dict, digits: int) -> str:
    iv = r.get("interval")
    if not iv or not all(math.isfinite(iv[k]) for k in ("low", "high")):
        return _cell(r["perplexity"], digits)
    return f"{_cell(r['perplexity'], digits)} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}]"


def table(report: dict, metric: str, digits: int, protocol: str = "non-overlapping", intervals: bool = False) -> str:
    """One Markdown table in the shape of the paper's Table 2: rows models, columns context lengths
    (``intervals``: perplexity cells carry their bootstrap interval)."""
    contexts = report["context_lengths"]
    head = "| Model | Trained at | " + " | ".join(context_label(c) for c in contexts) + " |"
    rule = "|---|---|" + "---|" * len(contexts)
    lines = [head, rule]
    for m in report["models"]:
        res = _by_context(m, protocol)
        trained = m.get("train_seq_len")
        if intervals and metric == "perplexity":
            cells = [_interval_cell(res[c], digits) if c in res else "n/a" for c in contexts]
        else:
            cells = [_cell(res[c][metric] if c in res else None, digits) for c in contexts]
        lines.append(f"| {m['name']} | {context_label(trained) if trained else '?'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference_cell(d: dict) -> str:
    mark = " *" if d["excludes_zero"] else ""
    return f"{d['percent']:+.2f}% [{d['low']:+.2f}, {d['high']:+.2f}]{mark}"


def comparison_tables(report: dict, protocol: str) -> list[str]:
    """Markdown: perplexity change between context lengths of each model, and between models."""
    comp = report.get("comparisons")
    if not comp:
        return []
    out = []
    ctx = [d for d in comp["contexts"] if d["protocol"] == protocol]
    if ctx:
        pairs = sorted({(d["from"], d["to"]) for d in ctx})
        out += ["| Model | " + " | ".join(f"{context_label(a)} → {context_label(b)}" for a, b in pairs) + " |",
                "|---|" + "---|" * len(pairs)]
        for m in report["models"]:
            got = {(d["from"], d["to"]): d for d in ctx if d["model"] == m["name"]}
            out.append(f"| {m['name']} | " + " | ".join(_difference_cell(got[p]) if p in got else "n/a"
                                                        for p in pairs) + " |")
        out.append("")
    mod = [d for d in comp["models"] if d["protocol"] == protocol]
    if mod:
        contexts = sorted({d["context_length"] for d in mod})
        out += ["| B vs A | " + " | ".join(context_label(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for a, b in dict.fromkeys((d["a"], d["b"]) for d in mod):
            got = {d["context_length"]: d for d in mod if (d["a"], d["b"]) == (a, b)}
            out.append(f"| {b} vs {a} | " + " | ".join(_difference_cell(got[c]) if c in got else "n/a"
                                                      for c in contexts) + " |")
        out.append("")
    return out


def notes(report: dict) -> list[str]:
    """The protocol and what was scored, as Markdown bullet lines."""
    out = [f"- Protocol: {report['protocol']['description']}"]
    data = report["data"]
    out.append(f"- Data: {data['description']}")
    if report.get("intervals"):
        iv = report["intervals"]
        out.append(f"- Intervals: {iv['confidence']:.0%} {iv['method']} ({iv['resamples']:,} resamples of the "
                   f"{len(data.get('scored_documents', {}).get('names', []))} scored documents, seed {iv['seed']}); "
                   "a difference marked * has an interval that excludes 0.")
    for line in report.get("notes", []):
        out.append(f"- {line}.")
    for m in report["models"]:
        res = m["results"]
        if not res:
            continue
        r0 = res[0]
        scored = f"{r0['tokens']:,} targets ({r0['bytes']:,} bytes)" if r0.get("bytes") else f"{r0['tokens']:,} targets"
        line = f"- {m['name']}: every column scores the same {scored} of {r0['documents']} documents"
        if m.get("segment_lengths"):
            line += f"; attention pattern ({m.get('pattern', 'trained')}) w = {m['segment_lengths']}, r = {m['dilation_rates']}"
        cap = m.get("cap")
        if cap:
            line += (f"; capped by --max_tokens {cap['max_tokens']:,}: {cap['tokens_used']:,} of "
                     f"{cap['tokens_available']:,} tokens read ({cap['documents_used']} of "
                     f"{cap['documents_available']} documents, the last one cut)")
        out.append(line + ".")
        out += [f"  - {note}." for note in m.get("context_notes", [])]
        for r in _by_context(m).values():
            if r["short_documents"]:
                c = r["context_length"]
                msg = (f"  - context {context_label(c)}: {r['short_documents']} of {r['documents']} documents have "
                       f"fewer than {c + 1:,} tokens and are scored as one shorter window")
                if r["longest_document"] < c + 1:
                    msg += (f"; the longest has {r['longest_document']:,} tokens, so this column sees at most "
                            f"{r['longest_document'] - 1:,} tokens of context")
                out.append(msg + ".")
    return out


def markdown(report: dict) -> str:
    """table.md: per protocol, perplexity (with intervals), changes with context and between
    models, bits per byte and mean NLL; then the notes."""
    parts = ["# Perplexity by context length", ""]
    has_bpb = any(r.get("bits_per_byte") is not None for m in report["models"] for r in m["results"])
    with_iv = bool(report.get("intervals"))
    for protocol in protocols(report):
        title = PROTOCOL_TITLES.get(protocol, protocol)
        parts += [f"## {title[0].upper() + title[1:]}", "",
                  "Perplexity (lower is better)" + (f", {report['intervals']['confidence']:.0%} interval" if with_iv
                                                    else "") + ":", "",
                  table(report, "perplexity", 3, protocol, intervals=with_iv), ""]
        comp = comparison_tables(report, protocol)
        if comp:
            parts += ["Perplexity change (paired, percent; negative = better):", "", *comp]
        if has_bpb:
            parts += ["Bits per byte (comparable across tokenizers):", "", table(report, "bits_per_byte", 4, protocol), ""]
        parts += ["Mean NLL (nats per token):", "", table(report, "mean_nll", 4, protocol), ""]
    parts += ["## Notes", "", *notes(report), ""]
    if report.get("command"):
        parts += ["Command:", "", "```", report["command"], "```", ""]
    return "\n".join(parts)


def csv_rows(report: dict) -> list[dict]:
    """Rows of loss_by_position.csv: one per (model, context length, position bucket)."""
    rows = []
    for m in report["models"]:
        for r in m["results"]:
            for b in r["buckets"]:
                rows.append({
                    "model": m["name"], "protocol": r.get("protocol", "non-overlapping"),
                    "context_length": r["context_length"], "bucket_start": b["start"],
                    "bucket_end": b["end"], "mean_nll": b["mean_nll"], "count": b["count"],
                })
    return rows


def write_csv(report: dict, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in csv_rows(report):
            w.writerow({**row, "mean_nll": repr(float(row["mean_nll"]))})


def plot(report: dict, path: Path) -> list[dict]:
    """loss_by_position.png: mean NLL against position (log scale), one line per (model, context);
    below it, the number of scored targets in each position bucket (the first buckets hold few,
    so their means are noisy).

    Colour = model, line style and marker = context length. Vertical lines mark each model's
    training length (dashed) and longest segment (dotted, dilated attention only). Returns the
    plotted series (model, context_length, points), which are also stored in the PNG's
    "Description" text; the marked lengths are in its "Markers" text.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    colors = ["tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]
    contexts = report["context_lengths"]
    fig = Figure(figsize=(8.5, 6.4), dpi=120)
    FigureCanvasAgg(fig)
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    series, markers = [], []
    for mi, m in enumerate(report["models"]):
        color = colors[mi % len(colors)]
        for r in _by_context(m).values():  # non-overlapping windows: every position 1..c is scored
            b = r["buckets"]
            if not b:
                continue
            ci = contexts.index(r["context_length"]) if r["context_length"] in contexts else 0
            ls, marker = styles[ci % len(styles)]
            xs = [math.sqrt(x["start"] * x["end"]) for x in b]
            ys = [x["mean_nll"] for x in b]
            label = f"{m['name']} @ {context_label(r['context_length'])}"
            ax.plot(xs, ys, linestyle=ls, marker=marker, markersize=4, color=color, label=label)
            counts.plot(xs, [x["count"] for x in b], linestyle=ls, marker=marker, markersize=3, color=color)
            series.append({"model": m["name"], "context_length": r["context_length"], "points": len(b)})
        for kind, key, ls in (("training length", "train_seq_len", "--"), ("longest segment", "longest_segment", ":")):
            x = m.get(key)
            if x:
                for axis in (ax, counts):
                    axis.axvline(x, color=color, linestyle=ls, linewidth=1, alpha=0.7)
                ax.annotate(f"{kind} {context_label(x)}", (x, 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -3 - 11 * len(markers)), textcoords="offset points", fontsize=7,
                            color=color, va="top")
                markers.append({"model": m["name"], "kind": kind, "position": int(x)})
    counts.set_xscale("log", base=2)
    counts.set_yscale("log")
    counts.xaxis.set_major_formatter(FuncFormatter(lambda v, _: context_label(int(round(v))) if v >= 1 else ""))
    counts.set_xlabel("position in the window = tokens of context (log scale; bucket geometric centre)")
    counts.set_ylabel("targets")
    ax.set_ylabel("mean NLL (nats per token)")
    ax.set_title("Loss by position in the context")
    for axis in (ax, counts):
        axis.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Description": json.dumps(series), "Markers": json.dumps(markers)})
    return series


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, table.md, loss_by_position.csv and loss_by_position.png; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in FILES.items()}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(markdown(report), encoding="utf-8")
    write_csv(report, paths["csv"])
    plot(report, paths["png"])
    return paths
