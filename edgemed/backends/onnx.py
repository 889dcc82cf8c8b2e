"""The onnxruntime runtime: an ``edgemed export onnx`` folder as a Backend.

The folder's manifest describes its graphs (``edgemed.export.onnx``): ``decoder.onnx`` (token ids or input
embeddings, attention mask, optional position ids and the KV cache in; logits and the new KV cache out), and for
image models ``vision.onnx`` (image inputs -> projected features) and ``embed.onnx`` (ids + features -> input
embeddings, the features spliced over the image tokens). This runtime drives them: the HF processor saved in the
folder expands the image placeholder as the family does, the decoder is run once over the prompt and then one
token at a time on its own KV cache, with greedy or seeded temperature/top-p sampling, stop strings and streaming.

Graphs whose manifest entry names grid inputs (M-RoPE families, Qwen2.5-VL: vision ``grid_inputs``, decoder
``position_ids: "grid"``) get them from the architecture entry's ``grid`` functions (numpy, from the processor's
``image_grid_thw``): the vision graph per-patch positions, windows and frames, the decoder 3-D rotary positions,
and for each generated token its index plus the prompt's position delta.

The CPU execution provider is the default; CUDA is used when onnxruntime-gpu is installed and a GPU answers.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.archs import get_arch
from edgemed.artifacts import read_manifest
from edgemed.backends.base import GenParams, offline
from edgemed.backends.hf import HFBackend, load_processing, sample
from edgemed.errors import ArtifactError, DataError
from edgemed.files import onnx_session

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# keys of a processor's output that are not image inputs of the model
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
_NP_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32", "tensor(bool)": "bool"}


def providers_for(requested: list[str] | None = None) -> list[str]:
    """Execution providers: those asked for (each must be installed), else CUDA first when onnxruntime-gpu is
    installed, then CPU. onnxruntime falls back to CPU itself when CUDA is installed but no GPU answers."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ArtifactError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime; "
                                f"available: {', '.join(available)} (install onnxruntime-gpu for CUDA)")
        return list(requested)
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend(HFBackend):
    """An ONNX export answering through the edgemed Backend protocol.

    Args:
        folder: an ``edgemed export onnx`` folder (manifest kind "onnx").
        n_threads: intra-op threads for onnxruntime (default: onnxruntime's choice, all cores).
        providers: execution providers in order of preference (default: CUDA when available, then CPU).
    """

    name = "onnx"

    def __init__(self, folder: Path | str, n_threads: int | None = None, providers: list[str] | None = None,
                 **_: Any):
        offline()  # everything the runtime needs is in the folder
        import onnxruntime as ort

        folder = Path(folder)
        # continuing the last prompt's KV cache for a prompt that starts like it: parity turns this on for speed;
        # off elsewhere, since with int8 activations (int4/int8 MatMulNBits) a suffix run rounds differently from
        # a full prefill (2.6e-2 relative on the embedded int4), so an answer would depend on the request before it
        self.reuse_prefix = False
        self.manifest = read_manifest(folder, kinds=("onnx",))
        arch = get_arch(self.manifest["arch"])
        if arch.prepare is not None:  # registers processor classes the saved folder names
            arch.prepare()
        self.graphs: dict[str, Any] = self.manifest.get("graphs") or {}
        if "decoder" not in self.graphs:
            raise ArtifactError(f"{folder}: the manifest describes no decoder graph; export the model again "
                                "with `edgemed export onnx`")
        is_vision = arch.is_vision and "vision" in self.graphs
        super().__init__(folder, arch, is_vision, *load_processing(folder, arch, is_vision))
        opts = ort.SessionOptions()
        if n_threads:
            opts.intra_op_num_threads = int(n_threads)
        opts.log_severity_level = 3  # warnings about CPU fallbacks are expected and not the user's problem
        provs = providers_for(providers)
        self.sessions = {}
        for part, g in self.graphs.items():
            path = self.folder / g["file"]
            if not path.is_file():
                raise ArtifactError(f"{path}: missing; the export folder is incomplete, export it again")
            self.sessions[part] = onnx_session(path, opts, providers=provs)
        self.providers = self.sessions["decoder"].get_providers()
        self._dec = self.graphs["decoder"]
        self._dec_inputs = {i.name: i for i in self.sessions["decoder"].get_inputs()}
        self._dec_outputs = [o.name for o in self.sessions["decoder"].get_outputs()]
        self._past_names = [n for n in self._dec_inputs if n.startswith("past_key_values.")]
        self.max_length = int(self._dec.get("max_length") or self._max_positions())
        self._grid_config: dict[str, Any] | None = None
        if self._dec.get("position_ids") == "grid" or (self.graphs.get("vision") or {}).get("grid_inputs"):
            if self.arch.grid is None:
                raise ArtifactError(f"{self.folder}: the graphs take image-grid inputs but the {self.arch.name} "
                                    "architecture entry has no grid functions; export the model again")
            from transformers import AutoConfig  # fills in what config.json leaves at the class defaults

            self._grid_config = AutoConfig.from_pretrained(self.folder, local_files_only=True).to_dict()
        self._position_offset = 0  # grid decoders: what a generated token adds to its index (the prompt's delta)
        self._kept: tuple[list[int], dict[str, np.ndarray], np.ndarray] | None = None  # last text prompt's cache

    def _max_positions(self) -> int:
        import json

        cfg = self.folder / "config.json"
        c = json.loads(cfg.read_text()) if cfg.is_file() else {}
        c = c.get("text_config", c)
        return int(c.get("max_position_embeddings") or 4096)

    # ------------------------------------------------------------------ model inputs
    def _expand(self, tokens: list[int], image: Image.Image | None) -> tuple[list[int], dict[str, Any], list[int]]:
        """(ids with the image placeholder expanded by the saved processor, image inputs, the row of each of
        ``tokens``)."""
        if image is None:
            return list(tokens), {}, list(range(len(tokens)))
        enc, full, rows = self._expand_placeholder(list(tokens), image, "np")
        return full, {key: v for key, v in enc.items() if key not in _TEXT_KEYS}, rows

    def _image_features(self, image_inputs: dict[str, Any]) -> np.ndarray:
        import numpy as np

        g = self.graphs["vision"]
        sess = self.sessions["vision"]
        if g.get("grid_inputs"):  # per-patch positions, windows and frames: computed here, not in the graph
            image_inputs = {**image_inputs, **self.arch.grid.vision_inputs(image_inputs["image_grid_thw"],
                                                                           self._grid_config)}
        feed = {}
        for inp in sess.get_inputs():
            if inp.name not in image_inputs:
                raise DataError(f"the processor gave no {inp.name!r} for the vision graph "
                                f"(it gave {', '.join(image_inputs)}); the export folder's processor is not the "
                                "one the graph was exported with")
            v = np.asarray(image_inputs[inp.name]).astype(_NP_TYPES.get(inp.type, "float32"))
            want = g.get("input_shapes", {}).get(inp.name)
            if want and [d for d in v.shape] != list(want) and all(isinstance(d, int) for d in inp.shape):
                raise DataError(f"image input {inp.name} has shape {list(v.shape)}, the vision graph takes {want}")
            feed[inp.name] = v
        return sess.run(None, feed)[0]

    def _embed(self, ids: list[int], feats: np.ndarray | None) -> np.ndarray:
        import numpy as np

        hidden = int(self.graphs["embed"]["hidden_size"])
        f = feats if feats is not None else np.zeros((0, hidden), np.float32)
        return self.sessions["embed"].run(None, {"input_ids": np.asarray([ids], np.int64),
                                                 "image_features": f.astype(np.float32)})[0]

    def _empty_past(self) -> dict[str, np.ndarray]:
        import numpy as np

        d = self._dec
        out = {}
        for n in self._past_names:
            dtype = _NP_TYPES.get(self._dec_inputs[n].type, "float32")
            out[n] = np.zeros((1, int(d["num_kv_heads"]), 0, int(d["head_dim"])), dtype)
        return out

    def _cross_inputs(self, n: int, feats: np.ndarray | None, image_inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Vision states and cross-attention mask for a cross-attention decoder's prompt of ``n`` tokens.

        Without an image: one tile of zero states and a zero mask, with which every cross-attention layer adds
        exactly zero (the graph's docstring in ``edgemed.export.onnx`` says why).
        """
        import numpy as np

        if feats is None:
            per_tile = int(self._dec["cross_attention"]["n_vision_per_tile"])
            return {"cross_attention_states": np.zeros((1, per_tile, int(self._dec["hidden_size"])), np.float32),
                    "cross_attention_mask": np.zeros((1, n, 1, 1), np.float32)}
        return {"cross_attention_states": feats.reshape(1, -1, feats.shape[-1]).astype(np.float32),
                "cross_attention_mask": np.asarray(image_inputs["cross_attention_mask"], np.float32)}

    def _forward(self, ids: list[int], feats: np.ndarray | None, past: dict[str, np.ndarray], start: int,
                 cross: dict[str, np.ndarray] | None = None, positions: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run the decoder over ``ids`` after ``start`` cached positions; (logits [len(ids), vocab], new cache).

        ``positions``: a grid decoder's 3-D positions [3, len(ids)] (the prompt's); by default each token's index
        plus the prompt's delta.
        """
        import numpy as np

        n = len(ids)
        feed: dict[str, Any] = dict(cross or {})
        if "input_ids" in self._dec_inputs:
            feed["input_ids"] = np.asarray([ids], np.int64)
        else:
            feed["inputs_embeds"] = self._embed(ids, feats).astype(_NP_TYPES[self._dec_inputs["inputs_embeds"].type])
        if "attention_mask" in self._dec_inputs:
            feed["attention_mask"] = np.ones((1, start + n), np.int64)
        if "position_ids" in self._dec_inputs and self._dec.get("position_ids") == "grid":
            if positions is None:
                positions = np.broadcast_to(np.arange(start, start + n) + self._position_offset, (3, n))
            feed["position_ids"] = np.ascontiguousarray(positions, dtype=np.int64)[:, None]
        elif "position_ids" in self._dec_inputs:
            feed["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        if "token_type_ids" in self._dec_inputs:  # 1 on image tokens: the decoder lets them see their whole image
            feed["token_type_ids"] = (np.asarray([ids]) == int(self.graphs["embed"]["image_token_id"])).astype(np.int64)
        feed.update(past)
        out = dict(zip(self._dec_outputs, self.sessions["decoder"].run(None, feed), strict=True))
        new_past = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items()
                    if n.startswith("present.")}
        return out["logits"][0].astype(np.float32), new_past

    def _prefill(self, tokens: list[int], image: Image.Image | None
                 ) -> tuple[np.ndarray, dict, list[int], int, dict[str, np.ndarray] | None]:
        """Run the prompt; (logits, KV cache, row of each token, positions used, cross inputs for later steps).

        A text prompt that starts like the last one prefilled (the chat template's opening, or the prompt of the
        teacher-forced sequence just scored) runs only the rest, on that prompt's KV cache cut after the shared
        part; the shared rows' logits are the ones kept from then (same tokens, same positions)."""
        if image is None and self._reusable:
            hit = self._reuse(list(tokens))
            if hit is not None:
                return hit
        ids, image_inputs, rows = self._expand(tokens, image)
        feats = self._image_features(image_inputs) if image_inputs else None
        if len(ids) > self.max_length:
            raise DataError(f"the prompt is {len(ids)} tokens long; this model takes at most {self.max_length}")
        cross = None
        if "cross_attention_states" in self._dec_inputs:
            cross = self._cross_inputs(len(ids), feats, image_inputs)
            feats = None
        positions = None
        if self._dec.get("position_ids") == "grid":
            positions, self._position_offset = self.arch.grid.rope_index(ids, image_inputs.get("image_grid_thw"),
                                                                         self._grid_config)
        self._kept = None
        logits, past = self._forward(ids, feats, self._empty_past(), 0, cross, positions)
        if cross is not None:  # later tokens attend to the image as the prompt's last token does
            cross = {**cross, "cross_attention_mask": cross["cross_attention_mask"][:, -1:]}
        if image is None and self._reusable:
            self._kept = (list(ids), past, logits)
        return logits, past, rows, len(ids), cross

    @property
    def _reusable(self) -> bool:
        """Whether a prompt's KV cache can be cut and continued: plain positions, no cross-attention inputs."""
        return self.reuse_prefix and self._dec.get("position_ids") != "grid" \
            and "cross_attention_states" not in self._dec_inputs

    def _reuse(self, ids: list[int]) -> tuple[np.ndarray, dict, list[int], int, None] | None:
        """``_prefill`` of a text prompt on the kept prompt's cache, or None when they share no leading token."""
        import numpy as np

        if self._kept is None:
            return None
        kept_ids, kept_past, kept_logits = self._kept
        limit, n = min(len(kept_ids), len(ids) - 1), 0
        while n < limit and kept_ids[n] == ids[n]:
            n += 1
        if n == 0:
            return None
        if len(ids) > self.max_length:
            raise DataError(f"the prompt is {len(ids)} tokens long; this model takes at most {self.max_length}")
        past = {k: np.ascontiguousarray(v[:, :, :n]) for k, v in kept_past.items()}
        rest, past = self._forward(ids[n:], None, past, n)
        logits = np.concatenate([kept_logits[:n], rest])
        self._kept = (ids, past, logits)
        return logits, past, list(range(len(ids))), len(ids), None

    # ------------------------------------------------------------------ numbers
    def _logits(self, tokens: list[int], image: Image.Image | None) -> np.ndarray:
        logits, _, rows, _, _ = self._prefill(tokens, image)
        return logits[rows]

    def _image_embeddings(self, image: Image.Image) -> np.ndarray:
        _, image_inputs, _ = self._expand(self.tokenize(self.render("", image=True)), image)
        feats = self._image_features(image_inputs)
        return feats.reshape(-1, feats.shape[-1]).astype("float32")

    # ------------------------------------------------------------------ generation
    def _token_ids(self, tokens: list[int], image: Image.Image | None, params: GenParams
                   ) -> Generator[int, None, str]:
        """Greedy or seeded-sampled ids, each run through the decoder once the next one is asked for."""
        rng = self._rng(params)
        logits, past, _, pos, cross = self._prefill(tokens, image)
        last = logits[-1]
        while True:
            t = sample(last, params.temperature, params.top_p, rng)
            yield t
            if pos + 1 > self.max_length:
                return "length"
            step, past = self._forward([t], None, past, pos, cross)
            last, pos = step[-1], pos + 1

    def close(self) -> None:
        with self._lock:
            self.sessions = {}
