"""Regenerate the README's speed table from the benchmarks' JSON output.

Reads what ``em_speed.py --json``, ``cardiac_case.py --json`` and ``brain.py --json`` wrote and
replaces the lines between ``<!-- speed-table:begin -->`` and ``<!-- speed-table:end -->`` in the
README; each row names the machine, date and command it came from. A file not given leaves its
rows out.

    python benchmarks/speed_tables.py --em em.json --case case.json --brain brain.json [more.json] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"


def em_rows(d: dict) -> list:
    large = {r["backend"]: r for r in d["rows"] if r["size"] == "3d-large" and r["device"] == "cpu"}
    rows = []
    if "mvmm" in large:
        ref = f"scikit-learn {large['sklearn']['seconds_per_iter']:.2f} s" if "sklearn" in large else "–"
        rows.append(("EM iteration, 6.9 M voxels (3 images × 4 tissues × 2 subtypes)",
                     f"{large['mvmm']['seconds_per_iter']:.2f} s", ref, d))
    cuda = [r for r in d["rows"] if r["size"] == "3d-large" and r["device"].startswith("cuda")]
    for r in cuda:
        rows.append(("EM iteration, 6.9 M voxels, CUDA", f"{r['seconds_per_iter']:.3f} s", "–", d))
    return rows


def case_rows(d: dict) -> list:
    rows = []
    for device, s in d["summary"].items():
        dice = "/".join(f"{v:.3f}" for v in s["dice_mean"].values())
        rows.append((f"MS-CMRSeg case (LGE + C0, outputs written), {device}: median (max)",
                     f"{s['median_s']:.1f} s ({s['max_s']:.1f} s)", f"Dice {dice}", d))
    return rows


def brain_rows(d: dict) -> list:
    by = {r["tool"]: r for r in d["rows"]}
    rows = []
    for tool in ("mvmm", "atropos", "samseg"):
        if tool in by:
            r = by[tool]
            dice = "/".join(f"{v:.2f}" for v in r["agreement"].values())
            rows.append((f"1 mm brain, T1 + T2: {tool} (whole process)", f"{r['seconds']:.0f} s, "
                         f"{r['peak_rss_bytes'] / 1e9:.1f} GB", f"Dice CSF/GM/WM {dice}", d))
    return rows


def short(command: str) -> str:
    """The command as a reader would type it: absolute paths (this machine's folders) by their last part."""
    words = [Path(w).name if w.startswith("/") else w for w in command.split()]
    return " ".join(words if words[0] == "python" else ["python"] + words)


def table(rows: list) -> str:
    lines = ["| what | time | beside it | machine, date | command |", "|---|---|---|---|---|"]
    for what, time, beside, d in rows:
        lines.append(f"| {what} | {time} | {beside} | {d['machine']}, {d['date']} | `{short(d['command'])}` |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--em", type=Path)
    parser.add_argument("--case", type=Path)
    parser.add_argument("--brain", type=Path, nargs="+", default=[], help="brain.py's JSON (one or more runs).")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    args = parser.parse_args()
    rows = []
    for path, make in [(args.em, em_rows), (args.case, case_rows)] + [(p, brain_rows) for p in args.brain]:
        if path is not None:
            rows += make(json.loads(path.read_text()))
    text = args.readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"--readme: {args.readme} has no {BEGIN} … {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(head + BEGIN + "\n" + table(rows) + "\n" + END + tail)
    print(table(rows))


if __name__ == "__main__":
    main()
