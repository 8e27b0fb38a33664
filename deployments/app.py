"""The application builder named by the Serve config's ``import_path``.

``serve deploy deployments/serve_config.yaml`` (or ``edgebatch up``) calls
``build_app(args)``; per-deployment settings (replicas, resources, user_config)
come from the config file, so editing it and deploying again reconfigures live.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.ingress import DetectorIngress


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The edgebatch Serve application: one ``Detector`` deployment, the replica with its HTTP routes."""
    return DetectorIngress.bind()


app = build_app()
