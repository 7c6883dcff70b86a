#!/usr/bin/env python3
"""Collect the outputs of ``benchmarks/gpu_check.sh`` into ``gpu_check.json`` and ``gpu_check.md`` in its OUT folder.

Reads: ``steps.jsonl`` (rc, seconds and limit of each step), ``env.log``, ``pytest.xml`` and ``pytest_compile.xml``
(JUnit counts of ``pytest -m cuda``, added up, and the names of the failed cases), ``compile.log`` (each
``compile_chains`` mode's result as it finished), ``recipes.jsonl``,
``captured.jsonl`` and ``cifar10.jsonl`` (rows of ``benchmarks/recipe_speed.py``: random-data recipes as shipped and
with ``capture_step``, and cifar10_prior on real images).

Usage: python benchmarks/gpu_check_report.py --out DIR [--dry-run 0|1]
"""
from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()]


def pytest_counts(xml: Path) -> dict | None:
    """Counts of a JUnit XML file and the ids of the cases that failed or errored."""
    if not xml.exists():
        return None
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["failed_cases"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    return n


def compile_modes(log: str) -> dict[str, str]:
    """Each ``compile_chains`` mode's result as the compile step's ``pytest -v`` log printed it when it finished
    (kept even when the step's limit stopped pytest before it wrote its XML), and the whole-chain CUDA graph's
    comparison with the eager chain (``"whole chain"``)."""
    found = dict(re.findall(r"every_compile_mode\S*\[([\w-]+)\] (PASSED|FAILED|ERROR|SKIPPED)", log))
    whole = re.search(r"whole_chain_cuda_graph_matches_eager (PASSED|FAILED|ERROR|SKIPPED)", log)
    return found | ({"whole chain": whole.group(1)} if whole else {})


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    steps = _rows(out / "steps.jsonl")
    env = _read(out / "env.log")
    # nvidia-smi's CSV line (its header, from a check before noheader was asked for, names the unit in brackets)
    gpu = next((line for line in env.splitlines()[1:] if "," in line and "MiB" in line and "[MiB]" not in line), None)
    counts = [c for c in (pytest_counts(out / "pytest.xml"), pytest_counts(out / "pytest_compile.xml")) if c]
    total = {k: sum(c[k] for c in counts) for k in ("tests", "failures", "errors", "skipped", "passed")} if counts \
        else None
    if total is not None:
        total["failed_cases"] = [case for c in counts for case in c["failed_cases"]]
    res = {"dry_run": bool(a.dry_run), "gpu": gpu, "env": env.strip().splitlines(), "steps": steps,
           "total_seconds": sum(s["seconds"] for s in steps), "pytest_cuda": total,
           "recipes": _rows(out / "recipes.jsonl"), "captured": _rows(out / "captured.jsonl"),
           "cifar10_real": _rows(out / "cifar10.jsonl"), "compile_modes": compile_modes(_read(out / "compile.log"))}
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")

    dry = " (dry run on the CPU, tiny sizes: no number here is a GPU measurement)" if a.dry_run else ""
    md = [f"# lebm-zoo GPU check{dry}",
          "", f"Machine: {gpu or 'no GPU (nvidia-smi absent)'}; " + "; ".join(env.strip().splitlines()[:2]), "",
          "| step | rc | seconds | limit (s; with what earlier steps left) |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']:.1f} | {s.get('limit', '-')} |" for s in steps]
    md.append(f"| total | | {res['total_seconds']:.1f} | |")
    pc = res["pytest_cuda"]
    if pc:
        md += ["", f"`pytest -m cuda`: {pc['passed']} passed, {pc['failures'] + pc['errors']} failed, "
                   f"{pc['skipped']} skipped"]
        md += [f"- failed: `{c}`" for c in pc["failed_cases"]]
    if any(s["step"] == "compile" for s in steps):
        modes = res["compile_modes"]
        md += ["", "`compile_chains` modes (the compile step's log): " + (
            ", ".join(f"{m} {r}" for m, r in modes.items()) if modes else "none finished within the step's limit")]
    if res["recipes"] or res["captured"]:
        md += ["", "GPU-scale recipes on random data of their shape (s/iter after the warm-up; the implied time "
                   "of the recipe's whole schedule at that speed, training only). Variant \"eager\": the recipe as "
                   "shipped, the median of per-iteration times; `capture_step=true`: each step's chains, losses and "
                   "backward as one CUDA graph, with the losses read on the host every 50 steps (`SyncEvery(50)`), "
                   "the mean over one span synchronised at its two ends, so its gain over eager is the graph's and "
                   "the deferred reads' together (`benchmarks/run.py`'s `fp32_sync50` row separates them for "
                   "svhn_prior):", "",
               "| recipe | model | variant | precision | batch | s/iter | peak GiB | schedule iterations | "
               "implied hours |",
               "|---|---|---|---|---|---|---|---|---|"]
        for r in res["recipes"] + res["captured"]:
            variant = r.get("variant", "eager")
            if r["rc"]:
                md.append(f"| {r['recipe']} | | {variant} | {r['precision']} | | failed: {r.get('error', '')[:120]} "
                          "| | | |")
                continue
            md.append(f"| {r['recipe']} | {r['model']} | {variant} | {r['precision']} | {r['batch_size']} | "
                      f"{_num(r['s_per_iter'], '.4f')} | {_num(r['peak_memory_gib'], '.2f')} | "
                      f"{_num(r['schedule_iterations'], ',')} | {_num(r['implied_schedule_hours'], '.1f')} |")
    for r in res["cifar10_real"]:
        if r["rc"]:
            md += ["", f"cifar10_prior on real images failed: {r.get('error', '')[:200]}"]
            continue
        ld = r.get("loader", {})
        md += ["", f"cifar10_prior on real CIFAR-10 images ({r['precision']}): the training loader read "
                   f"{ld.get('images')} images at {_num(ld.get('images_per_s'), ',.0f')} images/s with "
                   f"{ld.get('workers')} workers; training {_num(r['s_per_iter'], '.4f')} s/iter at batch "
                   f"{r['batch_size']}, peak {_num(r['peak_memory_gib'], '.2f')} GiB"]
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
