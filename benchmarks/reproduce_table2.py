"""Reproduce the trend of the LongNet paper's Table 2 at small scale, with intervals.

The paper (Table 2): LongNet trained at 8K improves as the evaluation context grows, a dense
Transformer trained at 2K gets worse past 2K. Here the four recipes ``recipes/repro-*.yaml``
(one 24M model, byte-level, trained on this environment's site-packages sources; they differ only
in attention and training length) are trained and evaluated in two steps:

1. ``run``: train some of the models side by side on one machine within a wall-clock budget,
   then evaluate each on the held-out packages (documents of at least 32,769 tokens, their first
   65,536 tokens) at 2K, 8K and 32K, with non-overlapping and sliding windows, LongNet both with
   its pattern as trained and capped at its training length. Small result files go to
   ``--export``::

       python -m benchmarks.reproduce_table2 run --models longnet-8k dense-8k --export results/a
       python -m benchmarks.reproduce_table2 run --models dense-2k longnet-32k --steps 2400 --export results/b

2. ``combine``: one report of all of them (``evaluate --from_results``: bootstrap intervals over
   documents, paired differences), the verdict against the criteria R1-R5 below, and a Markdown
   section for benchmarks/RESULTS.md::

       python -m benchmarks.reproduce_table2 combine results/a results/b --out_dir benchmarks/table2

Criteria (perplexity changes paired over documents, 95% intervals; non-overlapping windows
unless said otherwise):

- R1: LongNet-8K improves from 2K to 8K (interval excludes 0, at least 2% lower);
- R2: LongNet-8K at 32K is at most 4% worse than at 8K and better than at 2K;
- R3: the dense 2K model gets worse at each longer context (intervals exclude 0);
- R4: at 2K, LongNet-8K and dense-2K are within 3% of each other;
- R5: R1 also holds under sliding windows.

Verdict: reproduced (all hold); inconclusive (the dense 8K control gains nothing from 2K to 8K
under sliding windows either: the setup is too small to use 8K of context at all); partly (R1,
R3 and R4 hold, R1 not under sliding windows); not reproduced (the dense 8K control gains under
sliding windows and LongNet-8K does not); otherwise mixed, with the criteria that hold.

``--preset cpu-toy`` shrinks everything (the stdlib corpus, a 2-layer model, lengths / 8) for a
CPU smoke run of the whole pipeline in a few minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# name -> (recipe, display name)
MODELS = {
    "longnet-8k": ("repro-longnet-8k.yaml", "LongNet 8K"),
    "dense-2k": ("repro-dense-2k.yaml", "Transformer 2K"),
    "dense-8k": ("repro-dense-8k.yaml", "Transformer 8K"),
    "longnet-32k": ("repro-longnet-32k.yaml", "LongNet 32K"),
}

PRESETS: dict[str, dict] = {
    "h200": {
        "steps": 2400, "budget_s": 560, "eval_reserve_s": 120, "scale": 1,
        "contexts": [2048, 8192, 32768], "stride": "c/2",
        "min_document_tokens": 32769, "max_document_tokens": 65536,
        "overrides": None, "trainer": {}, "data": {},
    },
    "cpu-toy": {
        "steps": 40, "budget_s": 900, "eval_reserve_s": 60, "scale": 8,
        "contexts": [256, 1024, 4096], "stride": "c/2",
        "min_document_tokens": 4097, "max_document_tokens": 8192,
        "overrides": {"n_layer": 2, "n_embd": 96, "n_head": 12, "ffn_dim": 192},
        "trainer": {"accelerator": "cpu", "precision": "32-true"},
        "data": {"corpus": "stdlib", "num_workers": 0, "test_fraction": 0.2},
        "model": {"warmup_steps": 35, "compile": False},
    },
}


def recipe(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / MODELS[name][0]).read_text())


def fit_command(name: str, preset: dict, run_dir: Path, steps: int, until: float) -> list[str]:
    """The ``fit`` of one model: its recipe, the preset's changes, a TimeBudget ending at ``until``."""
    r = recipe(name)
    data, model = r["data"]["init_args"], r["model"]["init_args"]
    scale = preset["scale"]
    seq_len, batch = data["seq_len"] // scale, data["batch_size"]
    cmd = [
        sys.executable, "-m", "longnet_lightning", "fit", "--config", str(REPO / "recipes" / MODELS[name][0]),
        "--trainer.default_root_dir", str(run_dir), "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", str(10**9), "--checkpoint.save_top_k", "0",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks+=longnet_lightning.callbacks.TimeBudget", f"--trainer.callbacks.until={until:.1f}",
        "--data.seq_len", str(seq_len), "--data.batch_size", str(batch),
    ]
    for key, value in preset["trainer"].items():
        cmd += [f"--trainer.{key}", str(value)]
    for key, value in preset["data"].items():
        cmd += [f"--data.{key}", str(value)]
    for key, value in preset.get("model", {}).items():
        cmd += [f"--model.{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    if preset["overrides"]:
        cmd += ["--model.overrides", json.dumps(preset["overrides"])]
        if scale != 1 and model.get("attention") != "dense":
            from longnet_lightning.model import PATTERNS

            w, rates = PATTERNS["paper"]
            cmd += ["--model.segment_lengths", json.dumps([x // scale for x in w]),
                    "--model.dilation_rates", json.dumps(list(rates))]
    return cmd


def evaluate_command(name: str, preset: dict, ckpt: Path, out_dir: Path) -> list[str]:
    patterns = ["trained", "capped"] if name.startswith("longnet") else ["trained"]
    return [
        sys.executable, "-m", "longnet_lightning", "evaluate", "--no_progress", "--ckpt_path", str(ckpt),
        "--names", MODELS[name][1], "--patterns", *patterns,
        "--context_lengths", *map(str, preset["contexts"]), "--stride", preset["stride"],
        "--min_document_tokens", str(preset["min_document_tokens"]),
        "--max_document_tokens", str(preset["max_document_tokens"]), "--out_dir", str(out_dir),
        *(["--device", "cpu"] if preset["trainer"].get("accelerator") == "cpu" else []),
    ]


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    print(f"$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    f = open(log, "w", encoding="utf-8")
    f.write(f"$ {shlex.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, tuple[subprocess.Popen, Path]], what: str) -> None:
    """Wait for every process; when one fails, stop the others at once and exit with its log's end."""
    while True:
        failed = [name for name, (proc, _) in procs.items() if proc.poll() not in (None, 0)]
        if failed or all(proc.poll() == 0 for proc, _ in procs.values()):
            break
        time.sleep(1.0)
    if failed:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name in failed:
            proc, log = procs[name]
            print(f"error: {what} of {name} failed (exit {proc.returncode}); the end of {log}:", flush=True)
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), flush=True)
        raise SystemExit(f"error: {what} failed for {', '.join(failed)}")


def train_summary(name: str, run_dir: Path, seconds: float) -> dict:
    """Steps, throughput and the loss curve of one finished run (from its checkpoint and CSV log)."""
    import torch

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    budget = next((v for k, v in raw.get("callbacks", {}).items() if k.startswith("TimeBudget")), {})
    hp = raw.get("hyper_parameters", {})
    dm = raw.get("datamodule_hyper_parameters", {})
    steps = int(raw["global_step"])
    tokens_per_step = int(dm.get("batch_size", 0)) * int(dm.get("seq_len", 0))
    curve = []
    logs = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if logs:
        with open(logs[-1], newline="") as f:
            curve = [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(f) if row.get("train/loss")]
    tail = [v for s, v in curve if s >= steps - max(50, steps // 20)]
    return {
        "model": name, "name": MODELS[name][1], "recipe": f"recipes/{MODELS[name][0]}",
        "attention": hp.get("attention") or "dilated", "seq_len": dm.get("seq_len"), "steps": steps,
        "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step,
        "step_seconds_median": budget.get("step_seconds"),
        "tokens_per_second": tokens_per_step / budget["step_seconds"] if budget.get("step_seconds") else None,
        "fit_seconds": round(seconds, 1), "final_train_loss": sum(tail) / len(tail) if tail else None,
        "loss_curve": curve[:: max(1, len(curve) // 60)],
        "hyper_parameters": {k: hp.get(k) for k in ("model", "overrides", "lr", "min_lr", "warmup_steps", "betas",
                                                    "weight_decay", "compile", "segment_lengths", "dilation_rates")},
        "data": {k: dm.get(k) for k in ("corpus", "data_path", "tokenizer", "val_fraction", "test_fraction", "seed",
                                        "pack_documents")},
    }


def cmd_run(args: argparse.Namespace) -> int:
    t0 = time.time()
    preset = PRESETS[args.preset]
    steps = args.steps or preset["steps"]
    budget = args.budget_s or preset["budget_s"]
    end = args.until or t0 + budget
    until = end - (args.eval_reserve_s or preset["eval_reserve_s"])
    if args.no_compile:
        preset = {**preset, "model": {**preset.get("model", {}), "compile": False}}
    if args.data_path:  # the user's own text instead of the recipes' corpus
        preset = {**preset, "data": {**preset["data"], "corpus": "stdlib", "data_path": json.dumps(args.data_path)}}
    out = Path(args.out_dir or REPO / "runs" / time.strftime("table2-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    print(f"reproduce_table2 run: {args.models}, preset {args.preset}, {steps} steps at most, training ends by "
          f"{time.strftime('%H:%M:%S', time.localtime(until))}; writing to {out}", flush=True)

    # the token cache once, before the runs start (they share it); its build time and corpus
    from longnet_lightning.data import LongTextDataModule

    data_args = {**recipe(args.models[0])["data"]["init_args"], **preset["data"]}
    if args.data_path:
        data_args["data_path"] = args.data_path
    data_args["seq_len"] //= preset["scale"]
    t = time.perf_counter()
    dm = LongTextDataModule(**data_args)
    dm.prepare_data()
    corpus = {"build_seconds": round(time.perf_counter() - t, 1), **corpus_summary(dm)}
    split = {k: corpus[k] for k in ("train", "val", "test")}
    print(f"token cache ready in {corpus['build_seconds']} s: {corpus.get('summary', corpus['corpus'])}; {split}",
          flush=True)

    procs, started = {}, time.perf_counter()
    for name in args.models:
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        procs[name] = (start(fit_command(name, preset, run_dir, steps, until), out / f"fit-{name}.log", env),
                       out / f"fit-{name}.log")
    wait_all(procs, "training")
    fit_seconds = time.perf_counter() - started
    for name in args.models:  # what the budget decided
        print(*(f"{name}: {line.strip()}" for line in (out / f"fit-{name}.log").read_text(errors="replace").splitlines()
                if "TimeBudget:" in line), sep="\n", flush=True)
    summaries = {name: {**train_summary(name, out / name, fit_seconds), "corpus": corpus,
                        "device": device_name(), "python": platform.python_version()} for name in args.models}
    for s in summaries.values():
        tps = f"{s['tokens_per_second']:,.0f}" if s["tokens_per_second"] else "n/a"
        print(f"{s['name']}: {s['steps']} steps ({s['tokens'] / 1e6:.1f}M tokens), {tps} tokens/s, "
              f"final train loss {s['final_train_loss']}", flush=True)

    procs = {}
    for name in args.models:
        cmd = evaluate_command(name, preset, out / name / "checkpoints" / "last.ckpt", out / f"eval-{name}")
        procs[name] = (start(cmd, out / f"evaluate-{name}.log", env), out / f"evaluate-{name}.log")
    wait_all(procs, "evaluation")
    for name in args.models:  # one line per (row, context, protocol), with its time
        print(*(line.strip() for line in (out / f"evaluate-{name}.log").read_text(errors="replace").splitlines()
                if " @ " in line and "perplexity" in line), sep="\n", flush=True)
    export = Path(args.export).resolve() if args.export else out / "export"
    export.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        shutil.copy(out / f"eval-{name}" / "results.json", export / f"{name}.results.json")
        summaries[name]["total_seconds"] = round(time.time() - t0, 1)
        (export / f"{name}.train.json").write_text(json.dumps(summaries[name], indent=1) + "\n")
        print((out / f"eval-{name}" / "table.md").read_text().split("## Notes")[0], flush=True)
    print(f"done in {time.time() - t0:.0f} s; results in {export}", flush=True)
    return 0


def corpus_summary(dm) -> dict:
    """What the data module read: documents and tokens per split, and the corpus manifest (for
    site-packages: each package's distribution and version, and what each rule left out)."""
    cache = dm._token_cache()
    out = {"corpus": dm.hparams.get("corpus"), "cache": str(cache.path)}
    for split in ("train", "val", "test"):
        s = cache.split(split)
        out[split] = {"documents": len(s.names), "tokens": int(s.n_tokens)}
    manifest = cache.manifest
    if manifest is not None:
        if manifest.get("corpus") == "site-packages":
            from longnet_lightning.data.sources import SitePackagesManifest

            out["summary"] = SitePackagesManifest.from_dict(manifest).summary()
        out["manifest"] = manifest
    return out


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    except ImportError:
        return "unknown"


# ----------------------------------------------------------------------------- combine

ROW_ORDER = ["LongNet 8K", "LongNet 8K, capped at 8K", "Transformer 2K", "Transformer 8K", "LongNet 32K",
             "LongNet 32K, capped at 32K"]


def _diff(report: dict, model: str, a: int, b: int, protocol: str = "non-overlapping") -> dict | None:
    return next((d for d in report["comparisons"]["contexts"] if d["model"] == model and d["protocol"] == protocol
                 and (d["from"], d["to"]) == (a, b)), None)


def _between(report: dict, a: str, b: str, c: int, protocol: str = "non-overlapping") -> dict | None:
    for d in report["comparisons"]["models"]:
        if d["protocol"] == protocol and d["context_length"] == c and {d["a"], d["b"]} == {a, b}:
            return d if d["a"] == a else {**d, "percent": -d["percent"], "low": -d["high"], "high": -d["low"],
                                          "a": a, "b": b}
    return None


def _fmt(d: dict | None) -> str:
    return "n/a" if d is None else f"{d['percent']:+.2f}% [{d['low']:+.2f}, {d['high']:+.2f}]"


def criteria(report: dict, short: int, mid: int, long: int) -> tuple[dict, str, str]:
    """(R1..R5 with their evidence, verdict, explanation)."""
    L, D2, D8 = "LongNet 8K", "Transformer 2K", "Transformer 8K"
    r = {}
    d = _diff(report, L, short, mid)
    r["R1"] = (d is not None and d["high"] < 0 and d["percent"] <= -2.0, f"LongNet 8K {short}→{mid}: {_fmt(d)}")
    d1, d2 = _diff(report, L, mid, long), _diff(report, L, short, long)
    r["R2"] = (d1 is not None and d2 is not None and d1["percent"] <= 4.0 and d2["percent"] < 0,
               f"LongNet 8K {mid}→{long}: {_fmt(d1)}; {short}→{long}: {_fmt(d2)}")
    a, b = _diff(report, D2, short, mid), _diff(report, D2, mid, long)
    r["R3"] = (a is not None and b is not None and a["low"] > 0 and b["low"] > 0,
               f"Transformer 2K {short}→{mid}: {_fmt(a)}; {mid}→{long}: {_fmt(b)}")
    d = _between(report, D2, L, short)
    r["R4"] = (d is not None and abs(d["percent"]) <= 3.0, f"LongNet 8K vs Transformer 2K at {short}: {_fmt(d)}")
    d = _diff(report, L, short, mid, "sliding")
    r["R5"] = (d is not None and d["high"] < 0 and d["percent"] <= -2.0,
               f"LongNet 8K {short}→{mid}, sliding windows: {_fmt(d)}")
    control = _diff(report, D8, short, mid, "sliding")
    control_gains = control is not None and control["high"] < 0
    held = [k for k, (ok, _) in r.items() if ok]
    if len(held) == 5:
        verdict, why = "reproduced", "all five criteria hold"
    elif control is not None and not control_gains:
        verdict, why = "inconclusive", (f"the dense 8K control gains nothing from {short} to {mid} under sliding "
                                        f"windows either ({_fmt(control)}): at this scale the setup is too small to "
                                        "use 8K tokens of context, which says nothing against LongNet")
    elif r["R1"][0] and r["R3"][0] and r["R4"][0] and not r["R5"][0]:
        verdict, why = "partly reproduced", "R1, R3 and R4 hold; R1 holds only with non-overlapping windows"
    elif control_gains and not r["R5"][0]:
        verdict, why = "not reproduced", (f"the dense 8K control gains under sliding windows ({_fmt(control)}) and "
                                          "LongNet 8K does not")
    else:
        verdict, why = "mixed", f"criteria that hold: {', '.join(held) or 'none'}"
    r["control"] = (control_gains, f"Transformer 8K {short}→{mid}, sliding windows: {_fmt(control)}")
    return r, verdict, why


def cmd_combine(args: argparse.Namespace) -> int:
    from longnet_lightning.evaluation.command import main as evaluate_main

    files, trains = [], []
    for d in map(Path, args.dirs):
        files += sorted(d.glob("*.results.json"))
        trains += [json.loads(p.read_text()) for p in sorted(d.glob("*.train.json"))]
    if not files:
        raise SystemExit(f"error: no *.results.json in {args.dirs}; give the --export folders of `run`")
    out = Path(args.out_dir)
    argv = ["--from_results", *map(str, files), "--out_dir", str(out)]
    if evaluate_main(argv):
        return 2
    report = json.loads((out / "results.json").read_text())
    order = {n: i for i, n in enumerate(ROW_ORDER)}
    report["models"].sort(key=lambda m: order.get(m["name"], len(order)))
    contexts = report["context_lengths"]
    short, mid, long = contexts[0], contexts[1], contexts[-1]
    r, verdict, why = criteria(report, short, mid, long)
    brief = [{k: v for k, v in t.items() if k != "corpus"} for t in trains]  # the manifest stays in *.train.json
    result = {"verdict": verdict, "why": why, "criteria": {k: {"holds": ok, "evidence": e} for k, (ok, e) in r.items()},
              "training": brief}
    (out / "verdict.json").write_text(json.dumps(result, indent=1) + "\n")
    from longnet_lightning.evaluation.report import plot

    at_long = {**report, "context_lengths": [long], "models": [  # one line per row: the longest context
        {**m, "results": [x for x in m["results"] if x["context_length"] == long]} for m in report["models"]]}
    plot(at_long, out / "loss_by_position_longest.png")
    section = results_section(report, trains, r, verdict, why, out)
    (out / "results_section.md").write_text(section)
    print(section)
    return 0


def results_section(report: dict, trains: list[dict], r: dict, verdict: str, why: str, out: Path) -> str:
    from longnet_lightning.evaluation.report import comparison_tables, table

    trains = sorted(trains, key=lambda t: list(MODELS).index(t["model"]))
    first = trains[0] if trains else {}
    corpus = first.get("corpus", {})
    lines = [f"## {time.strftime('%Y-%m-%d')}: the trend of the paper's Table 2, 24M models, with intervals", ""]
    lines += ["| model | recipe | trained at | steps | tokens | tokens/s (median step) | final train loss |",
              "|---|---|---|---|---|---|---|"]
    for t in trains:
        tps = f"{t['tokens_per_second']:,.0f}" if t.get("tokens_per_second") else "n/a"
        loss = f"{t['final_train_loss']:.4f}" if t.get("final_train_loss") is not None else "n/a"
        lines.append(f"| {t['name']} | `{t['recipe']}` | {t['seq_len']:,} | {t['steps']:,} | {t['tokens'] / 1e6:.1f}M | "
                     f"{tps} | {loss} |")
    if corpus:
        split = {k: corpus[k] for k in ("train", "val", "test") if k in corpus}
        lines += ["", f"Corpus: {corpus.get('corpus')}, built in {corpus.get('build_seconds')} s; "
                  + "; ".join(f"{k} {v['documents']} documents, {v['tokens'] / 1e6:.1f}M tokens" for k, v in split.items())
                  + f". Device: {first.get('device')}."]
    lines += ["", f"Evaluation: {report['data']['description']}.", ""]
    for protocol, title in (("non-overlapping", "Non-overlapping windows"), ("sliding", "Sliding windows")):
        lines += [f"{title}, perplexity (95% interval):", "", table(report, "perplexity", 3, protocol, intervals=True), ""]
        lines += ["Perplexity change with context (paired over documents; * = interval excludes 0):", ""]
        lines += [x for x in comparison_tables(report, protocol)[: len(report["models"]) + 3]]
    lines += ["", f"Verdict: **{verdict}** ({why}).", ""]
    for k in ("R1", "R2", "R3", "R4", "R5", "control"):
        ok, evidence = r[k]
        lines.append(f"- {k}: {'holds' if ok else 'does not hold'}. {evidence}")
    lines += ["", f"Loss by position at {report['context_lengths'][-1]:,} tokens of context, non-overlapping windows: "
              f"`{out / 'loss_by_position_longest.png'}` (every context: `{out / 'loss_by_position.png'}`).", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce_table2", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate some of the models side by side")
    run.add_argument("--models", nargs="+", choices=list(MODELS), required=True)
    run.add_argument("--preset", choices=list(PRESETS), default="h200")
    run.add_argument("--steps", type=int, help="optimizer steps (at most; default: the preset's)")
    run.add_argument("--budget_s", type=float, help="wall-clock budget of the whole run, evaluation included")
    run.add_argument("--until", type=float, help="instead of --budget_s: the run's end as a Unix time")
    run.add_argument("--eval_reserve_s", type=float, help="seconds kept for the evaluation (default: the preset's)")
    run.add_argument("--no_compile", action="store_true", help="train without torch.compile")
    run.add_argument("--data_path", nargs="+", help="train and evaluate on these files, folders or globs instead of "
                     "the recipes' site-packages corpus (the held-out documents are its test split)")
    run.add_argument("--out_dir", help="run folders (default runs/table2-<date-time>)")
    run.add_argument("--export", help="folder for the small result files (default <out_dir>/export)")
    comb = sub.add_parser("combine", help="one report, intervals and the verdict from the export folders")
    comb.add_argument("dirs", nargs="+")
    comb.add_argument("--out_dir", required=True)
    args = p.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_combine(args)


if __name__ == "__main__":
    sys.exit(main())
