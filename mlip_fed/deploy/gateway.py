"""The SuperLink's only public face: a TLS reverse proxy that passes the Fleet API to the sites and nothing else.

Flower 1.42's ``flower-superlink`` serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr stop``,
``flwr supernode register``/``list``) and the Runtime API (the ServerApp's task API) from one HTTP app on one
``--host``/``--port``; it has no option to bind them apart (``--control-api-address`` is deprecated and only
used by a legacy gRPC server), and the open-source Control API authenticates no account (its auth plugin is a
no-op unless Flower's OIDC plugin is installed). Whoever reaches that port with the public CA certificate can
register a node or start a run. So the SuperLink listens on 127.0.0.1 only
(``mlip_fed.deploy.superlink.superlink_command``) and this gateway listens where the sites reach it:

- ``POST`` to the ten Fleet routes a SuperNode with a node key calls (``FLEET_ROUTES``) and ``GET``/``HEAD
  /health`` are forwarded to the SuperLink over TLS (verified against the federation's CA), body and headers
  unchanged, so node authentication (the SuperNode's signed headers) is still checked by the SuperLink;
- everything else (``/v1/control/*``, ``/v1/runtime/*``, Fleet self-registration, ``/docs``, other methods) is
  answered ``403`` here and never reaches the SuperLink; each refusal is logged with the caller's address.

Paths are matched exactly (after URL decoding) and the upstream request is built from the matched path, so no
spelling of a path (``..``, ``%2F``, a query string) can reach another route.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

#: What a SuperNode started with ``--auth-supernode-private-key`` calls (flwr/supernode/fleet_http_client.py and
#: fleet_http_connection.py: it never calls register-node/unregister-node, which the SuperLink refuses anyway when
#: node authentication is on: nodes are registered by the operator through the Control API).
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node",
        "deactivate-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
HEALTH_PATH = "/health"
#: Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself.
_NOT_FORWARDED = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"host",
    b"content-length",
}
#: Largest request body forwarded (a Fleet object push carries one model tensor at most).
MAX_BODY_BYTES = 1 << 30

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether the gateway forwards ``method path``: the Fleet routes (POST) and the health check (GET/HEAD)."""
    if path in FLEET_ROUTES:
        return method == "POST"
    return path == HEALTH_PATH and method in ("GET", "HEAD")


def _log(line: str) -> None:
    print(f"fleet-gateway: {line}", file=sys.stderr, flush=True)


class FleetGateway:
    """ASGI app forwarding ``allowed`` requests to ``upstream`` (``https://127.0.0.1:<port>``), refusing the rest."""

    def __init__(self, upstream: str, ca_cert: Path, timeout_s: float = 120.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_cert = Path(ca_cert)
        self.timeout_s = timeout_s
        self._client: Any = None

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            verify = ssl.create_default_context(cafile=str(self.ca_cert))
            self._client = httpx.AsyncClient(verify=verify, timeout=self.timeout_s, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":  # websockets: nothing of Flower's uses them here
            return
        method, path = scope["method"], scope["path"]
        if not allowed(method, path):
            client = scope.get("client") or ("?", 0)
            _log(f"refused {method} {path} from {client[0]}:{client[1]} (only the Fleet API is exposed here)")
            await _respond(send, 403, b"forbidden: this address serves only the Flower Fleet API\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                await _respond(send, 413, b"request body too large\n")
                return
            if not message.get("more_body", False):
                break
        await self._forward(method, path, scope["headers"], bytes(body), send)

    async def _forward(self, method: str, path: str, headers: list, body: bytes, send: Send) -> None:
        import httpx

        client = self._http()
        forwarded = [(k, v) for k, v in headers if k.lower() not in _NOT_FORWARDED]
        request = client.build_request(method, self.upstream + path, headers=forwarded, content=body)
        try:
            response = await client.send(request, stream=True)
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.HTTPError as err:
            _log(f"SuperLink unreachable for {method} {path}: {type(err).__name__}: {err}")
            await _respond(send, 502, b"bad gateway: the SuperLink did not answer\n")
            return
        out = [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_FORWARDED]
        out.append((b"content-length", str(len(raw)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else raw})


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve(
    app: FleetGateway,
    host: str,
    port: int,
    certfile: Path,
    keyfile: Path,
    stop_when: Callable[[], bool] | None = None,
) -> None:
    """Serve ``app`` over TLS on ``host:port`` until SIGINT/SIGTERM or ``stop_when()`` (polled twice a second)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        proxy_headers=False,  # the gateway is the first hop: log the real peer, never a header's claim
        server_header=False,
        access_log=True,
        log_level="info",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)

    async def watch() -> None:
        while not server.should_exit:
            if stop_when is not None and stop_when():
                server.should_exit = True
                return
            await asyncio.sleep(0.5)

    async def run() -> None:
        watcher = asyncio.create_task(watch())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    asyncio.run(run())  # uvicorn raises SystemExit(1) when it cannot bind: the caller's ``finally`` still runs
