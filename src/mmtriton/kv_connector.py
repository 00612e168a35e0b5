"""vLLM's NixlConnector (pull mode), with NIXL's progress thread off by default.

vLLM builds its NIXL agent with the default progress thread, which on these CPU machines keeps a core busy in
every idle engine (docs/vllm-cpu.md). KV moves by READs that the decode side drives (UCX over shared
memory is one-sided), so the producer does not need a progress thread for the data path. Engines load this
module by ``kv_connector_module_path="mmtriton.kv_connector"`` and ``kv_connector="QuietNixlConnector"``; the
patch below runs in the engine's worker process when vLLM imports this module there.
Set ``MMT_NIXL_PROGRESS_THREAD=1`` to keep vLLM's default.

Also in the worker: vLLM 0.32's NIXL connector worker, on CPU, moves the thread that builds it to the last core of
each NUMA node (``os.sched_setaffinity(0, ...)`` in ``NixlBaseConnectorWorker.__init__``, "reserve different
cores for start_load_kv() from model_forward()"). That thread is the worker's main thread, which is also OpenMP's
master thread, the one that computes: with one core per engine both engines then computed on the last core and
the first stayed idle (seen on 2 cores: prefill's worker bound to core 0 by VLLM_CPU_OMP_THREADS_BIND, its main
thread on core 1 beside decode's). The patch puts the thread back where vLLM's OpenMP setup had put it.

One addition on the decode side: a request whose prompt ends with tokens prefill never computed (the first token,
which prefill sampled and the client already has: ``TOKENS_AFTER_PREFILL`` in its kv_transfer_params) loads only
the prompt's KV from prefill, and decode computes those last tokens itself (see KvOnlyForPrefix).
"""

from __future__ import annotations

import functools
import logging
import os

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

from mmtriton.wire import TOKENS_AFTER_PREFILL

CONNECTOR_NAME = "QuietNixlConnector"
MODULE_PATH = __name__

if os.environ.get("MMT_NIXL_PROGRESS_THREAD", "0") != "1" and base_worker.nixl_agent_config is not None:
    _agent_config = base_worker.nixl_agent_config

    @functools.wraps(_agent_config)
    def _without_progress_thread(*args, **kwargs):
        kwargs.setdefault("enable_prog_thread", False)
        return _agent_config(*args, **kwargs)

    base_worker.nixl_agent_config = _without_progress_thread

log = logging.getLogger("vllm.mmtriton.kv_connector")  # under "vllm": printed by vLLM's own log handler
_worker_init = base_worker.NixlBaseConnectorWorker.__init__


@functools.wraps(_worker_init)
def _init_keeping_the_compute_core(self, *args, **kwargs):
    cores = os.sched_getaffinity(0)
    try:
        _worker_init(self, *args, **kwargs)
    finally:
        if (moved := os.sched_getaffinity(0)) != cores:
            os.sched_setaffinity(0, cores)
            log.info("mmtriton: NIXL's connector moved the worker's compute thread to cores %s; back on %s "
                     "(VLLM_CPU_OMP_THREADS_BIND)", sorted(moved), sorted(cores))


base_worker.NixlBaseConnectorWorker.__init__ = _init_keeping_the_compute_core


class QuietNixlConnector(NixlPullConnector):
    """NixlConnector as vLLM ships it, but for the agent's configuration (see above) and KV-only-for-the-prefix."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """KvOnlyForPrefix: vLLM's connector loads KV for the whole prompt of a remote-prefill request. When that
        prompt is prefill's prompt plus the token prefill sampled, the last token has no KV on the prefill side
        (and at a block boundary no block: the pull would see more local blocks than remote ones). Load one token
        less; vLLM's scheduler then computes the last token here, as for any partial prefix hit."""
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        params = request.kv_transfer_params or {}
        after = int(params.get(TOKENS_AFTER_PREFILL) or 0)
        if not after or not params.get("do_remote_prefill") or not count:
            return count, load_async
        count = max(0, count - after)
        return count, load_async and count > 0
