"""Images for llama.cpp's mtmd, resized as the model's own transformers processor resizes them.

mtmd (llama.cpp's clip.cpp, as llama-cpp-python 0.3.36 ships it) resizes an image by its own rules, which agree
with the transformers processors only for a square image or one already at the model's size. Measured with a
tiny f16 export of each family against PyTorch (image-embedding cosine, non-square smooth pictures): Gemma 3
0.64-0.74 (mtmd pads to a square where Gemma3ImageProcessor stretches), LLaVA 0.75 (mtmd pads where CLIP's
processor crops the centre), Qwen2.5-VL 0.36-0.96 (mtmd pads to the aligned size where the processor stretches).
mtmd also ignores the Qwen pixel budget the mmproj records and applies its own floor of 8 tokens and ceiling of
4096: a 64 x 64 image gave 9 image tokens where the processor gives 4, so a Qwen2.5-VL-3B parity run compared
nothing (cosine 0 on shapes that differ).

So the llama.cpp backend hands mtmd the pixels the processor itself produces, resized and cropped but neither
rescaled nor normalised, read back from the processor's output. mtmd's own resize is then the identity, and a
family with a dynamic size lets mtmd take any token count the processor can give (``GGUFSpec.mtmd_tokens``).
Other llama.cpp programs given the same GGUF (llama-server, llama-mtmd-cli) keep mtmd's rules: docs/parity.md
says what they change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgemed.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

    from edgemed.archs.base import ArchSpec


def processor_pixels(processor: Any, arch: ArchSpec, image: Image.Image) -> Image.Image:
    """``image`` resized (and cropped) exactly as ``processor`` prepares it for the model, as 8-bit RGB."""
    import numpy as np
    from PIL import Image as PILImage

    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return image.convert("RGB")
    out = ip(images=image.convert("RGB"), do_rescale=False, do_normalize=False, return_tensors="np")
    unpack = arch.gguf.processor_pixels if arch.gguf is not None else None
    chw = unpack(out, ip) if unpack is not None else np.asarray(out["pixel_values"])[0]
    if chw.ndim != 3 or chw.shape[0] != 3:
        raise DataError(f"the {type(ip).__name__} gave pixels of shape {tuple(chw.shape)}, not one RGB image; "
                        "llama.cpp takes one image per question")
    # the processor's resize works on 8-bit values, so these are whole numbers already (rint only guards floats)
    return PILImage.fromarray(np.clip(np.rint(chw.transpose(1, 2, 0)), 0, 255).astype(np.uint8))
