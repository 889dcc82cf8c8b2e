"""The `edgemed` command line. Thin by design: parse, build the spec, call the stage, report EdgemedError.

Heavy libraries (torch, transformers, llama_cpp, onnxruntime) are imported inside command bodies so that
`edgemed --help` answers at once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from edgemed import __version__
from edgemed.errors import EdgemedError

OUT = click.Path(path_type=Path)
EXISTING = click.Path(path_type=Path, exists=True)


INTERNAL_ERROR = 3  # exit code of an error edgemed did not expect (a bug, not a bad input)


def _start_console() -> None:
    """In the supervised child (see entry): library noise to the command's log unless --verbose."""
    from edgemed import console
    from edgemed.supervise import ENV, LOG_ENV

    if os.environ.get(ENV) and os.environ.get(LOG_ENV):
        ctx = click.get_current_context(silent=True)
        verbose = bool(ctx and ctx.find_root().params.get("verbose"))
        console.setup(Path(os.environ[LOG_ENV]), verbose=verbose)


def handled(fn):
    """Turn an EdgemedError into one line on stderr and its exit code, with no traceback.

    The last resort: an exception that is not an EdgemedError is a bug (every reader of a user file converts its
    parser's failures, see edgemed.files), but a user still sees one line, not a traceback; the traceback goes to
    a log file that the line names, so the bug is not hidden.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from edgemed.console import user_err

        _start_console()
        try:
            return fn(*args, **kwargs)
        except EdgemedError as e:
            click.echo(f"error: {e}", file=user_err())
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was kept", file=user_err())
            sys.exit(130)
        except click.ClickException:
            raise  # a usage error a command found itself: click prints it with the usage line, exit 2
        except Exception as e:  # noqa: BLE001 - the last resort described above
            if isinstance(e, OSError) and e.filename is not None:
                # the machine refused a file operation (disk full, permissions, read-only): not a bug; name the file
                click.echo(f"error: {e.filename}: {e.strerror or e}; free space, fix the permissions or choose "
                           "another path", file=user_err())
                sys.exit(2)
            log = _log_crash(fn.__name__)
            where = f"the traceback is in {log}" if log else "no log file could be written"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            click.echo(f"error: internal error in `{fn.__name__.replace('_cmd', '').replace('_', ' ')}` "
                       f"({type(e).__name__}: {first}); this is a bug in edgemed, not in your input: {where}; "
                       "please report it with that file", file=user_err())
            sys.exit(INTERNAL_ERROR)

    return wrapper


def _log_crash(command: str) -> Path | None:
    """Write the current exception's traceback to ``$EDGEMED_HOME/logs`` (or the temp folder); its path."""
    import datetime as dt
    import tempfile
    import traceback

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    from edgemed.embedded import cache_root

    home = cache_root()
    for folder in (home / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"edgemed-crash-{stamp}-{os.getpid()}.log"
            # the command's name only, not its arguments: a question given to `ask` may hold patient data
            path.write_text(f"edgemed {__version__} {command}\n{traceback.format_exc()}")
            return path
        except OSError:
            continue
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgemed")
@click.option("--verbose", is_flag=True, help="Show the libraries' own output (otherwise it goes to a log file).")
def main(verbose: bool) -> None:
    """Fine-tune medical vision-language models, export them for offline use, and prove the export kept the
    fine-tune."""


def entry() -> None:
    """The `edgemed` program: runs the command in a supervised child, so a native crash ends in one clear line."""
    from edgemed.supervise import ENV

    argv = sys.argv[1:]
    words = [a for a in argv if not a.startswith("-")]
    if os.environ.get(ENV) or not words:  # --help, --version: nothing native runs
        main()
        return
    from edgemed import console, supervise

    command = words[0]
    log = console.new_log_path(command if command.isidentifier() else "edgemed")
    sys.exit(supervise.run([sys.executable, "-m", "edgemed.cli", *argv], command, log))


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
              help="Override a recipe value, e.g. --set stages.0.max_steps=20 (repeatable).")
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
def calibration_options(fn):
    """``--calibration``, ``--no-calibration`` and ``--calibration-samples``, shared by both export commands."""
    fn = click.option("--calibration-samples", type=int, default=None,
                      help="Calibration records to read (default 128).")(fn)
    fn = click.option("--no-calibration", is_flag=True, help="Quantize without importance matrices.")(fn)
    return click.option("--calibration", type=EXISTING, default=None,
                        help="Data (text or VQA JSONL, VQA-RAD, SLAKE) for the importance matrices of the 4/3-bit "
                             "quants; default: a merged fine-tune's own training data. export gguf also takes an "
                             "imatrix.gguf (an earlier export's or llama-imatrix's) and uses its matrices.")(fn)


@main.group()
def export() -> None:
    """Export a merged model folder for an offline runtime."""


@export.command("gguf")
@click.argument("model_dir", type=EXISTING)
@click.option("--quant", "quants", multiple=True, default=("f16",), show_default=True,
              help="f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, iq4_xs, q3_k_m, iq3_m; repeat for several.")
@click.option("--mmproj-quant", default="f16", show_default=True, help="Projector file type: f32, f16, q8_0, q5_0.")
@click.option("--adapter-quant", default="f16", show_default=True,
              help="For a run folder: LoRA adapter file type (f16, q8_0, f32); the base gets --quant.")
@click.option("--compensate", type=int, default=0, metavar="RANK",
              help="For a run folder: also write, per 4/3-bit base, an adapter that adds a rank-RANK correction of "
                   "that base's rounding error (weighted by the run's own activations); used with that base.")
@click.option("--out", type=OUT, required=True)
@click.option("--overwrite", is_flag=True)
@click.option("--auto-quant", is_flag=True,
              help="Export q4_k_m..q8_0 (or the --quant list) and keep the smallest that passes parity and eval.")
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to embed (and save beside the GGUF) instead of the folder's.")
@click.option("--imatrix-types", type=click.Choice(["all", "k-quants"]), default=None,
              help="Calibrated tensors: k-quants (the default: the q4_0/q5_0 fallback blocks of narrow matrices "
                   "rounded unweighted) or all (llama.cpp's way). --auto-quant tries both unless one is given.")
@calibration_options
@handled
def export_gguf_cmd(model_dir: Path, quants: tuple[str, ...], mmproj_quant: str, adapter_quant: str,
                    compensate: int, out: Path, overwrite: bool, auto_quant: bool, chat_template: Path | None,
                    imatrix_types: str | None, calibration: Path | None, no_calibration: bool,
                    calibration_samples: int | None) -> None:
    """Write MODEL_DIR as GGUF for llama.cpp: the text model and, for image models, the mmproj file.

    Given a fine-tune run folder, writes the base once plus the run's LoRA as a llama.cpp adapter file."""
    from edgemed.export.gguf import export_gguf
    from edgemed.prompting import read_template

    # every export option reaches every file, auto-quant's candidates included
    options = {"mmproj_quant": mmproj_quant, "adapter_quant": adapter_quant,
               "chat_template": read_template(chat_template) if chat_template else None,
               "calibration": calibration, "calibrate": not no_calibration, "calibration_samples": calibration_samples}
    if auto_quant:
        from click.core import ParameterSource

        if compensate:
            raise click.UsageError("--auto-quant does not try --compensate; export the run with --compensate and "
                                   "check it with `edgemed parity`")
        from edgemed.export.auto_quant import auto_quant as pick

        # the quants given on the command line are the candidates (even `--quant f16`); none given: the default list
        given = click.get_current_context().get_parameter_source("quants") is not ParameterSource.DEFAULT
        kw = {"candidates": tuple(quants)} if given else {}
        click.echo(pick(model_dir, out, overwrite=overwrite, imatrix_types=imatrix_types, **options, **kw))
        return
    click.echo(export_gguf(model_dir, list(quants), out, overwrite=overwrite, compensate=compensate,
                           imatrix_types=imatrix_types, **options))


@export.command("onnx")
@click.argument("model_dir", type=EXISTING)
@click.option("--quant", default="fp32", show_default=True, help="fp32, fp16, int8 or int4.")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size (MatMulNBits).")
@click.option("--accuracy-level", type=int, default=4, show_default=True, help="int4 accuracy level (0-4).")
@click.option("--mixed", default=None, metavar="POLICY",
              help="With --quant int4: 8-bit where llama.cpp's POLICY (q4_k_m, q5_k_m, q3_k_m, q4_0) stores a "
                   "matrix above 4-bit levels, read from llama.cpp's own quantization of this model.")
@click.option("--out", type=OUT, required=True)
@click.option("--overwrite", is_flag=True)
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to save as the folder's template instead of the model's (a base model "
                   "has none).")
@calibration_options
@handled
def export_onnx_cmd(model_dir: Path, quant: str, block_size: int, accuracy_level: int, mixed: str | None, out: Path,
                    overwrite: bool, chat_template: Path | None, calibration: Path | None, no_calibration: bool,
                    calibration_samples: int | None) -> None:
    """Write MODEL_DIR as ONNX for onnxruntime: decoder with KV cache and, for image models, the vision encoder."""
    from edgemed.export.onnx import export_onnx
    from edgemed.prompting import read_template

    click.echo(export_onnx(model_dir, quant, out, overwrite=overwrite, block_size=block_size,
                           accuracy_level=accuracy_level,
                           chat_template=read_template(chat_template) if chat_template else None,
                           calibration=calibration, calibrate=not no_calibration,
                           calibration_samples=calibration_samples, mixed=mixed))


@export.command("onnx-adapters")
@click.option("--adapter", "adapters", multiple=True, required=True, metavar="NAME=MERGED_DIR",
              help="A LoRA fine-tune (`edgemed merge` folder) to carry as adapters/NAME.onnx_adapter (repeatable).")
@click.option("--block-size", type=int, default=32, show_default=True, help="int4 block size of the base.")
@click.option("--out", type=OUT, required=True)
@click.option("--overwrite", is_flag=True)
@handled
def export_onnx_adapters_cmd(adapters: tuple[str, ...], block_size: int, out: Path, overwrite: bool) -> None:
    """Write one int4 ONNX base and an onnxruntime-genai adapter file per fine-tune of it (og.Adapters switches
    them per generator)."""
    from edgemed.export.onnx_genai_adapters import export_genai_adapters
    from edgemed.serve import parse_adapters

    click.echo(export_genai_adapters(parse_adapters(adapters), out, overwrite=overwrite, block_size=block_size))


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
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to render prompts with (a base model has none).")
@click.option("--reference-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="The PyTorch reference's dtype; auto: float32 where it fits in memory, else the "
              "checkpoint's 16-bit type.")
@handled
def parity(export_dir: Path, reference: Path | None, adapter: Path | None, probes: Path | None,
           report: Path | None, thresholds: tuple[str, ...], max_probes: int, threads: int | None,
           chat_template: Path | None, reference_dtype: str) -> None:
    """Compare an export with the PyTorch model it came from; exit 1 when it fails the thresholds."""
    from edgemed.export.auto_quant import fresh_float_export
    from edgemed.parity import run_parity
    from edgemed.prompting import read_template

    result = run_parity(export_dir, reference=reference, adapter=adapter, probes=probes, report=report,
                        thresholds=thresholds, max_probes=max_probes, n_threads=threads,
                        chat_template=read_template(chat_template) if chat_template else None,
                        float_export=fresh_float_export,  # the conversion stage of a quantised-only folder
                        reference_dtype=reference_dtype)
    click.echo(result.table())
    sys.exit(0 if result.passed else 1)


@main.command("eval")
@click.argument("model", type=EXISTING, required=False)
@click.option("--data", "data_path", type=EXISTING, required=True,
              help="Test file: edgemed JSONL, VQA-RAD/SLAKE JSON, PathVQA pkl/parquet, R2Gen annotation.json.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "vqa-rad", "slake", "pathvqa", "r2gen"]),
              help="Layout of --data (default: recognised from the file).")
@click.option("--protocol", default="edgemed", show_default=True,
              help="VQA scoring rules: edgemed, pefomed, llava-med, medgemma (docs/evaluation.md).")
@click.option("--task", type=click.Choice(["vqa", "report"]), default="vqa", show_default=True)
@click.option("--split", help="Split inside --data: VQA-RAD train/test/all, R2Gen train/val/test (default test).")
@click.option("--predictions", type=EXISTING, help="Score this PRED.jsonl ({id, answer} per line); no model runs.")
@click.option("--trust-pickle", is_flag=True, help="Read PathVQA's release .pkl files (a pickle can run code).")
@click.option("--image-root", type=EXISTING, help="Image folder, where the layout's default does not fit.")
@click.option("--compare", "others", multiple=True, type=EXISTING, help="More models or exports to compare.")
@click.option("--report", type=OUT)
@click.option("--limit", type=int, help="Evaluate only the first N records.")
@click.option("--max-tokens", type=int, help="Answer budget (default 12 for VQA, 160 for reports).")
@click.option("--threads", type=int, help="CPU threads per runtime (1 is fastest on a busy machine).")
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to render prompts with (a base model has none).")
@handled
def eval_cmd(model: Path | None, data_path: Path, fmt: str | None, protocol: str, task: str, split: str | None,
             predictions: Path | None, trust_pickle: bool, image_root: Path | None, others: tuple[Path, ...],
             report: Path | None, limit: int | None, max_tokens: int | None, threads: int | None,
             chat_template: Path | None) -> None:
    """Medical VQA or report scores of a model or export; with --compare, a retention table (change, 95% CI,
    flips, McNemar p); with --predictions, rescore saved answers."""
    from edgemed.errors import ParityError
    from edgemed.evaluate import evaluate_many, rescore, rescore_text
    from edgemed.prompting import read_template

    if predictions is not None:
        if model is not None or others:
            raise ParityError("--predictions scores saved answers; give no MODEL or --compare with it")
        click.echo(rescore_text(rescore(predictions, data_path, report=report, protocol=protocol, task=task,
                                        fmt=fmt, split=split, trust_pickle=trust_pickle, image_root=image_root)))
        return
    if model is None:
        raise ParityError("give a MODEL folder to evaluate, or --predictions PRED.jsonl to score saved answers")
    result = evaluate_many([model, *others], data_path, report=report, limit=limit, n_threads=threads,
                           protocol=protocol, task=task, fmt=fmt, split=split, trust_pickle=trust_pickle,
                           image_root=image_root, max_tokens=max_tokens,
                           chat_template=read_template(chat_template) if chat_template else None)
    click.echo(result.table())
    for r in result.results:
        if r.get("retention"):
            click.echo(f"{r['label']} vs {r['vs']}: {r['retention']['text']}")


@main.command()
@click.argument("bundle", type=EXISTING)
@handled
def verify(bundle: Path) -> None:
    """Check every file of an export bundle against its manifest; exit 1 on any mismatch."""
    from edgemed.bundle import parity_drift
    from edgemed.bundle import verify as run
    from edgemed.console import user_err

    problems = run(bundle)
    for p in problems:
        click.echo(f"FAIL {p}", file=user_err())
    if problems:
        sys.exit(1)
    click.echo(f"OK {bundle}")
    drift = parity_drift(bundle)  # the files are intact; whether their parity figures hold here is another matter
    if drift:
        click.echo(f"note {drift}", file=user_err())


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
@click.option("--allow-host", multiple=True, metavar="NAME",
              help="Accept requests whose Host is NAME, beside loopback names (repeatable; '*' accepts any).")
@click.option("--allow-origin", multiple=True, metavar="ORIGIN",
              help="Let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable; also "
                   "EDGEMED_ORIGINS, comma-separated). None by default.")
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to render prompts with (a base model has none).")
@click.option("--adapter", multiple=True, metavar="NAME=DIR",
              help="Serve the LoRA adapter export DIR (`edgemed export gguf RUN_DIR`) on this GGUF base as model "
                   "NAME; a request's model field picks it (repeatable).")
@handled
def serve(export_dir: Path, host: str, port: int, api_key: str | None, max_concurrency: int, max_queue: int,
          max_tokens_cap: int, request_timeout: float, allow_dir: tuple[Path, ...], no_verify: bool,
          max_body_mb: float, max_image_pixels: int, threads: int | None, allow_host: tuple[str, ...],
          allow_origin: tuple[str, ...], chat_template: Path | None, adapter: tuple[str, ...]) -> None:
    """Serve EXPORT_DIR offline with an OpenAI-compatible API (chat and, for base models, text completions)."""
    from edgemed.prompting import read_template
    from edgemed.serve import ServeConfig, parse_adapters
    from edgemed.serve import serve as run

    origins = [*allow_origin, *(o.strip() for o in os.environ.get("EDGEMED_ORIGINS", "").split(",") if o.strip())]
    run(ServeConfig(export_dir=export_dir, host=host, port=port, api_key=api_key, max_concurrency=max_concurrency,
                    max_queue=max_queue, max_tokens_cap=max_tokens_cap, request_timeout=request_timeout,
                    allow_dirs=list(allow_dir), verify=not no_verify, max_body_bytes=int(max_body_mb * 2**20),
                    max_image_pixels=max_image_pixels, n_threads=threads, allow_hosts=list(allow_host),
                    allow_origins=origins, chat_template=read_template(chat_template) if chat_template else None,
                    adapters=parse_adapters(adapter)))


@main.command()
@click.argument("export_dir", type=EXISTING)
@click.argument("question")
@click.option("--image", type=EXISTING, help="PNG, JPEG or DICOM file.")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed (with --temperature above 0).")
@click.option("--threads", type=int, help="CPU threads of the runtime (default: the runtime's choice).")
@click.option("--chat-template", "chat_template", type=EXISTING,
              help="Jinja chat template file to render prompts with (a base model has none).")
@handled
def ask(export_dir: Path, question: str, image: Path | None, system: str | None, max_tokens: int,
        temperature: float, seed: int | None, threads: int | None, chat_template: Path | None) -> None:
    """Ask one question (optionally about an image); the answer streams to the terminal.

    A base model (no chat template) continues QUESTION as plain text.
    """
    from edgemed.prompting import read_template
    from edgemed.serve import ask as run

    for piece in run(export_dir, question, image=image, system=system, max_tokens=max_tokens,
                     temperature=temperature, seed=seed, n_threads=threads,
                     chat_template=read_template(chat_template) if chat_template else None):
        click.echo(piece, nl=False)
    click.echo()


# ---------------------------------------------------------------- the machine
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Write the findings as JSON on stdout (for scripts).")
@click.option("--refresh", is_flag=True, help="Run the runtime probes again instead of using their cached verdict.")
@handled
def doctor(as_json: bool, refresh: bool) -> None:
    """Preflight check of this workstation: CPU features that really work, runtimes, memory, models, offline."""
    import json

    from edgemed.doctor import run_doctor

    report = run_doctor(refresh=refresh)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for c in report.checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            click.echo(f"{mark} {c.name:<22} {c.detail}")
            if not c.ok and c.fix:
                click.echo(f"     {'':<22} fix: {c.fix}")
        click.echo(f"\nsummary: {report.summary()}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("recipe", type=EXISTING)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (repeatable).")
@click.option("--model", "model_dir", type=EXISTING, help="Model folder to plan for (default: the recipe's).")
@click.option("--batch", type=click.IntRange(1), help="Sequences per step (default: the recipe's batch_size).")
@click.option("--seq", type=click.IntRange(16), help="Tokens per sequence (default: the recipe's max_length).")
@click.option("--supervised", type=click.IntRange(1), help="Answer tokens per sequence that carry the loss "
              "(default: all of --seq, the most memory).")
@click.option("--json", "as_json", is_flag=True, help="Write the plan as JSON on stdout.")
@handled
def plan(recipe: Path, overrides: tuple[str, ...], model_dir: Path | None, batch: int | None, seq: int | None,
         supervised: int | None, as_json: bool) -> None:
    """Predict the GPU memory RECIPE's fine-tune needs (QLoRA on CUDA), from the model's config alone."""
    import json

    from edgemed import embedded
    from edgemed.plan import plan as make_plan
    from edgemed.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    p = make_plan(r, model_dir or embedded.resolve(r.model.path), batch=batch, seq=seq, supervised=supervised)
    click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.table())


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
    main(prog_name="edgemed")
