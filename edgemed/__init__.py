"""edgemed: fine-tune medical vision-language models, export them for offline use, and prove the export kept
the fine-tune."""

from __future__ import annotations

__version__ = "0.1.0"
