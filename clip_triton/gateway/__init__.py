"""OpenAI-compatible HTTP gateway (``clip-triton gateway``); needs the ``gateway`` extra."""

from ..contract import GATEWAY_PORT
from .app import create_app
from .fetch import FetchError, FetchPolicy, fetch_image
from .schemas import ApiError
from .settings import GatewaySettings


def serve_gateway(settings: GatewaySettings, host: str = "127.0.0.1", port: int = GATEWAY_PORT) -> None:
    import uvicorn  # noqa: PLC0415

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", proxy_headers=True)


__all__ = ["ApiError", "FetchError", "FetchPolicy", "GatewaySettings", "create_app", "fetch_image", "serve_gateway"]
