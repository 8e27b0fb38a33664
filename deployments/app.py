"""The application builder named by the Serve config's ``import_path``.

``serve deploy deployments/serve_config.yaml`` (or ``edgebatch up``) calls
``build_app(args)``; per-deployment settings (replicas, resources, user_config)
come from the config file, so editing it and deploying again reconfigures live.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from app.constants import DETECTOR_DEPLOYMENT
from deployments.detector import DetectorReplica
from deployments.gateway import DetectorGateway

#: every item reaches the replica at once, where the deadline admission decides (app.overload); Serve's
#: own cap would hold them in the caller's queue, out of its sight. It also stays far above
#: max_batch_size x concurrent batches, which would otherwise cap every batch (ray#43288).
Detector = serve.deployment(name=DETECTOR_DEPLOYMENT, max_ongoing_requests=1024)(DetectorReplica)


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The edgebatch Serve application: the HTTP ``Gateway`` in front of one ``Detector`` deployment."""
    return DetectorGateway.bind(Detector.bind())


app = build_app()
