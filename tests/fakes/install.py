"""Puts the fake ``triton_python_backend_utils`` into ``sys.modules`` under the real module's name (as the backend
stub would), once per test process, for every glue test module that imports Triton-side code."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

FAKE = Path(__file__).resolve().with_name("triton_python_backend_utils.py")


def install_fake_pb_utils() -> types.ModuleType:
    present = sys.modules.get("triton_python_backend_utils")
    if present is not None:
        assert hasattr(present, "incoming_request"), f"a different triton_python_backend_utils is loaded: {present}"
        return present
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", FAKE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_python_backend_utils"] = module
    spec.loader.exec_module(module)
    return module
