"""Reproduce the trend of the LongNet paper's Table 2 at small scale, in one command.

Trains a small byte-level LongNet at a long context (recipes/repro-longnet-8k.yaml: 8K) and the
same model with dense attention at 2K (recipes/repro-dense-2k.yaml), on the same number of
tokens (same tokens per step, same steps), on the Python standard library corpus with documents
packed; then evaluates both on the held-out test split at 2K, 8K and 32K tokens of context with
``python -m longnet_lightning evaluate`` and prints the table (rows: models, columns: context).

    python -m benchmarks.reproduce_table2                      # one H200: estimated 6-7 minutes
    python -m benchmarks.reproduce_table2 --preset cpu-toy     # CPU smoke run: 1-2 minutes

Everything goes to ``--out_dir`` (default ``runs/table2-<date-time>``): one folder per training
run (checkpoints, metrics.csv, the resolved config), ``eval/`` (results.json, table.md,
loss_by_position.csv/png), a log per step, and ``results_section.md``, ready to paste into
benchmarks/RESULTS.md.

Presets: ``h200`` runs the recipes unchanged, each training capped at 3.5 minutes (if LongNet
stops early, the dense run trains exactly as many steps, with the same learning-rate schedule);
``cpu-toy`` shrinks everything (2 layers of 64, LongNet at 1024 vs dense at 256 with the
paper's pattern scaled by 1024/8192, 60 steps, contexts 256/1K/4K, evaluation capped at 40K
tokens). Any setting can be overridden (--steps, --n_layer, --long_seq_len, --contexts, ...);
the LongNet pattern is the paper's (``longnet_lightning.model.PATTERNS["paper"]``) scaled by
long_seq_len / 8192.
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

from longnet_lightning.model import PATTERNS

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"long": REPO / "recipes" / "repro-longnet-8k.yaml", "short": REPO / "recipes" / "repro-dense-2k.yaml"}
CHECKPOINT_EVERY = 10  # at most, in steps: a run stopped by --max_train_minutes keeps its last checkpoint
PAPER_PATTERN = PATTERNS["paper"]  # at a training length of 8192

PRESETS: dict[str, dict] = {
    "h200": {"contexts": [2048, 8192, 32768], "max_train_minutes": 3.5},  # the recipes as written
    "cpu-toy": {
        "accelerator": "cpu", "precision": "32-true", "num_workers": 0, "validate": False,
        "n_layer": 2, "n_embd": 64, "n_head": 4, "ffn_dim": 256,
        "long_seq_len": 1024, "short_seq_len": 256,
        "steps": 60, "tokens_per_step": 8192, "micro_batch_tokens": 8192,
        "lr": 3e-3, "warmup_steps": 5,
        "contexts": [256, 1024, 4096], "eval_max_tokens": 40_000,
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce_table2",
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="h200 (the recipes as written) or cpu-toy; default: h200 when CUDA is available, else cpu-toy")
    p.add_argument("--out_dir", help="default: runs/table2-<date-time>")
    g = p.add_argument_group("model (default: the recipes' 6 x 384)")
    for name in ("n_layer", "n_embd", "n_head", "ffn_dim"):
        g.add_argument(f"--{name}", type=int)
    g = p.add_argument_group("training (default: the recipes')")
    g.add_argument("--long_seq_len", type=int, help="LongNet training length (recipe: 8192)")
    g.add_argument("--short_seq_len", type=int, help="dense training length (recipe: 2048)")
    g.add_argument("--steps", type=int, help="optimizer steps of each run (recipe: 300)")
    g.add_argument("--tokens_per_step", type=int, help="tokens per optimizer step, both runs (recipe: 524288)")
    g.add_argument("--micro_batch_tokens", type=int,
                   help="tokens per micro-batch (batch_size x seq_len); tokens_per_step / this = accumulation")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup_steps", type=int)
    g.add_argument("--accelerator", help="gpu or cpu (recipe: gpu)")
    g.add_argument("--precision", help="recipe: bf16-mixed")
    g.add_argument("--num_workers", type=int)
    g.add_argument("--max_train_minutes", type=float,
                   help="stop a training run after this long (h200: 3.5); "
                   "the dense run then trains exactly the steps LongNet reached, with the same schedule")
    g.add_argument("--skip_training", action="store_true",
                   help="reuse the checkpoints already in --out_dir and only evaluate")
    g = p.add_argument_group("evaluation")
    g.add_argument("--contexts", type=int, nargs="+", help="context lengths to evaluate (h200: 2048 8192 32768)")
    g.add_argument("--eval_max_tokens", type=int, help="evaluate on the first N test tokens only (default: all)")
    g.add_argument("--eval_batch_tokens", type=int, help="tokens per evaluation forward pass (evaluate's default)")
    return p.parse_args(argv)


def recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def settings(args: argparse.Namespace) -> dict:
    """The effective settings: recipe values, then the preset's, then the command line's."""
    if args.preset is None:
        try:
            import torch

            args.preset = "h200" if torch.cuda.is_available() else "cpu-toy"
        except ImportError:
            args.preset = "cpu-toy"
    long_r, short_r = recipe(RECIPES["long"]), recipe(RECIPES["short"])
    ld, sd = long_r["data"]["init_args"], short_r["data"]["init_args"]
    lt, st = long_r["trainer"], short_r["trainer"]
    lm = long_r["model"]["init_args"]
    base = {
        **lm["overrides"],
        "long_seq_len": ld["seq_len"], "short_seq_len": sd["seq_len"],
        "steps": lt["max_steps"],
        "tokens_per_step": ld["batch_size"] * ld["seq_len"] * lt["accumulate_grad_batches"],
        "micro_batch_tokens": ld["batch_size"] * ld["seq_len"],
        "lr": lm["lr"], "warmup_steps": lm["warmup_steps"],
        "accelerator": lt["accelerator"], "precision": lt["precision"], "num_workers": ld["num_workers"],
        "validate": True, "contexts": [2048, 8192, 32768], "eval_max_tokens": None, "eval_batch_tokens": None,
        "max_train_minutes": None,
    }
    short_tokens = sd["batch_size"] * sd["seq_len"] * st["accumulate_grad_batches"]
    if short_tokens != base["tokens_per_step"] or st["max_steps"] != lt["max_steps"]:
        raise SystemExit(f"error: the recipes disagree on the token budget ({base['tokens_per_step']} vs {short_tokens} "
                         f"tokens per step, {lt['max_steps']} vs {st['max_steps']} steps); fix them to compare fairly")
    s = {**base, **PRESETS[args.preset]}
    for key in list(base):
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    for name in ("long", "short"):
        n = s[f"{name}_seq_len"]
        if s["micro_batch_tokens"] % n or s["tokens_per_step"] % s["micro_batch_tokens"]:
            raise SystemExit(
                f"error: micro_batch_tokens={s['micro_batch_tokens']} must be a multiple of {name}_seq_len={n}, "
                f"and tokens_per_step={s['tokens_per_step']} a multiple of micro_batch_tokens"
            )
    scale = s["long_seq_len"] / 8192
    segments = [w * scale for w in PAPER_PATTERN[0]]
    if any(w != int(w) or w < 1 for w in segments):
        raise SystemExit(f"error: long_seq_len={s['long_seq_len']} does not scale the paper's segment lengths "
                         f"{PAPER_PATTERN[0]} to whole numbers; use 8192 times a power of 2")
    s["segment_lengths"], s["dilation_rates"] = [int(w) for w in segments], list(PAPER_PATTERN[1])
    return s


def fit_command(which: str, s: dict, run_dir: Path, steps: int) -> list[str]:
    """The `fit` command of one run: the recipe plus overrides; `steps` may stop short of s["steps"]."""
    n = s[f"{which}_seq_len"]
    accumulate = s["tokens_per_step"] // s["micro_batch_tokens"]
    overrides = {k: s[k] for k in ("n_layer", "n_embd", "n_head", "ffn_dim")}
    # checkpoints land on multiples of `every` (none is written when training stops in between), so
    # `every` divides `steps`: the last step is always saved
    every = max(d for d in range(1, CHECKPOINT_EVERY + 1) if steps % d == 0)
    cmd = [
        sys.executable, "-m", "longnet_lightning", "fit", "--config", str(RECIPES[which]),
        "--trainer.default_root_dir", str(run_dir), "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--checkpoint.every_n_train_steps", str(every), "--checkpoint.save_top_k", "1",
        "--trainer.max_steps", str(steps), "--model.decay_steps", str(s["steps"]),
        "--trainer.accumulate_grad_batches", str(accumulate),
        "--trainer.accelerator", s["accelerator"], "--trainer.precision", s["precision"],
        "--data.seq_len", str(n), "--data.batch_size", str(s["micro_batch_tokens"] // n),
        "--data.num_workers", str(s["num_workers"]),
        "--model.overrides", json.dumps(overrides),
        "--model.lr", str(s["lr"]), "--model.min_lr", str(s["lr"] / 10), "--model.warmup_steps", str(s["warmup_steps"]),
    ]
    if which == "long":
        cmd += ["--model.segment_lengths", json.dumps(s["segment_lengths"]),
                "--model.dilation_rates", json.dumps(s["dilation_rates"])]
    if s["validate"]:  # validate halfway and at the end (counted in micro-batches)
        cmd += ["--trainer.val_check_interval", str(accumulate * max(1, s["steps"] // 2))]
    else:
        cmd += ["--trainer.limit_val_batches", "0"]
    if s["max_train_minutes"]:
        sec = int(s["max_train_minutes"] * 60)
        cmd += ["--trainer.max_time", f"00:{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}"]
    return cmd


def checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def run_logged(cmd: list[str], log: Path, env: dict) -> float:
    """Run ``cmd`` from the repository root, echoing its output and saving it to ``log``; seconds taken."""
    print(f"\n$ {shlex.join(cmd)}\n", flush=True)
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk.decode("utf-8", errors="replace"))
        code = proc.wait()
    if code:
        raise SystemExit(f"error: the command above failed with exit status {code}; its output is in {log}")
    return time.perf_counter() - t0


def last_metrics(run_dir: Path) -> dict:
    """Last logged train/loss and val/loss of a run (from the CSV logger), when present."""
    out = {}
    files = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return out
    with open(files[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss", "val/loss", "val/bpb"):
                if row.get(key):
                    out[key] = float(row[key])
    return out


def device_name(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda", "auto"):
        try:
            import torch

            if torch.cuda.is_available():
                return f"1x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        except ImportError:
            pass
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    s = settings(args)
    if args.out_dir:
        out = Path(args.out_dir)
    else:
        out = REPO / "runs" / time.strftime("table2-%Y%m%d-%H%M%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t_start = time.perf_counter()
    print(f"reproduce_table2: preset {args.preset}, settings {json.dumps(s)}\nwriting to {out}", flush=True)

    runs = {}
    steps = s["steps"]
    for which, kind in (("long", "LongNet"), ("short", "Transformer")):
        n = s[f"{which}_seq_len"]
        run_dir = out / f"{kind.lower()}-{n}"
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        seconds = None
        if not args.skip_training:
            if run_dir.exists():  # a fresh run: Lightning would write last-v1.ckpt beside an old last.ckpt
                print(f"removing the previous run in {run_dir}", flush=True)
                shutil.rmtree(run_dir)
            seconds = run_logged(fit_command(which, s, run_dir, steps), out / f"fit-{kind.lower()}.log", env)
        if not ckpt.is_file():
            raise SystemExit(f"error: {ckpt} does not exist; run without --skip_training first")
        done = checkpoint_step(ckpt)
        if which == "long" and done < steps:  # stopped by the time limit: same steps and schedule for the baseline
            print(f"\nwarning: LongNet stopped at step {done} of {steps} (--max_train_minutes); the dense run trains "
                  f"{done} steps too, with the same learning-rate schedule", flush=True)
            steps = done
        runs[which] = {"name": f"{kind} {n // 1024}K" if n % 1024 == 0 else f"{kind} {n}", "ckpt": ckpt,
                       "seconds": seconds, "seq_len": n, "steps": done, "metrics": last_metrics(run_dir)}
    if runs["long"]["steps"] != runs["short"]["steps"]:
        print(f"\nwarning: unequal token budgets: LongNet {runs['long']['steps']} steps, dense "
              f"{runs['short']['steps']} steps", flush=True)

    eval_dir = out / "eval"
    cmd = [sys.executable, "-m", "longnet_lightning", "evaluate",
           "--ckpt_path", str(runs["long"]["ckpt"]), str(runs["short"]["ckpt"]),
           "--names", runs["long"]["name"], runs["short"]["name"],
           "--context_lengths", *map(str, s["contexts"]), "--out_dir", str(eval_dir)]
    if s["eval_max_tokens"]:
        cmd += ["--max_tokens", str(s["eval_max_tokens"])]
    if s["eval_batch_tokens"]:
        cmd += ["--batch_tokens", str(s["eval_batch_tokens"])]
    eval_seconds = run_logged(cmd, out / "evaluate.log", env)
    total = time.perf_counter() - t_start

    report = json.loads((eval_dir / "results.json").read_text())
    params = report["models"][0]["params"]
    budget = runs["long"]["steps"] * s["tokens_per_step"]
    lines = [
        f"## {time.strftime('%Y-%m-%d')} — LongNet vs dense at small scale, the trend of the paper's Table 2",
        "",
        f"`python -m benchmarks.reproduce_table2 {shlex.join(argv)}`".replace(" `", "`"),
        f"on {device_name(s['accelerator'])}; {total / 60:.1f} min in all (training, evaluation, start-up).",
        "",
        f"Both models: {s['n_layer']} layers, width {s['n_embd']}, {s['n_head']} heads, FFN {s['ffn_dim']} "
        f"({params / 1e6:.1f}M parameters), byte tokenizer, the standard library corpus packed, "
        f"{runs['long']['steps']} steps of {s['tokens_per_step']:,} tokens = {budget / 1e6:.1f}M training tokens each, "
        f"lr {s['lr']} (warm-up {s['warmup_steps']}, linear decay to lr/10 at step {s['steps']}), "
        f"precision {s['precision']}. "
        f"LongNet pattern w = {s['segment_lengths']}, r = {s['dilation_rates']}.",
        "",
        "| model | attention | trained at | steps | train time | tokens/s | last train loss | last val loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for which, att in (("long", "dilated"), ("short", "dense")):
        r = runs[which]
        sec = r["seconds"]
        tps = f"{r['steps'] * s['tokens_per_step'] / sec:,.0f}" if sec else "n/a"
        m = {k: f"{v:.4f}" for k, v in r["metrics"].items()}
        lines.append(f"| {r['name']} | {att} | {r['seq_len']:,} | {r['steps']} | "
                     f"{f'{sec:.0f} s' if sec else 'n/a'} (incl. start-up) | "
                     f"{tps} | {m.get('train/loss', 'n/a')} | {m.get('val/loss', 'n/a')} |")
    table_md = (eval_dir / "table.md").read_text().split("\n", 1)[1].strip()  # drop the "# ..." title line
    lines += ["", f"Evaluation ({eval_seconds:.0f} s), held-out test split:", "", table_md, ""]
    section = "\n".join(lines)
    (out / "results_section.md").write_text(section + "\n", encoding="utf-8")
    print("\n" + section)
    print(f"\nwrote {out / 'results_section.md'} (paste into benchmarks/RESULTS.md) and {eval_dir}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
