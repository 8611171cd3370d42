"""Connections that cannot be held open for nothing: uvicorn's HTTP protocol with read timeouts.

uvicorn closes a kept-alive connection that stays idle between requests
(`timeout_keep_alive`), but waits without end for a connection's first request, for the rest
of a request's headers and for a body that stops coming. Here each of those has a deadline:

- headers: a request's headers (from its first byte, or from the connection's start) must be
  complete within `header_timeout_s`, however slowly they trickle in (slowloris);
- body: while a request body is incomplete, each piece must follow the last within
  `body_timeout_s`.

When a deadline passes with no response started, the client gets `408 Request Timeout` and
the connection closes (the route waiting for the body sees a disconnect). Nothing is timed
while the app works on a complete request: a long generation is not a stalled client.

    config = server_config(app, host="127.0.0.1", port=8080)   # uvicorn.Config
    uvicorn.Server(config).run()
"""
from __future__ import annotations

HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5          # uvicorn's default, stated
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                    b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n")


def guarded_protocol(header_timeout_s: float = HEADER_TIMEOUT_S,
                     body_timeout_s: float = BODY_TIMEOUT_S):
    """uvicorn's HTTP protocol class (httptools, else h11) with the deadlines above."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTPProtocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline_handle = None
            self._arm(header_timeout_s)  # the first request's headers

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes):
            super().data_received(data)
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if cycle.more_body:  # the body is coming: the next piece has its deadline
                    self._arm(body_timeout_s)
                else:  # a whole request: the app's time, not the client's
                    self._disarm()
            elif self._deadline_handle is None:  # the first bytes of the next request's headers
                self._arm(header_timeout_s)

        def on_response_complete(self):
            self._disarm()  # idle again: uvicorn's keep-alive timer takes over
            super().on_response_complete()

        def _arm(self, seconds: float):
            self._disarm()
            self._deadline_handle = self.loop.call_at(self.loop.time() + seconds, self._expired)

        def _disarm(self):
            handle = getattr(self, "_deadline_handle", None)
            if handle is not None:
                handle.cancel()
                self._deadline_handle = None

        def _expired(self):
            self._deadline_handle = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                return  # the request became whole meanwhile
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    return GuardedHTTPProtocol


def server_config(app, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S,
                  body_timeout_s: float = BODY_TIMEOUT_S, log_level: str = "warning"):
    """The uvicorn.Config `homellm serve` runs: the guarded protocol, keep-alive 5 s."""
    import uvicorn
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=guarded_protocol(header_timeout_s, body_timeout_s),
                          timeout_keep_alive=KEEP_ALIVE_S)

