"""The colour benchmark's table over seeds: median and spread of what `bench/colour_train.sh` wrote.

    .venv/bin/python -m bench.colour_summary [ROOT] [--preset cpu-color]
    .venv/bin/python -m bench.colour_summary ROOT --preset cpu-color-sigma15   # runs with TAG=sigma15
    .venv/bin/python -m bench.colour_summary ROOT --preset cpu-blind --out bench/results/gray_cpu-blind.json
    .venv/bin/python -m bench.colour_summary ROOT --preset cpu-blind --earlier bench/results/gray_cpu-blind.json \
        --out bench/results/gray_cpu-blind.json   # add new seeds to those an earlier summary holds

Reads ROOT/<preset>[-<tag>]-seed<N>/{train,evaluate}.json (ROOT defaults to .bench/colour) and
prints, per dataset and sigma, every seed's PSNR/SSIM, their median and their spread
(max - min), with the epochs each run finished; writes bench/results/colour_<preset>.json.
`--earlier FILE` takes the seeds that a summary written before holds and ROOT does not (their
run folders may be long gone): the figures are the ones that run measured, nothing is rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", nargs="?", default=str(REPO / ".bench" / "colour"))
    parser.add_argument("--preset", default="cpu-color", help="the runs' name: the preset, and -TAG when given one")
    parser.add_argument("--out", help="where the JSON goes (default bench/results/colour_<preset>.json)")
    parser.add_argument("--earlier", help="a summary this script wrote before: its seeds that ROOT lacks are kept")
    args = parser.parse_args()
    runs = earlier_runs(Path(args.earlier)) if args.earlier else {}
    for folder in sorted(Path(args.root).glob(f"{args.preset}-seed*")):
        if (folder / "evaluate.json").exists() and (folder / "train.json").exists():
            runs[int(folder.name.rsplit("seed", 1)[1])] = {
                "train": json.loads((folder / "train.json").read_text()),
                "evaluate": json.loads((folder / "evaluate.json").read_text())["by_sigma"]}
    runs = dict(sorted(runs.items()))
    if not runs:
        raise SystemExit(f"no finished {args.preset} runs under {args.root}")
    rows = []
    for first in next(iter(runs.values()))["evaluate"]:
        per_seed = {seed: result_for(run["evaluate"], first) for seed, run in runs.items()}
        psnrs = [result["output_psnr"] for result in per_seed.values()]
        ssims = [result["output_ssim"] for result in per_seed.values()]
        rows.append({"data": data_name(first), "sigma": first["noise_sigma"],
                     "input_psnr": first["input_psnr"], "psnr_by_seed": dict(zip(per_seed, psnrs)),
                     "ssim_by_seed": dict(zip(per_seed, ssims)),
                     "psnr_median": statistics.median(psnrs), "psnr_spread": max(psnrs) - min(psnrs),
                     "ssim_median": statistics.median(ssims)})
    epochs = {seed: run["train"].get("epoch") for seed, run in runs.items()}
    print(f"{args.preset}: seeds {sorted(runs)}, best epoch per seed {epochs}")
    print(f"{'data':<8} {'sigma':>5} {'noisy':>6} {'median':>7} {'spread':>6} {'SSIM':>6}  per seed")
    for row in rows:
        seeds = " ".join(f"{psnr:.2f}" for psnr in row["psnr_by_seed"].values())
        print(f"{row['data']:<8} {row['sigma']:>5g} {row['input_psnr']:>6.2f} {row['psnr_median']:>7.2f} "
              f"{row['psnr_spread']:>6.2f} {row['ssim_median']:>6.4f}  {seeds}")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"colour_{args.preset}.json"
    out.write_text(json.dumps({"preset": args.preset, "seeds": sorted(runs), "epochs": epochs, "rows": rows,
                               "train": {seed: run["train"] for seed, run in runs.items()}}, indent=2, default=str))
    print(f"written to {out}")


def data_name(result: dict) -> str:
    return result["data"].rstrip("/").rsplit("/", 1)[-1]


def result_for(results: list[dict], like: dict) -> dict:
    """The result for the same dataset and sigma as `like`: runs may list them in another order."""
    for result in results:
        if data_name(result) == data_name(like) and result["noise_sigma"] == like["noise_sigma"]:
            return result
    raise SystemExit(f"a run has no result for {data_name(like)} at sigma {like['noise_sigma']}")


def earlier_runs(path: Path) -> dict:
    """The runs an earlier summary holds, in the shape read from ROOT (seed -> train, evaluate rows)."""
    summary = json.loads(path.read_text())
    runs = {}
    for seed in summary["seeds"]:
        rows = []
        for row in summary["rows"]:
            ssims = row.get("ssim_by_seed")
            if ssims is None and len(summary["seeds"]) > 1:
                raise SystemExit(f"{path} predates per-seed SSIM and holds several seeds: rerun it from its run folders")
            rows.append({"data": row["data"], "noise_sigma": row["sigma"], "input_psnr": row["input_psnr"],
                         "output_psnr": row["psnr_by_seed"][str(seed)],
                         "output_ssim": ssims[str(seed)] if ssims else row["ssim_median"]})
        runs[int(seed)] = {"train": summary["train"][str(seed)], "evaluate": rows}
    return runs


if __name__ == "__main__":
    main()
