"""Media errors that are not the client's fault.

A client error (a bad URL, a URL the policy refuses, an upstream 4xx, undecodable bytes) is
:class:`mmtriton.protocol.InvalidInput`. :class:`MediaUnavailable` is for an upstream that may well answer
next time: a 5xx or 429 status, a timeout, a refused or dropped connection, a temporary DNS failure. Serving code
should answer it as UNAVAILABLE (HTTP 503), so clients retry, rather than 400.
"""

from __future__ import annotations


class MediaUnavailable(RuntimeError):
    """A transient failure fetching media; the message names the item (``where``) and the URL, as InvalidInput's do."""
