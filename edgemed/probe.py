"""Which fast CPU paths of the native runtimes actually work on this machine, proven in a child process.

CPUID is not proof: on Intel Xeon VMs that report AMX (and whose kernel grants the tile state), llama.cpp's AMX
buffer type dies with SIGILL at the first ``tilezero``. So before llama.cpp runs a model in an edgemed process,
a child process loads small GGUF files (q4_0, q8_0, q4_k_m text models shaped so that the AMX and repacked
kernels take them, and an f16 and a q8_0 mmproj) under each mode, best first, and the first mode that survives
is used:

* ``full``: llama.cpp as built (AMX where compiled in, repacked kernels);
* ``no-amx``: the AMX buffer type taken out of the CPU backend's list, repacked kernels kept;
* ``plain``: no extra buffer types (``use_extra_bufts = False``): slower, but plain ggml kernels.

The verdict is cached per CPU (model and flags) and llama.cpp build (version and library hash) under
``$EDGEMED_HOME/probe``, so the probe runs once per machine and build.

Dropping one buffer type is done in the running process by editing the null-terminated list that the CPU
backend hands to llama.cpp (``ggml_backend_dev_get_extra_bufts``): llama.cpp has no switch for AMX alone, and
``use_extra_bufts = False`` also drops the repacked kernels (measured about 3x PyTorch instead of 6.5x).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from edgemed.errors import EdgemedError
from edgemed.machine import (  # noqa: F401 - CpuInfo, cpu_info, probe_dir: part of this module's interface
    PROBE_VERSION,
    CpuInfo,
    ProbeResult,
    TorchProbe,
    cpu_info,
    llamacpp_build,
    llamacpp_cache,
    probe_dir,
    torch_cache,
)

MODES = ("full", "no-amx", "plain")
TEXT_QUANTS = ("q4_0", "q8_0", "q4_k_m")  # the types the AMX and repacked kernels take
MMPROJ_QUANTS = ("f16", "q8_0")


class RuntimeBroken(EdgemedError):
    """A native runtime cannot run on this machine in any mode."""


# ---------------------------------------------------------------- the CPU backend's extra buffer types


def _ggml_libs():
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    ggml = ctypes.CDLL(str(lib / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    return base, ggml


def _extra_bufts_array():
    """The CPU backend's null-terminated array of extra buffer types (what llama.cpp reads when it loads a model)."""
    base, ggml = _ggml_libs()
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        return base, None
    fp = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(dev),
                                                b"ggml_backend_dev_get_extra_bufts")
    if not fp:
        return base, None
    return base, ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fp)(dev)


def extra_bufts() -> list[str]:
    """Names of the CPU backend's extra buffer types in this process, e.g. ['AMX', 'CPU_REPACK']."""
    base, arr = _extra_bufts_array()
    names, i = [], 0
    while arr and arr[i]:
        names.append(base.ggml_backend_buft_name(arr[i]).decode())
        i += 1
    return names


_BUILT: list[str] = []  # the list as llama.cpp was built, read before this process first dropped anything


def built_extra_bufts() -> list[str]:
    """The CPU backend's extra buffer types as built, even after :func:`drop_extra_bufts` edited this process's."""
    return list(_BUILT) if _BUILT else extra_bufts()


def drop_extra_bufts(names: set[str]) -> list[str]:
    """Take the named buffer types out of the list llama.cpp loads models with; returns what is left.

    Process-wide and one-way (models loaded afterwards never see them). Used for AMX alone: see the module
    docstring for why llama.cpp's own switch is too coarse.
    """
    if not _BUILT:
        _BUILT.extend(extra_bufts())
    base, arr = _extra_bufts_array()
    if not arr:
        return []
    kept, i = [], 0
    while arr[i]:
        if base.ggml_backend_buft_name(arr[i]).decode() not in names:
            kept.append(arr[i])
        i += 1
    for j in range(i):
        arr[j] = kept[j] if j < len(kept) else None
    return extra_bufts()


def apply_mode(mode: str, model_params) -> None:
    """Set up llama.cpp for ``mode`` before a model is loaded with ``model_params``."""
    if mode == "plain":
        model_params.use_extra_bufts = False
    elif mode == "no-amx":
        drop_extra_bufts({"AMX"})


# ---------------------------------------------------------------- probe files


def _write_text_probe(path: Path) -> None:
    """A one-layer Llama, 256 wide with a 512-token SentencePiece vocabulary, f32 and seeded: every matrix is
    a multiple of 256 columns and 32 rows, so AMX's, the repacked and the k-quant kernels all take it."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    d, ff, vocab = 256, 512, 512
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edgemed-probe")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(d // 2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name: str, *shape: int, scale: float = 0.05, ones: bool = False) -> None:
        a = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, a)

    t("token_embd.weight", vocab, d, scale=0.5)
    t("blk.0.attn_norm.weight", d, ones=True)
    for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t(f"blk.0.{n}.weight", d, d)
    t("blk.0.ffn_norm.weight", d, ones=True)
    t("blk.0.ffn_gate.weight", ff, d)
    t("blk.0.ffn_up.weight", ff, d)
    t("blk.0.ffn_down.weight", d, ff)
    t("output_norm.weight", d, ones=True)
    t("output.weight", vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_probe_files(folder: Path) -> Path:
    """Write the probe's files into ``folder`` once (text f32; a tiny LLaVA's text + mmproj in f16 and q8_0)."""
    from edgemed import console
    from edgemed.archs import REGISTRY
    from edgemed.artifacts import atomic_dir
    from edgemed.export.gguf import export_gguf

    if (folder / "done").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with console.quiet(), atomic_dir(folder, overwrite=True) as tmp:  # implementation detail: no bars for these
        _write_text_probe(tmp / "text-f32.gguf")
        tiny = REGISTRY["llava"].build_tiny(tmp / "tiny-llava", 0)
        for q in MMPROJ_QUANTS:
            export_gguf(tiny, ["f16"], tmp / f"vision-{q}", mmproj_quant=q)
        (tmp / "done").write_text(str(PROBE_VERSION))
    return folder


# ---------------------------------------------------------------- the child


def _child(mode: str, folder: Path) -> None:
    """Run every probe file under ``mode``. A crash here is the verdict."""
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals, _logger

    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    apply_mode(mode, mp)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgemed-probe-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for q in TEXT_QUANTS:
            path = _quantize(folder / "text-f32.gguf", work / f"text-{q}.gguf", q)
            model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = 128, 64, 64
            cp.n_threads = cp.n_threads_batch = min(2, os.cpu_count() or 1)
            ctx = _internals.LlamaContext(model=model, params=cp, verbose=False)
            batch = _internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1, verbose=False)
            batch.set_batch(list(range(3, 35)), 0, True)  # a prompt, then one token at a time
            ctx.decode(batch)
            for i in range(8):
                batch.set_batch([40 + i], 32 + i, True)
                ctx.decode(batch)
            row = np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(model.n_vocab(),))
            if not np.isfinite(row).all():
                raise SystemExit(f"{q}: logits are not finite")
            for o in (batch, ctx, model):
                o.close()
        for q in MMPROJ_QUANTS:
            _child_mmproj(folder / f"vision-{q}", mp)
    finally:
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()


def _quantize(src: Path, dst: Path, quant: str) -> Path:
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[{"q4_0": "MOSTLY_Q4_0", "q8_0": "MOSTLY_Q8_0",
                                           "q4_k_m": "MOSTLY_Q4_K_M"}[quant]])
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize the probe model to {quant}")
    return dst


def _child_mmproj(export: Path, mp) -> None:
    import numpy as np
    from llama_cpp import _internals, mtmd_cpp

    from edgemed.manifest import read_raw

    manifest = read_raw(export)
    model = _internals.LlamaModel(path_model=str(export / manifest["models"]["f16"]), params=mp, verbose=False)
    p = mtmd_cpp.mtmd_context_params_default()
    p.use_gpu, p.n_threads, p.print_timings, p.warmup = False, 2, False, False
    ctx = mtmd_cpp.mtmd_init_from_file(str(export / manifest["mmproj"]).encode(), model.model, p)
    if not ctx:
        raise SystemExit(f"mtmd could not load {manifest['mmproj']}")
    side = 32
    data = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8).tobytes()
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    bitmap = mtmd_cpp.mtmd_bitmap_init(side, side, buf)
    chunks = mtmd_cpp.mtmd_input_chunks_init()
    marker = mtmd_cpp.mtmd_default_marker()
    text = mtmd_cpp.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
    bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        raise SystemExit("mtmd could not tokenize the probe image")
    for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
        chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
        if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            if mtmd_cpp.mtmd_encode_chunk(ctx, chunk) != 0:
                raise SystemExit("mtmd could not encode the probe image")
    mtmd_cpp.mtmd_input_chunks_free(chunks)
    mtmd_cpp.mtmd_bitmap_free(bitmap)
    mtmd_cpp.mtmd_free(ctx)
    model.close()


def describe_exit(rc: int) -> str:
    """'killed by SIGILL (illegal instruction)' for a negative return code, else 'exit code N'."""
    import signal

    if rc < 0:
        try:
            sig = signal.Signals(-rc)
            return f"killed by {sig.name} ({signal.strsignal(sig) or sig.name})".replace("(Illegal", "(illegal")
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def run_child(mode: str, folder: Path, timeout: float = 300.0) -> str:
    """Run the probe for ``mode`` in a fresh interpreter; 'ok' or what went wrong."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        p = subprocess.run([sys.executable, "-m", "edgemed.probe", "--mode", mode, "--files", str(folder)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if p.returncode == 0:
        return "ok"
    tail = (p.stderr.strip().splitlines() or [""])[-1][:200]
    return describe_exit(p.returncode) + (f": {tail}" if tail and p.returncode > 0 else "")


def probe_llamacpp(refresh: bool = False, child: Callable[[str, Path], str] | None = None,
                   quiet: bool = False) -> ProbeResult:
    """The verdict for this CPU and llama.cpp build: cached, or found by running the probe children now."""
    from edgemed.machine import cached_llamacpp
    from edgemed.paths import cache_lock

    cpu, build = cpu_info(), llamacpp_build()
    if not refresh and (res := cached_llamacpp(cpu, build)) is not None:
        return res  # a damaged cache reads as none and is redone
    with cache_lock("probe-llamacpp"):  # one prober at a time; a waiter takes the verdict the first one wrote
        if not refresh and (res := cached_llamacpp(cpu, build)) is not None:
            return res
        return _probe_llamacpp(cpu, build, child, quiet)


def _probe_llamacpp(cpu: CpuInfo, build: str, child: Callable[[str, Path], str] | None, quiet: bool) -> ProbeResult:
    cache = llamacpp_cache(cpu, build)
    t0 = time.time()
    if not quiet:
        from edgemed.console import user_err

        print("edgemed: proving which llama.cpp CPU kernels work on this machine (once per CPU and build)...",
              file=user_err(), flush=True)
    folder = build_probe_files(probe_dir() / f"files-v{PROBE_VERSION}")
    res = ProbeResult(mode=None, extra_bufts=built_extra_bufts(), build=build, cpu=cpu.model)
    child = child or run_child
    for mode in MODES:
        if mode == "no-amx" and "AMX" not in res.extra_bufts:
            continue  # the same as full
        res.tried[mode] = child(mode, folder)
        if res.tried[mode] == "ok":
            res.mode = mode
            break
    res.seconds = round(time.time() - t0, 1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({k: v for k, v in asdict(res).items() if k != "cached"}, indent=2))
    tmp.replace(cache)
    return res


_MODE: str | None = None


def llamacpp_mode() -> str:
    """The mode this process runs llama.cpp in (probed once per machine and build); RuntimeBroken if none works."""
    global _MODE
    if _MODE is None:
        forced = os.environ.get("EDGEMED_LLAMACPP_MODE")
        if forced:
            if forced not in MODES:
                raise RuntimeBroken(f"EDGEMED_LLAMACPP_MODE={forced!r}; choose one of {', '.join(MODES)}")
            _MODE = forced
        else:
            res = probe_llamacpp()
            if res.mode is None:
                raise RuntimeBroken(
                    "llama.cpp cannot run on this CPU in any mode ("
                    + "; ".join(f"{m}: {s}" for m, s in res.tried.items())
                    + "); reinstall it for this machine with `pip install --force-reinstall --no-cache-dir "
                    "llama-cpp-python`, or use an ONNX export; `edgemed doctor` shows the details")
            _MODE = res.mode
    return _MODE


# ---------------------------------------------------------------- PyTorch's bf16 on this CPU

_TORCH_CHILD = """
import json, time, torch
torch.manual_seed(0)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
def t(dtype):
    x, y = a.to(dtype), b.to(dtype)
    for _ in range(2): x @ y
    t0 = time.perf_counter()
    for _ in range(8): x @ y
    return (time.perf_counter() - t0) / 8
out = {"fp32_ms": 1e3 * t(torch.float32), "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}
if out["onednn_bf16"]:
    out["bf16_ms"] = 1e3 * t(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["autocast_dtype"] = str(torch.nn.functional.linear(a[:8], b).dtype)
print(json.dumps(out))
"""


def probe_torch(refresh: bool = False) -> TorchProbe:
    """PyTorch's bf16 verdict for this CPU and torch version (cached like the llama.cpp one)."""
    from edgemed.machine import cached_torch
    from edgemed.paths import cache_lock

    if not refresh and (res := cached_torch()) is not None:
        return res
    with cache_lock("probe-torch"):
        if not refresh and (res := cached_torch()) is not None:
            return res
        return _probe_torch()


def _probe_torch() -> TorchProbe:
    cache = torch_cache(cpu_info())
    try:
        p = subprocess.run([sys.executable, "-c", _TORCH_CHILD], capture_output=True, text=True, timeout=300)
        res = (TorchProbe(**json.loads(p.stdout.strip().splitlines()[-1])) if p.returncode == 0
               else TorchProbe(error=describe_exit(p.returncode)))
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        res = TorchProbe(error=f"probe failed: {type(e).__name__}")
    for k in ("fp32_ms", "bf16_ms"):
        if getattr(res, k) is not None:
            setattr(res, k, round(getattr(res, k), 2))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(res), indent=2))
    tmp.replace(cache)  # a reader never sees half a verdict
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edgemed.probe", description="one llama.cpp probe child")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--files", type=Path, required=True)
    a = ap.parse_args(argv)
    _child(a.mode, a.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
