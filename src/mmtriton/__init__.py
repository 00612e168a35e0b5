"""Multimodal LLM serving on NVIDIA Triton Inference Server with vLLM engines."""

import locale as _locale

# Triton's Python-backend stub starts its interpreter with an ASCII default encoding whatever LANG says, and
# torch/vLLM then fail to import (UnicodeDecodeError in torch inductor's templates). Every model.py imports this
# package before torch, so the fix lives here once: only when the encoding is ASCII, so other hosts keep theirs.
if _locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii", "us-ascii"):
    _locale.setlocale(_locale.LC_ALL, "C.UTF-8")

__version__ = "0.1.0"
