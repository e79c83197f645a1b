"""The run report: per stage and per language, documents, bytes and tokens kept and dropped
(and per license when the pipeline has a `license` stage), as `report.md` (tables) with
matplotlib charts and `report.json`, next to the output.

Tokens are counted exactly where a tokenizer runs (the `pack` stage); for earlier stages the
report estimates tokens from bytes with the packed output's bytes-per-token ratio, and says so.
"""

from __future__ import annotations

from pathlib import Path

from codeshell.data.io import atomic_path, write_json_atomic


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _charts(out: Path, rows: list[dict], langs: dict[str, list[int]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    labels = [r["stage"] for r in rows]
    kept = [r["bytes_out"] / 1e6 for r in rows]
    dropped = [(r["bytes_in"] - r["bytes_out"]) / 1e6 for r in rows]
    ax.bar(labels, kept, label="kept")
    ax.bar(labels, dropped, bottom=kept, label="dropped", color="tab:red")
    ax.set_ylabel("MB")
    ax.set_title("Bytes kept and dropped per stage")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    with atomic_path(out / "report-stages.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    names.append("report-stages.png")
    top = sorted(langs.items(), key=lambda kv: -kv[1][2])[:25]
    if top:
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(top)), 4))
        ax.bar([k for k, _ in top], [v[2] / 1e6 for _, v in top], label="ingested", color="lightgray")
        ax.bar([k for k, _ in top], [v[3] / 1e6 for _, v in top], label="kept")
        ax.set_ylabel("MB")
        ax.set_title("Bytes per language: ingested vs kept at the end")
        ax.legend()
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
        fig.tight_layout()
        with atomic_path(out / "report-languages.png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        names.append("report-languages.png")
    return names


def _license_counts(rows: list[dict]) -> dict[str, list[int]]:
    """license -> [kept, dropped] from the `license` stage's counters (`license:MIT:kept`)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        for k, v in r["counters"].items():
            if k.startswith("license:") and k.endswith((":kept", ":dropped")):
                name, _, what = k[len("license:"):].rpartition(":")
                out.setdefault(name, [0, 0])[0 if what == "kept" else 1] += v
    return out


def write_report(out: Path, pipeline, stats: dict) -> Path:
    """Write report.md / report.json (and charts) into `out`; returns the markdown path."""
    out = Path(out)
    labels = [s.label for s in pipeline.stages]
    rows = [{"stage": lab, **{k: stats[lab].get(k, 0) for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds")},
             "counters": stats[lab]["counters"], "reduce": stats[lab].get("reduce", {})} for lab in labels]
    last = stats[labels[-1]]
    tokens = last["counters"].get("tokens")
    bpt = (last["bytes_out"] / tokens) if tokens else None
    # per language: ingested (first stage out) vs final (last stage out)
    first, final = stats[labels[0]]["by_lang"], last["by_lang"]
    # "in" per language: what left language identification (or the first stage that knew languages)
    lid = next((lab for s, lab in zip(pipeline.stages, labels) if s.name == "langid"), None)
    source = stats[lid]["by_lang"] if lid else first
    langs: dict[str, list[int]] = {k: [v[1], 0, v[3], 0] for k, v in source.items() if v[1]}
    for lang, row in final.items():
        langs.setdefault(lang, [0, 0, 0, 0])
        langs[lang][1], langs[lang][3] = row[1], row[3]
    try:
        charts = _charts(out, rows, langs)
    except ImportError:
        charts = []
    md = ["# Data pipeline report", "",
          f"Output: `{out}`. Stages run in order; each row counts what entered and left the stage.", ""]
    md += ["| stage | docs in | docs out | dropped | MB in | MB out | MB dropped | est. tokens dropped | CPU s | MB/s per core |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        dropped_b = r["bytes_in"] - r["bytes_out"]
        est = f"{dropped_b / bpt:,.0f}" if bpt else "n/a"
        red = r["reduce"]
        secs = r["seconds"] + sum(red.get(k, 0) for k in ("collect_seconds", "reduce_seconds", "prepare_seconds"))
        rate = f"{r['bytes_in'] / 1e6 / secs:.2f}" if secs > 0 else "-"
        md.append(f"| {r['stage']} | {r['docs_in']:,} | {r['docs_out']:,} | {r['docs_in'] - r['docs_out']:,} | "
                  f"{_mb(r['bytes_in'])} | {_mb(r['bytes_out'])} | {_mb(dropped_b)} | {est} | {secs:.2f} | {rate} |")
    if tokens:
        md += ["", f"Packed output: {tokens:,} tokens in {last['counters'].get('sequences', 0):,} sequences, "
                   f"{bpt:.2f} bytes per token (used for the token estimates above)."]
    md += ["", "## Counters", ""]
    for r in rows:
        extra = {**r["counters"], **{f"reduce:{k}": v for k, v in r["reduce"].items()}}
        extra = {k: v for k, v in extra.items() if not k.startswith(("tokens:", "license:"))}
        if extra:
            md.append(f"- **{r['stage']}**: " + ", ".join(f"{k} = {v:,}" if isinstance(v, int) else f"{k} = {v:.4g}"
                                                         for k, v in sorted(extra.items())))
    lic = _license_counts(rows)
    if lic:
        md += ["", "## Licenses", "", "Documents per license (SPDX) at the `license` stage.", "",
               "| license | docs | kept | dropped |", "| --- | ---: | ---: | ---: |"]
        for name, (kept, dropped) in sorted(lic.items(), key=lambda kv: (-sum(kv[1]), kv[0])):
            md.append(f"| {name} | {kept + dropped:,} | {kept:,} | {dropped:,} |")
    md += ["", "## Languages", "", "| language | docs in | docs kept | MB in | MB kept | tokens kept |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for lang, v in sorted(langs.items(), key=lambda kv: -kv[1][2]):
        tk = last["counters"].get(f"tokens:{lang}")
        md.append(f"| {lang} | {v[0]:,} | {v[1]:,} | {_mb(v[2])} | {_mb(v[3])} | {f'{tk:,}' if tk else '-'} |")
    # which stage dropped how much of each language (MB)
    top = [k for k, _ in sorted(langs.items(), key=lambda kv: -kv[1][2])[:15]]
    if top:
        md += ["", "## MB dropped per stage and language", "",
               "| stage | " + " | ".join(top) + " |", "| --- |" + " ---: |" * len(top)]
        after = labels[labels.index(lid) + 1:] if lid else labels[1:]  # languages are known from here on
        for lab in after:
            bl = stats[lab]["by_lang"]
            cells = [_mb(bl[k][2] - bl[k][3]) if k in bl else "-" for k in top]
            if any(c not in ("-", "0.00") for c in cells):
                md.append(f"| {lab} | " + " | ".join(cells) + " |")
    md += [""] + [f"![{c}]({c})" for c in charts]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    write_json_atomic(out / "report.json", {"stages": rows, "languages": langs, "bytes_per_token": bpt,
                                            "licenses": {k: {"kept": v[0], "dropped": v[1]} for k, v in lic.items()}})
    return path
