"""Multimodal LLM serving on NVIDIA Triton Inference Server with vLLM engines."""

__version__ = "0.1.0"
