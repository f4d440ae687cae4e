"""Regenerate README.md's performance section from benchmarks/results/*.json.

    python3 benchmarks/update_readme.py
    python3 benchmarks/update_readme.py --table RESULT.json   # one file's table, to stdout

Each table names the machine its numbers were measured on; only full (non --quick, non-sweep)
runs are used, the newest per device.
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _estimate(row: dict) -> str:
    # A median below its floor, where the floor was no bound (older results files lack the flag).
    return " (floor an estimate)" if row.get("floor_is_estimate") else ""


def _step(row: dict) -> str:
    """The step a row times: its architecture and, with AuxK, the dead fraction (older results
    files, without these fields, timed TopK without AuxK)."""
    arch = row.get("architecture", "topk")
    if row.get("transcoder"):
        arch += " skip transcoder" if row.get("skip") else " transcoder"
    dead = row.get("dead_fraction")
    return arch if dead is None else f"{arch}, AuxK {dead:.0%} dead"


def _speedup(pairs: dict, baseline: str) -> str:
    row = pairs.get(baseline)
    return "-" if row is None else f"{row['speedup']:.2f}x"


def _headline(result: dict) -> str:
    """The step training runs most: TopK with AuxK at 1% dead latents, against SAELens' math."""
    rows = [r for r in result["rows"] if r["op"] == "train_step" and r.get("architecture") == "topk"
            and r.get("dead_fraction") == 0.01 and not r.get("transcoder") and not r["is_baseline"]
            and r["baseline"] == "torch-dense"]
    if not rows:
        return ""
    best = min(rows, key=lambda r: r["ms"])
    peers = [r for r in result["rows"] if r["op"] == "train_step" and r.get("dead_fraction") == 0.01
             and r.get("architecture") == "topk" and r["backend"] in ("saelens", "sparsify") and r["baseline"] == "torch-dense"]
    vs_peers = "".join(f", {r['ms'] / best['ms']:.2f}x {r['backend']}'s own step ({r['ms']:.0f} ms)" for r in peers)
    return (f"Headline, the step training runs (TopK with AuxK, 1% of latents dead, {best['shape']}): "
            f"{best['backend']} {best['ms']:.0f} ms, {best['speedup']:.2f}x SAELens' math in pure torch "
            f"(torch-dense, {best['baseline_ms']:.0f} ms){vs_peers}.\n\n")


def _table(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"**{meta['device']}**, {meta['dtype']}, {meta['date']} (torch {meta['torch']}; "
        f"measured ceilings {meta['ceilings']['matmul_tflops']:.2f} TFLOP/s matmul, "
        f"{meta['ceilings']['copy_gbps']:.0f} GB/s copy)",
        "",
        _headline(result) + "| op | shape | step | backend | ms (median) | x floor | vs torch-dense | vs torch-sparse | peak MiB (vs dense) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    seen = set()
    key = lambda r: (r["op"], r["shape"], _step(r), r["backend"])  # noqa: E731
    for r in rows:
        if r["is_baseline"] or key(r) in seen:
            continue
        seen.add(key(r))
        pairs = {x["baseline"]: x for x in rows if key(x) == key(r)}
        dense = pairs.get("torch-dense")
        mem = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        dmem = "-" if dense is None or dense["baseline_peak_mem_bytes"] is None else f"{dense['baseline_peak_mem_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['op']} | {r['shape']} | {_step(r)} | {r['backend']} | {r['ms']:.1f} | {r['of_floor']:.2f}{_estimate(r)} | "
            f"{_speedup(pairs, 'torch-dense')} | {_speedup(pairs, 'torch-sparse')} | {mem} ({dmem}) |"
        )
    return "\n".join(lines)


def main() -> None:
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--table":  # print one result file's table
        print(_table(json.loads(Path(sys.argv[2]).read_text())))
        return
    newest: dict[str, tuple[str, dict]] = {}
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: cannot read it as JSON: {exc}")
        meta = result.get("meta", {})
        if "rows" not in result or meta.get("quick") or meta.get("sweep"):
            continue
        key = meta["device"]
        if key not in newest or meta["date"] >= newest[key][0]:
            newest[key] = (meta["date"], result)
    body = "\n\n".join(_table(r) for _, r in sorted(newest.values(), key=lambda t: t[1]["meta"]["device"]))
    body = body or "No full benchmark results yet: run `fastsae bench --json auto`."
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: missing the {START} / {END} markers")
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), f"{START}\n{body}\n{END}", text, flags=re.S)
    readme.write_text(text)
    print(f"updated {readme} from {len(newest)} result file(s)")


if __name__ == "__main__":
    main()
