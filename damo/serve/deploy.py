"""The application for `serve deploy` / `serve build` (platform/serve/config.yaml).

Ray imports `damo.serve.deploy:app` on the cluster. The config comes from the environment,
which the Serve config's `runtime_env.env_vars` sets:
  DAMO_SERVE_CONFIG      a named config or YAML path (default: default)
  DAMO_SERVE_SET         dotted overrides separated by spaces, e.g. "serve.checkpoint=s3://..."
  DAMO_SERVE_CHECKPOINT  the checkpoint URI (else serve.checkpoint, else `best`)
  DAMO_SERVE_TOKEN       the bearer token (serve.auth_token_env), read by the ingress replica
"""

from __future__ import annotations

import os

from damo.config import load_config
from damo.serve.app import build_app

config = load_config(
    os.environ.get("DAMO_SERVE_CONFIG", "default"), os.environ.get("DAMO_SERVE_SET", "").split()
)
app = build_app(
    config, os.environ.get("DAMO_SERVE_CHECKPOINT") or config.serve.checkpoint or "best"
)
