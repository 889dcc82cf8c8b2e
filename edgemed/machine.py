"""What this machine is and what the probes decided about it, read from the probe's cache without running anything.

Manifests record this one line (``machine_summary``); :mod:`edgemed.probe` runs the probes and writes the cache, and
:mod:`edgemed.doctor` reports it. Kept apart from the probe so that writing a manifest never pulls in the code that
builds probe files with the exporter (the import graph stays acyclic).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edgemed.paths import cache_root

PROBE_VERSION = 1  # bump when the probe's files or checks change: cached verdicts are redone
# the CPU flags that decide which kernels the runtimes pick (as /proc/cpuinfo spells them)
FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")



@dataclass
class CpuInfo:
    model: str
    vendor: str
    flags: list[str]
    cores: int

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.model}|{' '.join(self.flags)}|{platform.machine()}".encode()).hexdigest()[:16]


@dataclass
class ProbeResult:
    """The probe's verdict for one CPU and llama.cpp build."""

    mode: str | None  # the first mode that survived; None: none did
    tried: dict[str, str] = field(default_factory=dict)  # mode -> "ok" or what killed it
    extra_bufts: list[str] = field(default_factory=list)  # the CPU backend's extra buffer types, as built
    build: str = ""
    cpu: str = ""
    seconds: float = 0.0
    cached: bool = False

    @property
    def amx(self) -> str:
        """One phrase for the AMX decision."""
        if "AMX" not in self.extra_bufts:
            return "not built in"
        if self.mode == "full":
            return "on (proven)"
        return f"off ({self.tried.get('full', 'failed')})"


def cpu_info() -> CpuInfo:
    """The CPU's model, vendor and the flags in FLAGS it reports (Linux /proc/cpuinfo; elsewhere platform)."""
    model, vendor, flags = platform.processor() or platform.machine(), "", set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "model name" and model in ("", platform.processor(), platform.machine()):
            model = v.strip()
        elif k == "vendor_id" and not vendor:
            vendor = v.strip()
        elif k == "flags" and not flags:
            flags = set(v.split())
    return CpuInfo(model=model, vendor=vendor, flags=[f for f in FLAGS if f in flags], cores=os.cpu_count() or 1)


def llamacpp_build() -> str:
    """llama-cpp-python's version and a hash of its CPU backend library: a rebuild is a new build."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    h = hashlib.sha256()
    for name in ("libggml-cpu.so", "libggml-base.so", "libllama.so", "libmtmd.so"):
        p = lib / name
        if p.is_file():
            h.update(p.read_bytes())
    return f"{llama_cpp.__version__}+{h.hexdigest()[:12]}"


def probe_dir() -> Path:
    return cache_root() / "probe"


def llamacpp_cache(cpu: CpuInfo, build: str) -> Path:
    return probe_dir() / f"llamacpp-{cpu.key}-{build.replace('+', '-')}-v{PROBE_VERSION}.json"


def torch_cache(cpu: CpuInfo) -> Path:
    return probe_dir() / f"torch-{cpu.key}-{version('torch')}-v{PROBE_VERSION}.json"


def cached_llamacpp(cpu: CpuInfo | None = None, build: str | None = None) -> ProbeResult | None:
    """The cached llama.cpp verdict for this CPU and build, or None (never probed, or a damaged cache)."""
    cpu = cpu or cpu_info()
    try:
        res = ProbeResult(**json.loads(llamacpp_cache(cpu, build or llamacpp_build()).read_text()))
    except (json.JSONDecodeError, TypeError, OSError):
        return None
    res.cached = True
    return res


def cached_torch(cpu: CpuInfo | None = None) -> TorchProbe | None:
    """The cached PyTorch bf16 verdict for this CPU and torch version, or None."""
    try:
        data = json.loads(torch_cache(cpu or cpu_info()).read_text())
        return TorchProbe(**{k: v for k, v in data.items() if k in TorchProbe.__dataclass_fields__})
    except (json.JSONDecodeError, TypeError, OSError, PackageNotFoundError):
        return None


@dataclass
class TorchProbe:
    """PyTorch's fp32 and bf16 matmul speed here (1024x1024, all threads), measured in a child process."""

    fp32_ms: float | None = None
    bf16_ms: float | None = None
    onednn_bf16: bool = False
    autocast_dtype: str | None = None
    error: str | None = None  # what killed the child, if it died

    @property
    def bf16_speedup(self) -> float | None:
        return round(self.fp32_ms / self.bf16_ms, 2) if self.fp32_ms and self.bf16_ms else None

    @property
    def use_bf16(self) -> bool:
        """bf16 autocast pays on this CPU: it ran, autocast produced bf16, and it was at least 1.2x faster."""
        return bool(self.autocast_dtype == "torch.bfloat16" and (self.bf16_speedup or 0) >= 1.2)



def meminfo() -> dict[str, float]:
    """/proc/meminfo's fields in GB (empty where there is none)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                out[k] = round(int(v.split()[0]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return out


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def summary_line(facts: dict[str, Any]) -> str:
    """One line naming the machine and the runtime decisions, recorded in manifests and the demo report."""
    lc = facts.get("llamacpp") or {}
    bf = facts.get("torch_bf16") or {}
    parts = [f"{facts.get('cpu', '?')} {facts.get('threads', '?')} threads {facts.get('memory_gb', '?')} GB",
             f"llama.cpp {lc.get('build', 'missing')} mode {lc.get('mode')} (AMX {lc.get('amx', '?')})",
             f"torch {_version('torch') or 'missing'} bf16 {'on' if bf.get('autocast') else 'off'}"
             + (f" {bf.get('speedup')}x" if bf.get("speedup") else ""),
             f"onnxruntime {_version('onnxruntime') or 'missing'}",
             "cuda" if facts.get("cuda") else "no cuda"]
    return "; ".join(parts)


def runtime_versions() -> dict[str, str | None]:
    """The runtimes a parity verdict holds for: a GGUF's figures are llama.cpp's at this build, an ONNX's
    onnxruntime's at this version (recorded in parity reports, compared by ``edgemed verify`` and ``serve``)."""
    try:
        build: str | None = llamacpp_build()
    except Exception:  # noqa: BLE001 - llama.cpp missing or unreadable: the report says so
        build = None
    return {"llama_cpp": build, "onnxruntime": _version("onnxruntime"), "torch": _version("torch")}


def runtime_drift(report: dict[str, Any], runtime: str) -> str | None:
    """One sentence when ``report`` (a parity report) was measured with another build of ``runtime``
    ("llama_cpp" or "onnxruntime") than this machine has, else None."""
    then = (report.get("runtimes") or {}).get(runtime)
    now = runtime_versions().get(runtime)
    if then is None or now is None or then == now:
        return None
    name = {"llama_cpp": "llama.cpp", "onnxruntime": "onnxruntime"}[runtime]
    return (f"its parity report was measured with {name} {then}, this machine runs {name} {now}: kernels differ "
            "between builds, so run `edgemed parity` again before relying on the figures")


def machine_summary() -> str:
    """The doctor's one-line summary from cached probes and package metadata (cheap; runs no probe)."""
    cpu = cpu_info()
    facts: dict[str, Any] = {"cpu": cpu.model, "threads": cpu.cores, "memory_gb": meminfo().get("MemTotal")}
    try:
        build = llamacpp_build()
        res = cached_llamacpp(cpu, build)
        facts["llamacpp"] = {"build": build, "mode": res.mode if res else "not probed",
                             "amx": res.amx if res else "?"}
    except Exception:  # noqa: BLE001 - a summary never fails the step that records it
        pass
    tp = cached_torch(cpu)
    if tp is not None:
        facts["torch_bf16"] = {"autocast": tp.use_bf16, "speedup": tp.bf16_speedup}
    return summary_line(facts)
