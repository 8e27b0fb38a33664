"""The application builder named by the Serve config's ``import_path``.

``serve deploy deployments/serve_config.yaml`` (or ``edgebatch up``) calls
``build_app(args)``; per-deployment settings (replicas, resources, user_config)
come from the config file, so editing it and deploying again reconfigures live.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.detector import DetectorDeployment


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Build the edgebatch Serve application (the detector is its HTTP ingress)."""
    return DetectorDeployment.bind()


app = build_app()
