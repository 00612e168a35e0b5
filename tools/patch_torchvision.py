"""Make PyPI's torchvision importable beside CPU torch (run by bin/setup; idempotent).

PyPI's torchvision is a CUDA build whose compiled ops do not load next to torch's CPU wheel; its two
unconditional fake-op registrations (nms, qnms) then fail at import with "operator torchvision::nms does not
exist". Transformers only needs torchvision's Python transforms (Qwen2-VL video processor), so those two
registrations are made conditional on the ops being loaded, as the other registrations in the file already are.
"""

import importlib.util
import sys
from pathlib import Path

MARK = "# patched by mmtriton: ops-conditional"


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision not installed: nothing to patch")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if MARK in text:
        return 0
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        new = (
            f'@(torch.library.register_fake("torchvision::{op}")'
            " if torchvision.extension._has_ops() else (lambda f: f))"
        )
        if old not in text:
            print(f"torchvision patch: {old!r} not found in {path}", file=sys.stderr)
            return 1
        text = text.replace(old, new)
    path.write_text(text + f"\n{MARK}\n")
    print(f"patched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
