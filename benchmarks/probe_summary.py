"""One table of every benchmark step `benchmarks/gpu_probe.sh` finished, each against its `base` step.

    python benchmarks/probe_summary.py gpu_probe/

Each step wrote `<step>.json` (the `gptrain bench --json` result list). The table is `gptrain bench`'s own,
with the step's name in the config column, followed by one line per step that says what it changed against
`base` (tokens/s and peak memory): the figures a decision about a CUDA default is made from.
Steps are listed in the order they ran (file modification time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gptrain.bench import format_table, variant_label


def load_steps(folder: Path) -> list[dict[str, Any]]:
    """Every bench result in the folder, each named after its step (its file's stem)."""
    results = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipped {path.name}: {e}", file=sys.stderr)
            continue
        if not isinstance(rows, list):
            continue
        for r in rows:
            if isinstance(r, dict) and "tokens_per_sec" in r:
                results.append({**r, "name": path.stem})
    return results


def peak_memory(r: dict[str, Any]) -> float | None:
    """GB: the allocator's peak on CUDA, the process's peak RSS on CPU (a dry run)."""
    mem = r.get("memory") or {}
    return mem.get("mem/peak_allocated_gb", mem.get("mem/rss_peak_gb"))


def against_base(results: list[dict[str, Any]], base_name: str = "base") -> list[str]:
    base = next((r for r in results if r["name"] == base_name), None)
    if base is None:
        return [f"no '{base_name}' step finished: nothing to compare against"]
    lines = []
    base_mem = peak_memory(base)
    for r in results:
        if r is base:
            continue
        speed = r["tokens_per_sec"] / base["tokens_per_sec"]
        line = f"{r['name']} ({variant_label(r)}): tokens/s ×{speed:.3f} against {base_name}"
        if r.get("batch_size") != base.get("batch_size"):
            line += f" (batch {r.get('batch_size')} against {base.get('batch_size')})"
        mem = peak_memory(r)
        if mem is not None and base_mem:
            line += f", peak memory {mem:.1f} GB against {base_mem:.1f} GB"
        if r.get("mfu_spec") is not None:
            line += f", MFU (spec) {100 * r['mfu_spec']:.1f}%"
        lines.append(line)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    results = load_steps(args.folder)
    if not results:
        print(f"no benchmark results in {args.folder}")
        return 1
    print(format_table(results, markdown=True))
    print()
    print("\n".join(against_base(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
