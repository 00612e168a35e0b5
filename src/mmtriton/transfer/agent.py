"""NIXL agent plumbing: creating agents (scoped UCX_NET_DEVICES), registering memory, telling disconnects.

NIXL configuration (measured on a 2-core CPU host, two processes, UCX over CMA/shared memory):

* progress thread off: with it on, every idle agent burns ~50% of a core and 16-64 MiB READs run at about
  a third of the bandwidth;
* ``ucx_error_handling_mode=none``: in ``peer`` mode UCX drops the shared-memory transports for active
  messages, so acks go over TCP loopback and a 4 KiB fetch() takes ~1 ms instead of ~50 us. A dead sender
  is still reported at once (nixlRemoteDisconnectError over CMA and over TCP); a hung one hits our timeout;
* no listener thread: the sender's agent metadata (~0.6 KB base64) rides inside each descriptor, so no
  port is opened (NIXL's listener binds 0.0.0.0), there is no extra round trip, and a restarted sender is
  recognised by its new metadata;
* the passive side (the sender) must still make UCX progress to receive acks (and, over TCP, to serve the
  READs at all), so each sender runs one small thread that calls ``get_new_notifs()`` every
  ``poll_interval_s`` while regions are out and every ``idle_poll_interval_s`` when none are;
* UCX_NET_DEVICES defaults to ``lo`` for our agents only (set while the agent is created, then restored),
  unless the user set it or ``net_devices`` says otherwise; shared-memory transports are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

from mmtriton.transfer.errors import TransferError

ACK_PREFIX = b"mmt-ack:"
_LOOPBACK_DEVICES = "lo"

_env_lock = threading.Lock()


@contextlib.contextmanager
def _ucx_net_devices(net_devices: str | None) -> Iterator[None]:
    """Set UCX_NET_DEVICES while one agent's UCX context is created, then restore it.

    UCX reads the variable when the backend (UCX context/worker) is created, so scoping it keeps other UCX
    users in the process (e.g. vLLM's NixlConnector) as the user configured them. Order: explicit argument,
    then the user's own UCX_NET_DEVICES, then loopback.
    """
    with _env_lock:
        old = os.environ.get("UCX_NET_DEVICES")
        value = net_devices if net_devices is not None else (old if old is not None else _LOOPBACK_DEVICES)
        os.environ["UCX_NET_DEVICES"] = value
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("UCX_NET_DEVICES", None)
            else:
                os.environ["UCX_NET_DEVICES"] = old


def _create_agent(name: str, net_devices: str | None, error_handling: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    # Progress and listener threads off (see module docstring); the UCX backend is created explicitly so
    # its error-handling mode can be chosen.
    conf = nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[])
    with _ucx_net_devices(net_devices):
        agent = nixl_agent(name, conf)
        agent.create_backend("UCX", {"ucx_error_handling_mode": error_handling})
    return agent


def _register(agent: Any, buf: torch.Tensor) -> Any:
    # (ptr, nbytes, dev, meta) tuples: registering numpy arrays fails, and NIXL logs rather than raises.
    descs = agent.register_memory([(buf.data_ptr(), buf.numel(), 0, "")], "DRAM")
    if descs is None:
        raise TransferError(f"NIXL agent {agent.name!r}: registering {buf.numel()} bytes of DRAM failed")
    return descs


def _is_disconnect(e: BaseException) -> bool:
    try:
        from nixl._bindings import nixlRemoteDisconnectError
    except ImportError:  # pragma: no cover - the binding module layout changed
        return "DISCONNECT" in str(e)
    return isinstance(e, nixlRemoteDisconnectError)
