"""Test-time adaptation on CIFAR-10-C-style corruptions: error per corruption and cost.

Evaluates source (no adaptation), BN adaptation, TENT (online), TTT and TTT-online on the 15
corruptions at one severity, from a source run folder written by ``fastadapt tta train-source
--rotation-head``, and compares every method with the source on the same images (a paired
difference with a 95% CI; significant when the interval excludes 0). Writes JSON after every cell
(resumable: cells already in the file with the same model and settings are kept) and a bar plot.

    python benchmarks/tta_cifar10c.py --run RUN_DIR --data-dir ../shared/data/cifar10 \
        --ttt-images 64 --ttt-online-images 500 --out benchmarks/results/tta_cifar10c_resnet8.json

TTT runs a per-image optimisation (10 SGD steps on 32 augmented copies per image); on a CPU it is
evaluated on a fixed seeded subset of the test stream (the first N images of the same seeded
order every method sees), and the source is evaluated on exactly those images. To put more images
behind TTT where it matters, run it on a few corruptions within a time budget, e.g.

    python benchmarks/tta_cifar10c.py --run RUN_DIR --data-dir ../shared/data/cifar10 --methods ttt \
        --ttt-images 400 --ttt-corruptions fog,contrast,gaussian_noise --budget 3600 --out ttt400.json

A cell whose expected time (from the cells of the same method so far) does not fit in what is left
of ``--budget`` is not started; run the same command again to continue.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import commit, machine  # noqa: E402

from fastadapt.measure.threads import cost_context, load_average
from fastadapt.tta.evaluate import CI_KIND, evaluate_run, format_tta_result, paired_difference
from fastadapt.io import atomic_write_text
from fastadapt.errors import DataError
from fastadapt.tta.corruptions import CORRUPTIONS, frost_photographs
from fastadapt.tta.train_source import CHECKPOINT, OLD_CHECKPOINT, read_run

FORMAT = 2
PAPER = {
    "source": "ResNet-26, severity 5, mean over 15 corruptions: 40.8 (TENT paper, Table 2)",
    "bn": "17.3 (TENT paper, Table 2)",
    "tent": "14.3 (TENT paper, Table 2)",
    "ttt": "17.5 (TENT paper, Table 2, TTT with its joint-training baseline)",
    "ttt-online": "20.4 with its own baseline at 34.6 (TTT paper, severity 5, ResNet-26 with GroupNorm)",
}
METHODS = ("source", "bn", "tent", "ttt", "ttt-online")
TTT_METHODS = ("ttt", "ttt-online")
BATCH = 128


def _model_digest(run: Path) -> str:
    path = run / CHECKPOINT if (run / CHECKPOINT).is_file() else run / OLD_CHECKPOINT
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _names(text: str) -> list[str]:
    names = list(CORRUPTIONS) if text == "all" else [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise SystemExit(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)} or all")
    return names


def _cell(r: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}


def _method_settings(m: str, ttt_bn: str, ttt_head: str) -> str:
    ttt = ("10 plain SGD steps (lr 1e-3, as the authors' code) on 32 augmented randomly rotated copies, "
           + ("trunk and rotation head trained" if ttt_head == "train" else "trunk only, rotation head frozen")
           + ("; BatchNorm keeps source statistics" if ttt_bn == "frozen" else
              "; auxiliary branch in train mode during the steps (BatchNorm running statistics, momentum 0.1, "
              "move towards the test image's; reset with the weights)"))
    return {
        "source": "eval mode, source BatchNorm statistics",
        "bn": f"BatchNorm with test-batch statistics, batch {BATCH}",
        "tent": f"online, Adam lr 1e-3, batch {BATCH}, one step per batch, BatchNorm affine only",
        "ttt": "reset per image, " + ttt,
        "ttt-online": "weights and BatchNorm statistics kept across the stream, 1 step per image, otherwise "
                      "as ttt: " + ttt,
    }[m]


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CORRUPTIONS) + ["mean"]
    methods = [m for m in METHODS if doc["results"].get(m)]
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        cells = doc["results"][m]
        vals = [cells[c]["error"] if c in cells else float("nan") for c in CORRUPTIONS]
        vals.append(doc["mean_error"].get(m, float("nan")))
        ax.bar([i + k * width for i in range(len(names))], vals, width,
               label=f"{m} ({doc['method_config'][m]['images']} imgs/corruption)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=40, ha="right")
    ax.set_ylabel("error (%)")
    ax.set_title(f"CIFAR-10-C-style corruptions, severity {doc['severity']}, {doc['model']['arch']} "
                 f"({doc['model']['epochs']} epochs, CPU)")
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _significance(c: dict | None) -> str:
    if c is None:
        return "no comparison (per-image outcomes missing)"
    ci = f"{c['ci95']:.2f}" if c["ci95"] is not None else "n/a"
    verdict = {True: "significant", False: "not significant", None: "no CI (single batch)"}[c["significant"]]
    return f"{c['difference']:+.2f} ± {ci} points, {verdict}"


def source_reference(doc: dict, m: str, name: str) -> dict | None:
    """The source's result on the same images as method ``m`` on corruption ``name``."""
    same = doc["source_on_same_images"].get(m, {}).get(name)
    full = doc["results"].get("source", {}).get(name)
    cell = doc["results"][m][name]
    for ref in (same, full):
        if ref is not None and ref.get("images") == cell["images"] and "wrong_bits" in ref:
            return ref
    return None


def compare(doc: dict) -> None:
    """Paired differences to the source per cell and over each method's corruptions."""
    doc["difference_to_source"] = {}
    for m, cells in doc["results"].items():
        if m == "source":
            continue
        out, pairs = {}, []
        for name, cell in cells.items():
            ref = source_reference(doc, m, name)
            if ref is not None and "wrong_bits" in cell:
                out[name] = _cell(paired_difference(cell, ref, CI_KIND[m]))
                pairs.append((cell, ref))
        if len(pairs) > 1:
            mean = paired_difference([p[0] for p in pairs], [p[1] for p in pairs], CI_KIND[m])
            out["mean"] = _cell({**mean, "corruptions": [n for n in cells if n in out]})
        doc["difference_to_source"][m] = out


def _fresh(settings: dict) -> dict:
    return {"format": FORMAT, "settings": settings, "method_config": {}, "results": {}, "source_on_same_images": {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="folder written by 'fastadapt tta train-source --rotation-head'")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--corruptions", default="all", help="comma-separated corruptions, or all")
    p.add_argument("--max-images", type=int, default=0, help="source/BN/TENT subset (0: all 10,000)")
    p.add_argument("--ttt-images", type=int, default=64, help="images per corruption for TTT")
    p.add_argument("--ttt-online-images", type=int, default=500, help="images per corruption for TTT-online")
    p.add_argument("--ttt-corruptions", default=None,
                   help="run TTT and TTT-online on these corruptions only (comma-separated; default: --corruptions)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds: start no cell that is not expected to finish within this run time (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (recorded with every cost figure)")
    p.add_argument("--ttt-bn", default="train", choices=["train", "frozen"],
                   help="TTT on a BatchNorm model: keep the source statistics or update them during the steps")
    p.add_argument("--ttt-head", default="train", choices=["train", "frozen"],
                   help="TTT: train the rotation head with the trunk (default, as the authors) or the trunk only")
    p.add_argument("--out", default="benchmarks/results/tta_cifar10c_resnet8.json")
    p.add_argument("--merge", nargs="*", default=[],
                   help="JSON files of runs with the same settings (e.g. methods run in parallel) to take cells from")
    args = p.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    out = Path(args.out)
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}; choose from {', '.join(METHODS)}")
    names = _names(args.corruptions)
    ttt_names = _names(args.ttt_corruptions) if args.ttt_corruptions else names
    if "frost" in names + ttt_names:
        try:  # checked before any work, not after the corruptions before frost
            frost_photographs()
        except DataError as exc:
            raise SystemExit(f"{exc} (or leave frost out with --corruptions)") from None
    run = Path(args.run)
    model_cfg, summary = read_run(run)
    images = {"source": args.max_images, "bn": args.max_images, "tent": args.max_images,
              "ttt": args.ttt_images, "ttt-online": args.ttt_online_images}
    ttt_options = {"ttt_bn": args.ttt_bn, "ttt_head": args.ttt_head}
    method_config = {m: {"images": images[m] or 10000, "batch_size": BATCH,
                         "options": ttt_options if m in TTT_METHODS else {}} for m in METHODS}
    settings = {"severity": args.severity, "seed": args.seed, "model_sha256_16": _model_digest(run)}
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if doc.get("format") != FORMAT or doc.get("settings") != settings:
        if doc:
            print(f"note: {out} holds results of another model, settings or file format; starting a new file")
        doc = _fresh(settings)
    for m in methods:  # a method run with other images or options starts its cells afresh
        if doc["method_config"].get(m) != method_config[m]:
            doc["results"].pop(m, None)
            doc["source_on_same_images"].pop(m, None)
        doc["method_config"][m] = method_config[m]
    doc.update(
        description="Error (%) of test-time adaptation methods on CIFAR-10 test images (JPEG re-encodings in "
                    "../shared/data) with the 15 CIFAR-10-C corruptions (our vectorised implementation of the "
                    "published parameters, seeded), each corruption evaluated from the source model afresh; "
                    "95% CI per image (source, ttt) or over batches (bn, tent, ttt-online), see each cell's "
                    "ci_method; difference_to_source is paired on the same images.",
        command=" ".join([sys.executable.split('/')[-1]] + sys.argv[:1] + (argv if argv is not None else sys.argv[1:])),
        machine={**machine(), "threads": cost_context()["threads"], "load_avg_before": load_before, "device": "cpu",
                 "note": "CPU shared with other jobs: timings are noisy; each cell carries its own cost_context"},
        git_commit=commit(),
        date=datetime.now(timezone.utc).isoformat(),
        severity=args.severity,
        model={"arch": model_cfg["arch"], "norm": model_cfg["norm"], "rotation_head": model_cfg["rotation_head"],
               "epochs": model_cfg["epochs"], "train_seconds": summary.get("train_seconds"),
               "clean_test_error": summary.get("clean_test_error"),
               "training": "SGD momentum 0.9 nesterov, lr 0.1 cosine, wd 5e-4, batch 128, crop+flip"
                           + (", joint rotation loss (clean and rotated batches in separate passes)"
                              if model_cfg["rotation_head"] else ""),
               "train_command": (f"fastadapt tta train-source --dataset cifar10 --data-dir ../shared/data/cifar10 "
                                 f"--arch {model_cfg['arch']} --norm {model_cfg['norm']}"
                                 f"{' --rotation-head' if model_cfg['rotation_head'] else ''} "
                                 f"--epochs {model_cfg['epochs']} --out RUN_DIR")},
        figures_from=f"All figures come from the CPU-sized {model_cfg['arch']} trained here. No ResNet-26 figures: "
                     "ResNet-26 (fastadapt tta train-source --arch resnet26) needs a GPU that this machine lacks.",
        paper_anchors_mean_error_severity5=PAPER,
        method_settings={m: _method_settings(m, args.ttt_bn, args.ttt_head) for m in METHODS},
        stream=f"CIFAR-10 test set in a seeded random order (seed {args.seed}); methods with a subset see its "
               "first N images",
    )
    for part in args.merge:
        other = json.loads(Path(part).read_text())
        if other.get("format") != FORMAT or other.get("settings") != settings:
            raise SystemExit(f"{part} was run with another model or other settings; cannot merge it")
        doc.setdefault("merged_runs", [])
        if other.get("command") not in doc["merged_runs"]:
            doc["merged_runs"].append(other.get("command"))
        for m, cfg in other["method_config"].items():
            if doc["method_config"].setdefault(m, cfg) != cfg:
                raise SystemExit(f"{part} ran {m} with {cfg}, not {doc['method_config'][m]}; cannot merge it")
            for key in ("results", "source_on_same_images"):
                doc[key].setdefault(m, {}).update(other.get(key, {}).get(m, {}))

    def save() -> None:
        doc["mean_error"] = {m: sum(c["error"] for c in cells.values()) / len(cells)
                             for m, cells in doc["results"].items() if len(cells) == len(CORRUPTIONS)}
        compare(doc)
        doc["machine"]["load_avg_after"] = load_average()  # at the last save: the end of the run
        doc["wall_seconds_this_run"] = round(time.perf_counter() - started, 1)
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")

    def evaluate(m: str, name: str, n_images: int) -> dict:
        return evaluate_run(run, m, [name], args.severity, args.data_dir, BATCH, n_images, args.seed,
                            options=ttt_options if m in TTT_METHODS else {}, progress=False)[0]

    not_started = []
    for m in methods:
        cells = doc["results"].setdefault(m, {})
        for name in (ttt_names if m in TTT_METHODS else names):
            if name in cells:
                continue
            left = args.budget - (time.perf_counter() - started) if args.budget else float("inf")
            done = [c["wall_seconds"] for c in cells.values() if "wall_seconds" in c]
            expected = sum(done) / len(done) if done else 0.0
            if left <= 0 or expected > left:
                not_started.append(f"{m}/{name}")
                continue
            t0 = time.perf_counter()
            r = evaluate(m, name, images[m])
            if m != "source" and (images[m] != images["source"] or name not in doc["results"].get("source", {})):
                doc["source_on_same_images"].setdefault(m, {})[name] = _cell(evaluate("source", name, images[m]))
            r["wall_seconds"] = round(time.perf_counter() - t0, 1)
            cells[name] = _cell(r)
            save()
            ref = source_reference(doc, m, name)
            vs = (f"  vs source {ref['error']:.2f} on the same images: "
                  f"{_significance(doc['difference_to_source'].get(m, {}).get(name))}" if m != "source" and ref else "")
            print(format_tta_result(r) + vs, flush=True)
    save()
    if not_started:
        print(f"budget: {len(not_started)} cell(s) not started ({', '.join(not_started)}); "
              "run the same command again to continue")
    print(significance_report(doc))
    _plot(doc, out.with_suffix(".png"))
    print(markdown_summary(doc))
    print(f"load average before {load_before}, after {doc['machine']['load_avg_after']}; "
          f"{torch.get_num_threads()} thread(s)")
    return 0


def significance_report(doc: dict) -> str:
    """One line per method and corruption set: error against the source on the same images."""
    lines = []
    for m in METHODS:
        diffs = doc.get("difference_to_source", {}).get(m)
        if m == "source" or not doc["results"].get(m):
            continue
        cells = doc["results"][m]
        if diffs and "mean" in diffs:
            names = diffs["mean"]["corruptions"]
            mean = sum(cells[n]["error"] for n in names) / len(names)
            src = sum(source_reference(doc, m, n)["error"] for n in names) / len(names)
            lines.append(f"{m:<10} mean over {len(names)} corruption(s), {diffs['mean']['images']} images each: "
                         f"{mean:.2f} vs source {src:.2f}: {_significance(diffs['mean'])}")
        for n in cells:
            lines.append(f"  {m:<10} {n:<18} {_significance((diffs or {}).get(n))}")
    return "\n".join(lines)


def markdown_summary(doc: dict) -> str:
    """The per-method table of the README: mean error, the source on the same images, the paired
    difference with its 95% CI, costs (medians over corruptions)."""
    rows = ["| method | corruptions | images per corruption | mean error (%) | source on the same images (%) | "
            "difference (points, 95% CI) | ms per image | ms per batch | peak memory (MB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in METHODS:
        cells = doc["results"].get(m)
        if not cells:
            continue
        names = list(cells)
        mean = sum(cells[n]["error"] for n in names) / len(names)
        refs = [source_reference(doc, m, n) for n in names] if m != "source" else []
        same = f"{sum(r['error'] for r in refs) / len(refs):.1f}" if refs and None not in refs else "-"
        diff = doc.get("difference_to_source", {}).get(m, {})
        d = diff.get("mean") if len(names) > 1 else diff.get(names[0])
        d_txt = "-" if d is None else _significance(d).replace(" points", "")
        vals = list(cells.values())
        ms_img = sorted(c["ms_per_image"] for c in vals)[len(vals) // 2]
        ms_batch = sorted(c["ms_per_batch"] for c in vals)[len(vals) // 2]
        peak = max(c["peak_mem_mb"] for c in vals)
        rows.append(f"| {m} | {len(names)} | {vals[0]['images']} | {mean:.1f} | {same} | {d_txt} | {ms_img:.1f} | "
                    f"{ms_batch:.0f} (batch {vals[0]['batch_size']}) | {peak:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
