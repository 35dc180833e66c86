"""The HTTP client of a provider's calls: httpx's, with each request handed straight to its transport.

``httpx.Client.send`` runs every request through an auth flow (a generator, even with no auth),
the redirect loop with its event hooks, and the cookie jar (a ``urllib.request`` stand-in built
to parse each answer's ``Set-Cookie``). A provider's calls use none of them: the credential is in
the request's own headers (``worker/providers/http.py`` builds it), redirects are not followed,
no hook is set. Skipping them leaves the transport's work: the pool, TLS, the proxy the
environment names for the URL (the client's mounts), timeouts and httpx's exceptions. It was
4 % of a busy worker's CPU (docs/performance.md, twelfth round).

No cookie jar, on purpose: one client makes a provider's calls with every key's credentials, and
a cookie one answer set must not ride along on another key's request.
"""

from __future__ import annotations

from typing import Any

import httpx
from httpx._client import USE_CLIENT_DEFAULT


class ProviderClient(httpx.Client):
    """``send`` goes straight to the transport when nothing of the client's own machinery applies
    (no auth, no redirects to follow, no event hook, not streamed); else it is httpx's own."""

    def send(self, request: httpx.Request, *, stream: bool = False, auth: Any = USE_CLIENT_DEFAULT,
             follow_redirects: Any = USE_CLIENT_DEFAULT) -> httpx.Response:
        if (stream or auth is not USE_CLIENT_DEFAULT or follow_redirects is not USE_CLIENT_DEFAULT
                or self.follow_redirects or self.auth is not None or any(self.event_hooks.values())):
            return super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if "timeout" not in request.extensions:  # as httpx's ``send``: the client's own
            request.extensions = {**request.extensions, "timeout": self.timeout.as_dict()}
        # httpx's routing of a URL to its transport (a proxy's mount or the default pool).
        response = self._transport_for_url(request.url).handle_request(request)
        response.request = request
        try:
            response.read()
        finally:
            response.close()
        return response
