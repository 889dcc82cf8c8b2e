"""Benchmark the Qwen2.5-VL vision graph `edgemed export onnx` writes (window attention as masked attention over
all patches) against transformers' tower (window attention split at the window boundaries), at the width of the
Qwen2.5-VL-3B tower with random weights and a few blocks (no real weights are downloaded).

    python tools/bench_grid_vision.py                            # 4 blocks (3 windowed, 1 full), 448 and 896 px
    python tools/bench_grid_vision.py --depth 8 --sides 448 896 1344 --threads 2 --repeat 3

Prints, per image side, the number of patches, the median seconds of one forward pass of each runtime (after one
warm-up) and the largest relative difference of the image features.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=4, help="vision blocks; every 4th is full attention, as in 3B")
    ap.add_argument("--sides", type=int, nargs="+", default=[448, 896], help="square image sides in pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from edgemed.archs import get_arch
    from edgemed.export.onnx import _export_grid_vision

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    spec = get_arch("qwen2_5_vl")
    vision = {"depth": a.depth, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 256,
              "fullatt_block_indexes": list(range(3, a.depth, 4))}  # Qwen2.5-VL-3B: 32 blocks, [7, 15, 23, 31]
    text = {"hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 256, "vocab_size": 1000, "bos_token_id": 0, "eos_token_id": 1,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 8, 8]}}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=5)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()

    def inputs(side: int) -> dict:
        g = side // 14
        return {"pixel_values": torch.randn(g * g, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, g, g]])}

    def median(fn) -> tuple[float, object]:
        out = fn()
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vision.onnx"
        t0 = time.perf_counter()
        _export_grid_vision(model, spec, inputs(a.sides[0]), path)
        print(f"export: {time.perf_counter() - t0:.1f} s (traced at {a.sides[0]} px)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        print(f"{'side':>6} {'patches':>8} {'pytorch s':>10} {'onnx s':>8} {'max rel diff':>13}")
        for side in a.sides:
            x = inputs(side)
            feed = {"pixel_values": x["pixel_values"].numpy(),
                    **spec.grid.vision_inputs(x["image_grid_thw"].numpy(), cfg.to_dict())}
            with torch.inference_mode():
                tp, want = median(lambda x=x: torch.cat(model.model.get_image_features(**x).pooler_output).numpy())
            to, got = median(lambda feed=feed: sess.run(None, feed)[0])
            rel = np.abs(got - want).max() / np.abs(want).max()
            print(f"{side:>6} {x['pixel_values'].shape[0]:>8} {tp:>10.2f} {to:>8.2f} {rel:>13.1e}")


if __name__ == "__main__":
    main()
