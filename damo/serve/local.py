"""Run the application on this machine: `damo serve`, the tests and the benchmarks."""

from __future__ import annotations

from pydantic import SecretStr

from damo.config import DamoConfig
from damo.storage.s3server import free_ports


def start(cfg: DamoConfig, checkpoint: str, token: SecretStr | None = None) -> str:
    """Start Serve's HTTP proxy and deploy the app on the connected Ray cluster; its URL."""
    from ray import serve

    from damo.serve.app import build_app

    port = cfg.serve.port or free_ports(1, cfg.serve.host)[0]
    app = build_app(cfg, checkpoint, token)
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(app, name=cfg.serve.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{port}/"
