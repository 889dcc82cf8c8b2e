"""The `edgemed` command line. Thin by design: parse, build the spec, call the stage, report EdgemedError.

Heavy libraries (torch, transformers, llama_cpp, onnxruntime) are imported inside command bodies so that
`edgemed --help` answers at once.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from edgemed import __version__
from edgemed.errors import EdgemedError

OUT = click.Path(path_type=Path)
EXISTING = click.Path(path_type=Path, exists=True)


def handled(fn):
    """Turn an EdgemedError into one line on stderr and its exit code, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgemedError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was kept", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgemed")
def main() -> None:
    """Fine-tune medical vision-language models, export them for offline use, and prove the export kept the
    fine-tune."""


# ---------------------------------------------------------------- models and data
@main.group()
def models() -> None:
    """The embedded default models (built from files pip installed; no network)."""


@models.command("embedded")
@click.option("--name", type=click.Choice(["smollm2-135m", "smollm2-135m-llava", "all"]), default="all",
              show_default=True)
@handled
def models_embedded(name: str) -> None:
    """Materialise the embedded default models into the cache once, and print their folders."""
    from edgemed import embedded

    for n in embedded.NAMES if name == "all" else (name,):
        click.echo(f"{n}\t{embedded.materialize(n)}")


@main.group()
def data() -> None:
    """Data sets: the bundled synthetic demo set and converters."""


@data.command("demo")
@click.option("--out", type=OUT, required=True, help="Folder to write images and train/validation/test JSONL.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-train", type=int, default=480, show_default=True)
@click.option("--n-val", type=int, default=48, show_default=True)
@click.option("--n-test", type=int, default=96, show_default=True)
@click.option("--overwrite", is_flag=True)
@handled
def data_demo(out: Path, seed: int, n_train: int, n_val: int, n_test: int, overwrite: bool) -> None:
    """Generate the synthetic phantom-radiograph VQA set (deterministic for a seed)."""
    from edgemed.data import generate_demo_set

    paths = generate_demo_set(out, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, overwrite=overwrite)
    for split, p in paths.items():
        click.echo(f"{split}\t{p}")


# ---------------------------------------------------------------- fine-tune and merge
@main.command()
@click.argument("recipe", type=EXISTING)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value, e.g. --set optim.max_steps=20 (repeatable).")
@click.option("--out", type=OUT, required=True, help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--strict", is_flag=True, help="Fail instead of falling back when the recipe's method cannot run here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing finished run folder.")
@handled
def finetune(recipe: Path, overrides: tuple[str, ...], out: Path, resume: bool, strict: bool,
             overwrite: bool) -> None:
    """Fine-tune a model as RECIPE (YAML) says; writes adapters, a manifest and a loss curve to --out."""
    from edgemed.recipe import load_recipe
    from edgemed.train import finetune as run

    spec = load_recipe(recipe, overrides)
    click.echo(run(spec, out, resume=resume, strict=strict, overwrite=overwrite))


@main.command()
@click.argument("run_dir", type=EXISTING)
@click.option("--out", type=OUT, required=True, help="Model folder to write (a transformers checkpoint).")
@click.option("--overwrite", is_flag=True)
@click.option("--no-check", is_flag=True, help="Skip comparing merged logits with the adapter model's.")
@handled
def merge(run_dir: Path, out: Path, overwrite: bool, no_check: bool) -> None:
    """Merge a run's adapters into the 16/32-bit base weights and write a standard checkpoint."""
    from edgemed.merge import merge as run

    click.echo(run(run_dir, out, overwrite=overwrite, check=not no_check))


# ---------------------------------------------------------------- export
@main.group()
def export() -> None:
    """Export a merged model folder for an offline runtime."""


@export.command("gguf")
@click.argument("model_dir", type=EXISTING)
@click.option("--quant", "quants", multiple=True, default=("f16",), show_default=True,
              help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, q3_k_m, iq3_m; repeat for several.")
@click.option("--mmproj-quant", default="f16", show_default=True, help="Projector file type: f32, f16, q8_0, q5_0.")
@click.option("--out", type=OUT, required=True)
@click.option("--overwrite", is_flag=True)
@click.option("--auto-quant", is_flag=True,
              help="Export q4_k_m..q8_0 (or the --quant list) and keep the smallest that passes parity and eval.")
@click.option("--calibration", type=EXISTING, default=None,
              help="Data (text or VQA JSONL, VQA-RAD, SLAKE) for the importance matrices of llama.cpp's quants; "
                   "default: a merged fine-tune's own training data.")
@click.option("--no-calibration", is_flag=True, help="Quantize without importance matrices.")
@click.option("--calibration-samples", type=int, default=None, help="Calibration records to read (default 128).")
@handled
def export_gguf_cmd(model_dir: Path, quants: tuple[str, ...], mmproj_quant: str, out: Path, overwrite: bool,
                    auto_quant: bool, calibration: Path | None, no_calibration: bool,
                    calibration_samples: int | None) -> None:
    """Write MODEL_DIR as GGUF for llama.cpp: the text model and, for image models, the mmproj file."""
    from edgemed.export.gguf import export_gguf

    if auto_quant:
        from edgemed.parity import auto_quant as pick

        kw = {"candidates": tuple(quants)} if tuple(quants) != ("f16",) else {}  # --quant narrows the candidates
        if calibration is not None:
            kw["calibration"] = calibration
        click.echo(pick(model_dir, out, overwrite=overwrite, **kw))
        return
    click.echo(export_gguf(model_dir, list(quants), out, overwrite=overwrite, mmproj_quant=mmproj_quant,
                           calibration=calibration, calibrate=not no_calibration,
                           calibration_samples=calibration_samples))


@export.command("onnx")
@click.argument("model_dir", type=EXISTING)
@click.option("--quant", default="fp32", show_default=True, help="fp32, fp16, int8 or int4.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size (MatMulNBits).")
@click.option("--accuracy-level", type=int, default=4, show_default=True, help="int4 accuracy level (0-4).")
@click.option("--out", type=OUT, required=True)
@click.option("--overwrite", is_flag=True)
@handled
def export_onnx_cmd(model_dir: Path, quant: str, block_size: int, accuracy_level: int, out: Path,
                    overwrite: bool) -> None:
    """Write MODEL_DIR as ONNX for onnxruntime: decoder with KV cache and, for image models, the vision encoder."""
    from edgemed.export.onnx import export_onnx

    click.echo(export_onnx(model_dir, quant, out, overwrite=overwrite, block_size=block_size,
                           accuracy_level=accuracy_level))


# ---------------------------------------------------------------- checks
@main.command()
@click.argument("export_dir", type=EXISTING)
@click.option("--reference", type=EXISTING, help="PyTorch model folder (default: the export's parent).")
@click.option("--adapter", type=EXISTING, help="Run folder: also compare the adapter model (localises a bad merge).")
@click.option("--probes", type=EXISTING, help="JSONL probe file (default: run validation split + medical prompts).")
@click.option("--report", type=OUT, help="Write the JSON report here.")
@click.option("--threshold", "thresholds", multiple=True, metavar="KEY=VALUE",
              help="Override a pass threshold, e.g. --threshold kl_mean=0.05.")
@click.option("--max-probes", type=int, default=32, show_default=True)
@click.option("--threads", type=int, help="CPU threads per runtime (1 is fastest on a busy machine).")
@handled
def parity(export_dir: Path, reference: Path | None, adapter: Path | None, probes: Path | None,
           report: Path | None, thresholds: tuple[str, ...], max_probes: int, threads: int | None) -> None:
    """Compare an export with the PyTorch model it came from; exit 1 when it fails the thresholds."""
    from edgemed.parity import run_parity

    result = run_parity(export_dir, reference=reference, adapter=adapter, probes=probes, report=report,
                        thresholds=thresholds, max_probes=max_probes, n_threads=threads)
    click.echo(result.table())
    sys.exit(0 if result.passed else 1)


@main.command("eval")
@click.argument("model", type=EXISTING)
@click.option("--data", "data_path", type=EXISTING, required=True, help="VQA JSONL test file.")
@click.option("--compare", "others", multiple=True, type=EXISTING, help="More models or exports to compare.")
@click.option("--report", type=OUT)
@click.option("--limit", type=int, help="Evaluate only the first N records.")
@click.option("--threads", type=int, help="CPU threads per runtime (1 is fastest on a busy machine).")
@handled
def eval_cmd(model: Path, data_path: Path, others: tuple[Path, ...], report: Path | None, limit: int | None,
             threads: int | None) -> None:
    """Medical VQA accuracy (closed and open) of a model or export; with --compare, a retention table."""
    from edgemed.evaluate import evaluate_many

    result = evaluate_many([model, *others], data_path, report=report, limit=limit, n_threads=threads)
    click.echo(result.table())


@main.command()
@click.argument("bundle", type=EXISTING)
@handled
def verify(bundle: Path) -> None:
    """Check every file of an export bundle against its manifest; exit 1 on any mismatch."""
    from edgemed.bundle import verify as run

    problems = run(bundle)
    for p in problems:
        click.echo(f"FAIL {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"OK {bundle}")


# ---------------------------------------------------------------- serving
@main.command()
@click.argument("export_dir", type=EXISTING)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-key", envvar="EDGEMED_API_KEY", help="Require this bearer token (needed off loopback).")
@click.option("--max-concurrency", type=int, default=1, show_default=True,
              help="Generations at once: one model instance per slot, the CPU threads split between them.")
@click.option("--max-queue", type=int, default=16, show_default=True)
@click.option("--max-tokens-cap", type=int, default=512, show_default=True)
@click.option("--timeout", "request_timeout", type=float, default=120.0, show_default=True)
@click.option("--allow-dir", type=EXISTING, multiple=True, help="Folders from which file:// images may be read.")
@click.option("--no-verify", is_flag=True, help="Serve even if the bundle fails verification.")
@click.option("--max-body-mb", type=float, default=32.0, show_default=True, help="Largest request body accepted.")
@click.option("--max-image-pixels", type=int, default=50_000_000, show_default=True,
              help="Largest image (width x height) accepted, checked before decoding.")
@click.option("--threads", type=int, help="CPU threads of the runtime (default: the runtime's choice).")
@handled
def serve(export_dir: Path, host: str, port: int, api_key: str | None, max_concurrency: int, max_queue: int,
          max_tokens_cap: int, request_timeout: float, allow_dir: tuple[Path, ...], no_verify: bool,
          max_body_mb: float, max_image_pixels: int, threads: int | None) -> None:
    """Serve EXPORT_DIR offline with an OpenAI-compatible chat API."""
    from edgemed.serve import ServeConfig
    from edgemed.serve import serve as run

    run(ServeConfig(export_dir=export_dir, host=host, port=port, api_key=api_key, max_concurrency=max_concurrency,
                    max_queue=max_queue, max_tokens_cap=max_tokens_cap, request_timeout=request_timeout,
                    allow_dirs=list(allow_dir), verify=not no_verify, max_body_bytes=int(max_body_mb * 2**20),
                    max_image_pixels=max_image_pixels, n_threads=threads))


@main.command()
@click.argument("export_dir", type=EXISTING)
@click.argument("question")
@click.option("--image", type=EXISTING, help="PNG, JPEG or DICOM file.")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (with --temperature above 0).")
@click.option("--threads", type=int, help="CPU threads of the runtime (default: the runtime's choice).")
@handled
def ask(export_dir: Path, question: str, image: Path | None, system: str | None, max_tokens: int,
        temperature: float, seed: int | None, threads: int | None) -> None:
    """Ask one question (optionally about an image); the answer streams to the terminal."""
    from edgemed.serve import ask as run

    for piece in run(export_dir, question, image=image, system=system, max_tokens=max_tokens,
                     temperature=temperature, seed=seed, n_threads=threads):
        click.echo(piece, nl=False)
    click.echo()


# ---------------------------------------------------------------- the whole pipeline
@main.command()
@click.option("--out", type=OUT, default=Path("edgemed-demo"), show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--steps", type=int, help="Training steps (default: the demo recipe's).")
@handled
def demo(out: Path, overwrite: bool, steps: int | None) -> None:
    """The whole pipeline on the embedded default image model and the bundled synthetic data."""
    from edgemed.demo import run_demo

    run_demo(out, overwrite=overwrite, steps=steps)


if __name__ == "__main__":
    main()
