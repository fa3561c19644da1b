"""The client side of the control plane (an admin's or a user's): one request, one reply, with clear errors when
nobody answers."""

from __future__ import annotations

import time
from typing import Any

import zmq

from conode.cluster import protocol
from conode.cluster.protocol import ProtocolError
from conode.cluster.transport import AuthRefused, ClientSocket
from conode.errors import ConodeError
from coordinator.config import ClientConfig

DEFAULT_TIMEOUT_S = 10.0


class RequestFailed(ConodeError):
    """The coordinator answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdminClient:
    def __init__(self, config: ClientConfig, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self._socket = ClientSocket(context or zmq.Context.instance(), config.endpoint, config.server_public_key,
                                    config.keys)

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, kind: str, expect: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the reply of type *expect*; raise a ConodeError otherwise."""
        payload = protocol.encode(kind, **fields)
        deadline = time.monotonic() + self.timeout_s
        sent = False
        while time.monotonic() < deadline:
            try:
                self._socket.check_refused()
            except AuthRefused:
                raise ConodeError(f"the coordinator at {self.config.endpoint} refused this client's key: it is not "
                                  f"enrolled there (or was removed); an admin adds a person with `coordinator user "
                                  f"add NAME`, or an admin key with `coordinator keys add --state-dir STATE --role "
                                  f"admin -- NAME KEY`") from None
            if self._socket.problem:  # deterministic: waiting longer would only hide it
                raise ConodeError(f"{self._socket.problem} (server_public_key in the client configuration)")
            if not sent:
                sent = self._socket.send(payload)  # False until the connection is up (IMMEDIATE)
            if self._socket.socket.poll(50, zmq.POLLIN):
                try:
                    reply = protocol.decode(self._socket.socket.recv())
                except ProtocolError as exc:
                    raise ConodeError(f"the coordinator sent a malformed reply: {exc}") from None
                if reply["type"] == expect:
                    return reply
                if reply["type"] == "error":
                    raise RequestFailed(reply["code"], reply["message"])
                # anything else is not the answer to this request
        raise ConodeError(f"the coordinator at {self.config.endpoint} did not answer within {self.timeout_s:g} s; "
                          f"is `coordinator serve` running there?")
