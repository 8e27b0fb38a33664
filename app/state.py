"""The project-local state folder: registry database, artifacts, caches, logs.

Default ``<cwd>/.edgebatch``; ``EDGEBATCH_HOME`` moves it. Passed around as a
value (``StateDir``), never held globally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def default(cls) -> StateDir:
        return cls(Path(os.environ.get("EDGEBATCH_HOME", Path.cwd() / ".edgebatch")).resolve())

    def ensure(self) -> StateDir:
        for p in (self.root, self.artifacts, self.cache, self.logs, self.videos):
            p.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def instance_file(self) -> Path:
        """What `edgebatch up` recorded: cluster address, ports, HTTP address (``app.instance``)."""
        return self.root / "instance.json"

    @property
    def ray_token_file(self) -> Path:
        """The Ray authentication token of this instance's cluster (mode 0600)."""
        return self.root / "ray" / "auth_token"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"
