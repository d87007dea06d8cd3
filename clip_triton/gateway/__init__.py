"""OpenAI-compatible HTTP gateway (``clip-triton gateway``); needs the ``gateway`` extra."""

from ..contract import GATEWAY_PORT
from .app import create_app
from .fetch import FetchError, FetchPolicy, fetch_image
from .schemas import ApiError
from .settings import GatewaySettings

# How long an idle keep-alive connection stays open. uvicorn's default (5 s) equals the idle expiry of
# httpx (the openai package's transport): a client reusing a connection at 5 s met the server closing
# it and failed with "Connection error" (seen under load, tests/test_mixed_clients.py). Longer than the
# clients' expiry and than common load balancers' idle timeouts (60 s), so the client side closes first.
KEEP_ALIVE_S = 75


def server_config(app, host: str = "127.0.0.1", port: int = GATEWAY_PORT, **options):
    """The uvicorn settings the gateway runs under (``serve_gateway``; the tests' live gateway too)."""
    import uvicorn  # noqa: PLC0415

    return uvicorn.Config(app, host=host, port=port, timeout_keep_alive=KEEP_ALIVE_S, **options)


def serve_gateway(settings: GatewaySettings, host: str = "127.0.0.1", port: int = GATEWAY_PORT) -> None:
    import uvicorn  # noqa: PLC0415

    uvicorn.Server(server_config(create_app(settings), host, port, log_level="info", proxy_headers=True)).run()


__all__ = [
    "KEEP_ALIVE_S",
    "ApiError",
    "FetchError",
    "FetchPolicy",
    "GatewaySettings",
    "create_app",
    "fetch_image",
    "serve_gateway",
    "server_config",
]
