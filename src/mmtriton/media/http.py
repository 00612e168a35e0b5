"""Compatibility names for ``bench/fuzz.py``, which imports them from here. The URL policy lives in
:mod:`mmtriton.media.url_policy`, the client in :mod:`mmtriton.media.http_client`."""

from __future__ import annotations

from yarl import URL

from mmtriton.media import url_policy
from mmtriton.media.policy import MediaPolicy, as_policy
from mmtriton.media.url_policy import Target, address_refusal, shown_url
from mmtriton.settings import Settings

__all__ = ["Target", "address_refusal", "check_url", "shown_url"]


def check_url(url: str | URL, where: str, policy: MediaPolicy | Settings) -> Target:
    """:func:`mmtriton.media.url_policy.check_url`, also taking Settings."""
    return url_policy.check_url(url, where, as_policy(policy))
