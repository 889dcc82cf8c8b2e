"""The whole chain on a full-size checkpoint, each stage a subprocess of the real CLI: wall time, peak RSS, file sizes.

    python tools/fullsize.py medgemma-4b-it --out /tmp/mg4b
    python tools/bench_scale.py /tmp/mg4b recipes/medgemma_decoder_lora.yaml --data DATA --out /tmp/bench-mg4b

Stages: a 2-step bf16 LoRA fine-tune on CPU (`edgemed finetune`), `edgemed merge` (its logit check included),
`edgemed export gguf --quant q4_k_m` (calibrated, as the command defaults for a merged fine-tune, and with
`--no-calibration`), one image question with `edgemed ask` on the GGUF, the same question timed in-process on
llama.cpp and on PyTorch bf16 (image encode, time to first token, decode tok/s), `edgemed parity` on a few probes
and `edgemed export onnx --quant int4`. Each runs under `/usr/bin/time -f "%e %M"` (wall seconds, peak RSS of the
process). Before a stage runs, edgemed's own prediction of its memory (`edgemed plan --json`, the rules of
edgemed/memory.py) is compared with ``--budget-gb``: a stage predicted above it is not started here, and a stage
that edgemed's memory check refuses is recorded with its refusal message (that is a result, not a failure).
Results are kept in OUT/results.json after every stage (``--resume`` skips the stages already there) and printed
as a markdown table. Random weights: the answers are noise; only shapes, memory and time mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1e9
BASELINE_CODE = "import torch, transformers, peft, safetensors, edgemed.cli"
QUESTION = "What abnormality does this radiograph show?"


@dataclass
class Stage:
    """One measured step of the chain."""

    name: str
    command: str
    status: str = "not run"  # ok | refused | skipped | failed
    wall_s: float | None = None
    peak_rss_mb: float | None = None  # MiB (/usr/bin/time %M kB / 1024); the table shows GB (1e9)
    peak_anon_mb: float | None = None  # MiB: the process tree's anonymous memory (RssAnon), sampled
    predicted_gb: float | None = None  # edgemed's own need, above the interpreter
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    note: str = ""
    timing: dict[str, float] = field(default_factory=dict)  # image question: encode_s, ttft_s, decode_tok_s, ...


# ---------------------------------------------------------------- running one stage
def env(threads: int) -> dict[str, str]:
    here = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": here + (os.pathsep + path if path else "")}


def _tree_anon_kb(root: int) -> int:
    """RssAnon summed over ``root`` and its descendants (/proc; 0 for a process gone meanwhile)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def timed(argv: list[str], threads: int, log: Path) -> tuple[int, float, float, float, str]:
    """Run ``argv`` under /usr/bin/time; (return code, wall s, peak RSS MB, peak anonymous MB, the output's tail).

    /usr/bin/time's peak RSS counts the pages of memory-mapped files too (safetensors shards are read that way), which
    the kernel drops under pressure rather than failing; the anonymous part (RssAnon, sampled every 0.5 s over the
    process tree) is what must fit. A one-layer Qwen2.5-VL calibrated export peaked at 2.94 GB RSS, 0.95 GB of it the
    mapped bf16 checkpoint, while its anonymous memory peaked at 2.24 GB.
    """
    tfile = log.with_suffix(".time")
    with open(log, "w") as fh:
        p = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", str(tfile), *argv], stdout=fh,
                             stderr=subprocess.STDOUT, env=env(threads))
        anon = 0
        while p.poll() is None:
            anon = max(anon, _tree_anon_kb(p.pid))
            time.sleep(0.5)
    wall, kb = tfile.read_text().strip().splitlines()[-1].split()
    return p.returncode, float(wall), int(kb) / 1024, anon / 1024, log.read_text(errors="replace")[-6000:]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgemed.cli", *args]


def sizes(path: Path, pattern: str = "*") -> dict[str, int]:
    if path.is_file():
        return {path.name: path.stat().st_size}
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob(pattern)) if f.is_file()}
    return {**files, "total": sum(files.values())} if files else {}


def run_stage(st: Stage, argv: list[str], threads: int, logs: Path, budget_gb: float, baseline_mb: float,
              outputs: Path | None = None, pattern: str = "*") -> Stage:
    """Run one stage unless edgemed predicts more than the budget; record what happened."""
    from edgemed.memory import available_bytes

    have = (available_bytes() or 0) / GB
    # above what the machine has, edgemed's own check refuses before loading anything: run it to record the refusal
    if st.predicted_gb is not None and budget_gb < st.predicted_gb + baseline_mb / 1024 <= have:
        st.status = "skipped"
        st.note = (f"edgemed predicts {st.predicted_gb:.1f} GB above the interpreter; over this run's budget of "
                   f"{budget_gb:g} GB, so not started here ({have:.1f} GB available)")
        return st
    print(f"[{time.strftime('%H:%M:%S')}] {st.name}: {st.command}", flush=True)
    log = logs / f"{re.sub(r'[^a-z0-9]+', '-', st.name)}.log"
    rc, st.wall_s, st.peak_rss_mb, st.peak_anon_mb, tail = timed(argv, threads, log)
    refusal = re.search(r"[^\n]*needs about [\d.]+ GB of memory and this machine has [\d.]+ GB available[^\n]*",
                        tail)
    if rc == 0:
        st.status = "ok"
    elif refusal:
        st.status, st.note = "refused", refusal.group(0).strip()
    else:
        st.status, st.note = "failed", " | ".join(tail.strip().splitlines()[-4:])[-600:]
    if outputs is not None and outputs.exists():
        st.files = sizes(outputs, pattern)
    print(f"    -> {st.status} {st.wall_s:.0f} s, {st.peak_rss_mb:.0f} MB {st.note[:200]}", flush=True)
    return st


# ---------------------------------------------------------------- the image question, timed in-process
def ask_worker(folder: str, image: str, question: str, threads: int, dtype: str, max_tokens: int) -> None:
    """Open ``folder`` with edgemed's one loader, encode the image once alone, then stream one answer: print JSON."""
    t0 = time.perf_counter()
    from edgemed.backends import GenParams, open_model
    from edgemed.data import load_image

    kw = {"n_threads": threads}
    if dtype:
        kw["dtype"] = dtype
    backend = open_model(folder, **kw)
    load_s = time.perf_counter() - t0
    pil = load_image(image, render=backend.arch.dicom_render)
    t = time.perf_counter()
    emb = backend.image_embeddings(pil)
    encode_s = time.perf_counter() - t
    prompt = backend.render(question, image=True)
    # ignore_eos: decode max_tokens whatever random weights say, so tok/s is over a known count (as llama-bench)
    params = GenParams(max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    first = last = None
    for chunk in backend.stream(prompt, pil, params):  # a chunk comes when its text is whole: tokens counts them
        now = time.perf_counter()
        if first is None and chunk.tokens:
            first = (now, chunk.tokens)
        last = (now, chunk.tokens)
    out = {"load_s": load_s, "encode_s": encode_s, "image_tokens": int(emb.shape[0]),
           "prompt_tokens": len(backend.tokenize(prompt)), "ttft_s": first[0] - t, "tokens": last[1]}
    backend.close()
    if last[1] > first[1]:
        out["decode_tok_s"] = (last[1] - first[1]) / (last[0] - first[0])
    print("ASK-TIMING " + json.dumps(out))


# ---------------------------------------------------------------- the chain
def plan_needs(recipe: Path, model: Path, sets: list[str], out: Path) -> dict[str, float]:
    argv = cli("plan", str(recipe), "--model", str(model), "--json", *[a for s in sets for a in ("--set", s)])
    p = subprocess.run(argv, capture_output=True, text=True, env=env(1))
    if p.returncode != 0:
        raise SystemExit(f"edgemed plan failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    (out / "plan.json").write_text(p.stdout)
    return json.loads(p.stdout)["ram_gb"]


def baseline(threads: int, logs: Path) -> float:
    rc, _, mb, _, tail = timed([sys.executable, "-c", BASELINE_CODE], threads, logs / "baseline.log")
    if rc != 0:
        raise SystemExit(f"the interpreter baseline failed:\n{tail}")
    return mb


def chain(args: argparse.Namespace) -> list[Stage]:
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    res_file = out / "results.json"
    done: dict[str, Stage] = {}
    if args.resume and res_file.is_file():
        done = {d["name"]: Stage(**d) for d in json.loads(res_file.read_text())["stages"]}
    th = args.threads
    model = args.model.resolve()
    train = args.data / ("abstracts.jsonl" if args.text_data else "train.jsonl")
    sets = [f"model.path={model}", "method=lora", "dtype=bfloat16", f"stages.0.data.train={train}",
            "stages.0.max_steps=2", "optim.batch_size=1", "optim.grad_accum=1", f"max_length={args.max_length}",
            *args.set]
    if not args.text_data:
        sets.append(f"stages.0.data.validation={args.data / 'validation.jsonl'}")
    needs = plan_needs(args.recipe, model, sets, out)
    base_mb = done["interpreter"].peak_rss_mb if "interpreter" in done else baseline(th, logs)
    image = next(iter(sorted((args.data / "images").glob("*.png"))))
    run, merged, gguf, gguf_nc, onnx = (out / n for n in ("run", "merged", "gguf", "gguf-nocal", "onnx-int4"))
    q = args.question
    stages: list[Stage] = [Stage("interpreter", BASELINE_CODE, "ok", peak_rss_mb=base_mb,
                                 note="python -c with torch, transformers, peft, edgemed imported")]
    mk = [
        ("finetune", cli("finetune", str(args.recipe), *[a for s in sets for a in ("--set", s)], "--out", str(run),
                         "--overwrite"), needs.get("finetune (this recipe, 16/32-bit LoRA on CPU)"), run, "*"),
        ("merge", cli("merge", str(run), "--out", str(merged), "--overwrite"),
         needs.get("merge (its logit check included)"), merged, "*.safetensors"),
        ("export gguf q4_k_m (calibrated)", cli("export", "gguf", str(merged), "--quant", "q4_k_m", "--out",
                                                str(gguf), "--overwrite"),
         needs.get("export gguf, calibrated"), gguf, "*.gguf"),
        ("export gguf q4_k_m --no-calibration", cli("export", "gguf", str(merged), "--quant", "q4_k_m",
                                                    "--no-calibration", "--out", str(gguf_nc), "--overwrite"),
         needs.get("export gguf"), gguf_nc, "*.gguf"),
    ]
    for name, argv, need, dest, pat in mk:
        stages.append(resume_or_run(done, Stage(name, shown(argv), predicted_gb=need), argv, th, logs, args,
                                    base_mb, dest, pat))
    g = gguf if stages[-2].status == "ok" else gguf_nc
    ask_argv = cli("ask", str(g), q, "--image", str(image), "--threads", str(th), "--max-tokens",
                   str(args.max_tokens))
    stages.append(resume_or_run(done, Stage("ask (llama.cpp, CLI)", shown(ask_argv)), ask_argv, th, logs, args,
                                base_mb))
    me = Path(__file__).resolve()
    for label, folder, dtype, need in (("llama.cpp q4_k_m", g, "", None),
                                       ("PyTorch bf16", merged, "bfloat16", _bf16_need(model))):
        argv = [sys.executable, str(me), "--worker-ask", str(folder), "--image", str(image), "--question", q,
                "--threads", str(th), "--dtype", dtype, "--max-tokens", str(args.max_tokens)]
        st = resume_or_run(done, Stage(f"image question, {label}", shown(argv), predicted_gb=need), argv, th, logs,
                           args, base_mb)
        log = logs / f"{re.sub(r'[^a-z0-9]+', '-', st.name)}.log"
        m = re.search(r"ASK-TIMING (\{.*\})", log.read_text()) if log.is_file() else None
        if m:
            st.timing = json.loads(m.group(1))
        stages.append(st)
    par = cli("parity", str(g), "--max-probes", str(args.probes), "--threads", str(th))
    from edgemed import memory  # parity's own choice: the fp32 reference where it fits, else the 16-bit one

    have = (memory.available_bytes() or 0) / GB
    need = needs.get("parity of a q4_k_m export")
    if need is not None and need > have:
        need = needs.get("parity of q4_k_m, 16-bit reference", need)
    stages.append(resume_or_run(done, Stage("parity (q4_k_m vs merged)", shown(par), predicted_gb=need),
                                par, th, logs, args, base_mb))
    ox = cli("export", "onnx", str(merged), "--quant", "int4", "--out", str(onnx), "--overwrite")
    stages.append(resume_or_run(done, Stage("export onnx int4", shown(ox), predicted_gb=needs.get("export onnx")),
                                ox, th, logs, args, base_mb, onnx, "*.onnx*"))
    save(res_file, args, stages)
    return stages


def _bf16_need(model: Path) -> float:
    """PyTorch bf16 answering: the weights as stored (16-bit) plus a tenth for activations; a planning figure."""
    from edgemed import memory

    return 2 * memory.tensor_sizes(model)[0] * 1.1 / GB


def shown(argv: list[str]) -> str:
    a = list(argv)
    if a[:3] == [sys.executable, "-m", "edgemed.cli"]:
        a = ["edgemed", *a[3:]]
    elif a and a[0] == sys.executable:
        a = ["python", *a[1:]]
    return " ".join(f'"{x}"' if " " in x else x for x in a)


def resume_or_run(done: dict[str, Stage], st: Stage, argv: list[str], th: int, logs: Path, args: argparse.Namespace,
                  base_mb: float, dest: Path | None = None, pat: str = "*") -> Stage:
    if st.name in done and done[st.name].status in ("ok", "refused", "skipped"):
        return done[st.name]
    st = run_stage(st, argv, th, logs, args.budget_gb, base_mb, dest, pat)
    partial = json.loads((args.out / "results.json").read_text())["stages"] if (args.out / "results.json").is_file() \
        else []
    kept = [d for d in partial if d["name"] != st.name] + [asdict(st)]
    (args.out / "results.json").write_text(json.dumps({"stages": kept}, indent=1))
    return st


def save(path: Path, args: argparse.Namespace, stages: list[Stage]) -> None:
    path.write_text(json.dumps({"model": str(args.model), "recipe": str(args.recipe), "threads": args.threads,
                                "budget_gb": args.budget_gb, "stages": [asdict(s) for s in stages]}, indent=1))


# ---------------------------------------------------------------- the table
def human(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def table(stages: list[Stage]) -> str:
    rows = ["| stage | status | wall | peak RSS | predicted need (+ interpreter) | files | note |",
            "|---|---|---|---|---|---|---|"]
    base = next((s.peak_rss_mb for s in stages if s.name == "interpreter"), 0) or 0
    for s in stages:
        wall = f"{s.wall_s:.0f} s" if s.wall_s is not None else ""
        rss = f"{s.peak_rss_mb * 2**20 / GB:.2f} GB" if s.peak_rss_mb is not None else ""
        if s.peak_anon_mb:
            rss += f" (anon {s.peak_anon_mb * 2**20 / GB:.2f})"
        pred = f"{s.predicted_gb:.2f} (+{base * 2**20 / GB:.2f}) GB" if s.predicted_gb is not None else ""
        big = {k: v for k, v in s.files.items() if k == "total" or v >= 5e7}
        files = ", ".join(f"{k} {human(v)}" for k, v in big.items()) if len(big) > 1 or "total" not in big else \
            human(big["total"])
        rows.append(f"| {s.name} | {s.status} | {wall} | {rss} | {pred} | {files} | {s.note.replace('|', '/')} |")
    timed_rows = [s for s in stages if s.timing]
    if timed_rows:
        rows += ["", "| image question | load | image encode | image tokens | prompt tokens | time to first token "
                 "| decode |", "|---|---|---|---|---|---|---|"]
        for s in timed_rows:
            t = s.timing
            dec = f"{t['decode_tok_s']:.2f} tok/s" if "decode_tok_s" in t else ""
            rows.append(f"| {s.name.split(', ')[-1]} | {t['load_s']:.1f} s | {t['encode_s']:.1f} s | "
                        f"{t['image_tokens']} | {t['prompt_tokens']} | {t['ttft_s']:.1f} s | {dec} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", help="full-size model folder (tools/fullsize.py)")
    ap.add_argument("recipe", type=Path, nargs="?", help="recipe of the model's family")
    ap.add_argument("--data", type=Path, help="`edgemed data demo --out DATA` folder")
    ap.add_argument("--text-data", action="store_true", help="train on DATA/abstracts.jsonl (a text recipe)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", action="append", default=[], help="extra recipe override (repeatable)")
    ap.add_argument("--threads", type=int, help="threads of every stage (default 2 once /tmp/demo.done exists, "
                    "else 1)")
    ap.add_argument("--budget-gb", type=float, default=12.0, help="do not start a stage edgemed predicts above this")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--resume", action="store_true", help="keep the stages OUT/results.json already holds")
    ap.add_argument("--table", action="store_true", help="print OUT/results.json as a table and exit")
    ap.add_argument("--worker-ask", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is None:
        args.threads = 2 if Path("/tmp/demo.done").exists() else 1
    if args.worker_ask:
        ask_worker(args.worker_ask, args.image, args.question, args.threads, args.dtype, args.max_tokens)
        return
    if args.table:
        print(table([Stage(**d) for d in json.loads((args.out / "results.json").read_text())["stages"]]))
        return
    if not (args.model and args.recipe and args.data and args.out):
        ap.error("give MODEL RECIPE --data DATA --out OUT")
    if not shutil.which("time") and not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is needed (apt-get install time)")
    t0 = time.time()
    stages = chain(args)
    print(f"\nthreads {args.threads}, budget {args.budget_gb:g} GB, {time.time() - t0:.0f} s in all\n")
    print(table(stages))


if __name__ == "__main__":
    main()
