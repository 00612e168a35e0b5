"""vLLM's NixlConnector (pull mode), with NIXL's progress thread off by default.

vLLM builds its NIXL agent with the default progress thread, which on these CPU machines keeps a core busy in
every idle engine (docs/vllm-cpu.md). KV moves by READs that the decode side drives (UCX over shared
memory is one-sided), so the producer does not need a progress thread for the data path. Engines load this
module by ``kv_connector_module_path="mmtriton.kv_connector"`` and ``kv_connector="QuietNixlConnector"``; the
patch below runs in the engine's worker process when vLLM imports this module there.
Set ``MMT_NIXL_PROGRESS_THREAD=1`` to keep vLLM's default.
"""

from __future__ import annotations

import functools
import os

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

CONNECTOR_NAME = "QuietNixlConnector"
MODULE_PATH = __name__

if os.environ.get("MMT_NIXL_PROGRESS_THREAD", "0") != "1" and base_worker.nixl_agent_config is not None:
    _agent_config = base_worker.nixl_agent_config

    @functools.wraps(_agent_config)
    def _without_progress_thread(*args, **kwargs):
        kwargs.setdefault("enable_prog_thread", False)
        return _agent_config(*args, **kwargs)

    base_worker.nixl_agent_config = _without_progress_thread


class QuietNixlConnector(NixlPullConnector):
    """NixlConnector as vLLM ships it; only the agent's configuration differs (see above)."""
