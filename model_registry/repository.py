"""The model repository: MLflow's model registry holding one variant per batch size and backend.

Layout in MLflow (nothing beside it):
- a registered model per network (``NAME``), a model version per build;
- the version's files are the artifacts of one MLflow run in the experiment
  ``edgebatch-model-repository``, under ``variants/<backend>-b<batch>/<file>``
  (plus ``variants/manifest.json``); the version's ``source`` points there;
- per variant a version tag ``edgebatch.variant.<backend>.b<batch>`` holding
  JSON (file, sha256, size, input shape, precision, builder tags), so listing
  variants is one registry call and every download can be verified;
- aliases (``production``) are MLflow aliases; deployments that use a version
  set ``edgebatch.in_use.<deployment>`` tags on it.

Default store: SQLite plus an artifact folder in the project's state folder.
``MLFLOW_TRACKING_URI`` (or ``tracking_uri=``) points every node at a shared
``mlflow server --serve-artifacts`` instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from app.constants import valid_model_name
from app.engines.base import ModelVariant
from app.errors import BadRequest, EdgebatchError, NotFound, Unavailable
from app.state import StateDir
from model_registry.builders import BACKENDS, VariantFile, file_sha256
from model_registry.cache import IntegrityError, VariantCache, check_record

log = logging.getLogger(__name__)

EXPERIMENT = "edgebatch-model-repository"
VARIANT_TAG = "edgebatch.variant."
IN_USE_TAG = "edgebatch.in_use."
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_SERVER_HINT = (
    "start one with `mlflow server --host 0.0.0.0 --port 5000 "
    "--backend-store-uri sqlite:////srv/edgebatch/mlflow.db "
    "--artifacts-destination /srv/edgebatch/mlartifacts --serve-artifacts` and set "
    "MLFLOW_TRACKING_URI=http://<head-node>:5000 on every node, or unset MLFLOW_TRACKING_URI "
    "to use the local SQLite store"
)


def _quiet_mlflow() -> None:
    """MLflow's telemetry and progress bars are noise in a serving process; the user may override."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries our output


def validate_name(name: str, what: str = "model name") -> str:
    """Names become registry keys, tag keys and cache folders: keep them to a safe charset."""
    if not isinstance(name, str) or not valid_model_name(name):
        raise BadRequest(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit, with no '/', '\\' or '..' (e.g. yolov8n-320)"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or alias.lower() == "latest" \
            or re.fullmatch(r"[vV]\d+", alias):
        raise BadRequest(
            f"alias {alias!r} is not allowed: use a word of letters, digits, '_' or '-' starting with a "
            "letter, not 'latest' and not v<number> (e.g. production, canary)"
        )
    return alias


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``"NAME"`` -> (NAME, None, None); ``"NAME@alias"`` -> alias; ``"NAME/3"`` -> version."""
    name, version, alias = ref, None, None
    if "@" in ref:
        name, _, alias = ref.partition("@")
        validate_alias(alias)
    elif "/" in ref:
        name, _, version = ref.partition("/")
        if not version.isdigit() or int(version) < 1:
            raise BadRequest(f"model reference {ref!r}: the version after '/' must be a number, e.g. {name}/3")
        version = str(int(version))
    return validate_name(name), version, alias


def _variant_key(backend: str, batch_size: int) -> str:
    return f"{VARIANT_TAG}{backend}.b{batch_size}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VersionInfo:
    """One model version as the CLI and deployments see it."""

    name: str
    version: str
    created: str
    description: str
    aliases: tuple[str, ...]
    variants: tuple[ModelVariant, ...]
    in_use: dict[str, str] = field(default_factory=dict)  # deployment -> since (UTC)
    tags: dict[str, str] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class ModelSummary:
    name: str
    description: str
    latest_version: str | None
    version_count: int
    aliases: dict[str, str]


@dataclass(frozen=True)
class ModelDescription:
    name: str
    description: str
    aliases: dict[str, str]
    versions: tuple[VersionInfo, ...]


def _variant_record(variant: VariantFile) -> dict:
    return {
        "backend": variant.backend,
        "batch_size": variant.batch_size,
        "file": f"{variant.backend}-b{variant.batch_size}/{variant.path.name}",
        "sha256": variant.sha256,
        "size_bytes": variant.size_bytes,
        "input_shape": list(variant.input_shape),
        "precision": variant.precision,
        "tags": dict(variant.tags),
    }


def _records_from_tags(tags: dict[str, str], source: str, where: str = "the registry's tags") -> list[dict]:
    """Variant records from a version's tags, each validated (hash, file name) before it is used."""
    records = []
    for key, value in tags.items():
        if key.startswith(VARIANT_TAG):
            try:
                record = json.loads(value)
            except ValueError:
                record = {}
            if not isinstance(record, dict):
                record = {}
            check_record(record, f"{where} ({key})")
            record["artifact_root"] = source
            records.append(record)
    return sorted(records, key=lambda r: (r["backend"], r["batch_size"]))


def _to_variant(name: str, version: str, record: dict, path: Path | None = None) -> ModelVariant:
    return ModelVariant(
        name=name,
        version=version,
        backend=record["backend"],
        batch_size=int(record["batch_size"]),
        path=path if path is not None else Path(record["file"]),
        input_shape=tuple(record["input_shape"]),
        precision=record["precision"],
        sha256=record["sha256"],
        size_bytes=int(record["size_bytes"]),
        tags={**record.get("tags", {}), "artifact": f"{record.get('artifact_root', '')}/{record['file']}"},
    )


def _summarise(records: list[dict]) -> str:
    by_backend: dict[str, list[str]] = {}
    for r in records:
        by_backend.setdefault(r["backend"], []).append(str(r["batch_size"]))
    return "; ".join(f"{b} batch {','.join(sizes)}" for b, sizes in by_backend.items()) or "none"


def _is_transient_write_error(exc: Exception) -> bool:
    """SQLite lock contention and version-number races between concurrent builds."""
    text = str(exc).lower()
    return any(s in text for s in ("database is locked", "unique constraint", "integrityerror",
                                   "already exists", "deadlock"))


class ModelRepository:
    """Versioned models with one variant per (backend, batch size), on MLflow's registry."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        state: StateDir | None = None,
        cache_dir: Path | None = None,
        reader: bool = False,
    ) -> None:
        """``reader``: this process only reads models (a replica): a SQLite store that does not exist
        here is an error naming why, not a new empty registry (a SQLite file serves one host only)."""
        _quiet_mlflow()
        self.state = state or StateDir.default()
        self.reader = reader
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or self.state.tracking_uri
        self.cache = VariantCache(Path(cache_dir) if cache_dir else self.state.cache / "variants",
                                  self.tracking_uri)
        self._client = None
        self._experiment_id: str | None = None
        self._init_lock = threading.Lock()

    @classmethod
    def from_env(cls, state: StateDir | None = None) -> ModelRepository:
        """``MLFLOW_TRACKING_URI`` if set, else SQLite in ``$EDGEBATCH_HOME`` (or ``./.edgebatch``)."""
        return cls(os.environ.get("MLFLOW_TRACKING_URI") or None, state=state or StateDir.default())

    # ---------------------------------------------------------------- connection
    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def host_local(self) -> bool:
        """Whether only this host can reach the store: a SQLite or file store, or a loopback server."""
        from urllib.parse import urlparse

        if not self.is_remote:
            return True
        host = urlparse(self.tracking_uri).hostname or ""
        return host in ("localhost", "::1") or host.startswith("127.")

    @property
    def _sqlite_path(self) -> Path | None:
        prefix = "sqlite:///"
        return Path(self.tracking_uri[len(prefix):]) if self.tracking_uri.startswith(prefix) else None

    def _unavailable(self, reason: object) -> Unavailable:
        return Unavailable(f"MLflow model registry at {self.tracking_uri} is not reachable ({reason}); {_SERVER_HINT}")

    def _probe(self, timeout: float = 2.0) -> str | None:
        """``None`` when the server answers ``/health``, else the reason; local stores always answer."""
        if not self.is_remote:
            return None
        import requests

        try:
            response = requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout)
        except requests.Timeout:
            return f"no answer from /health within {timeout:g} s"
        except requests.ConnectionError:
            return "connection refused or host unreachable"
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if response.status_code == 200 else f"/health answered HTTP {response.status_code}"

    @contextlib.contextmanager
    def node_lock(self, path: Path) -> Iterator[None]:
        """Serialise first-use work (SQLite migrations, demo registration) among processes of one node."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def client(self):
        """The ``MlflowClient``, created on first use; a SQLite store is migrated under a file lock."""
        if self._client is not None:
            return self._client
        with self._init_lock:
            if self._client is not None:
                return self._client
            reason = self._probe(timeout=3.0)
            if reason:
                raise self._unavailable(reason)
            from mlflow import MlflowClient

            db = self._sqlite_path
            if db is not None and self.reader and not db.exists():
                raise Unavailable(
                    f"the model registry {self.tracking_uri} does not exist on this node ({socket.gethostname()}): a "
                    "SQLite registry serves only the host it is on; run an MLflow server on the head (cluster.yaml "
                    "starts one) and `edgebatch up` with MLFLOW_TRACKING_URI=http://<head>:5000")
            try:
                if db is not None:
                    with self.node_lock(db.with_name(db.name + ".lock")):
                        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                        client.search_experiments(max_results=1)
                        client.search_registered_models(max_results=1)
                else:
                    client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                    client.search_registered_models(max_results=1)
            except Exception as exc:  # any error: any failure here means "registry not usable"
                raise self._unavailable(exc) from None
            self._client = client
        return self._client

    def check_available(self) -> None:
        """Raise ``Unavailable`` naming the URI and the fix; call at start-up."""
        reason = self._probe(timeout=3.0)
        if reason:
            raise self._unavailable(reason)
        self.client  # noqa: B018 - opens (and migrates) the store

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """MLflow and network errors -> our errors, naming what was being done."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except EdgebatchError:
            raise
        except MlflowException as exc:
            code = getattr(exc, "error_code", "")
            if code == "RESOURCE_DOES_NOT_EXIST":
                raise NotFound(f"{what}: {exc.message}") from None
            if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
                raise BadRequest(f"{what}: {exc.message}") from None
            if self._probe() is not None:
                raise self._unavailable(exc) from None
            raise
        except OSError as exc:  # includes requests' ConnectionError
            if self._probe() is not None:
                raise self._unavailable(exc) from None
            raise

    def _retry_write(self, what: str, fn, attempts: int = 8):
        """Retry a registry write that lost a race (SQLite lock, version number taken)."""
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as exc:  # any error: filtered just below
                if attempt == attempts - 1 or not _is_transient_write_error(exc):
                    raise
                log.info("%s lost a race (%s); retrying", what, exc)
                time.sleep(random.uniform(0.02, 0.05 * (2 ** attempt)))  # back-off, not synchronisation
        raise AssertionError("unreachable")

    def _experiment(self) -> str:
        """The experiment holding the build runs; in SQLite mode its artifacts go to the state folder."""
        if self._experiment_id:
            return self._experiment_id
        from mlflow.exceptions import MlflowException

        client = self.client
        with self._errors(f"opening experiment {EXPERIMENT}"):
            found = client.get_experiment_by_name(EXPERIMENT)
            if found is None:
                db = self._sqlite_path
                location = (db.parent / "mlartifacts").as_uri() if db is not None else None
                try:
                    self._experiment_id = client.create_experiment(EXPERIMENT, artifact_location=location)
                except MlflowException as exc:
                    if not _is_transient_write_error(exc):
                        raise
                    self._experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    # ---------------------------------------------------------------- writes
    def register_version(
        self,
        name: str,
        variants: list[VariantFile],
        *,
        description: str = "",
        progress: bool = False,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Upload the variants as one run and register them as one new version; return it.

        Concurrent builds of one model each get their own version: MLflow picks
        the number inside a transaction, and a lost race is retried.
        """
        from mlflow.exceptions import MlflowException
        from tqdm import tqdm

        validate_name(name)
        if not variants:
            raise BadRequest(f"no variants to register for {name}; build at least one batch size")
        seen: set[tuple[str, int]] = set()
        for v in variants:
            if v.backend not in BACKENDS:
                raise BadRequest(f"variant {v.path} has unknown backend {v.backend!r}; use one of {', '.join(BACKENDS)}")
            if (v.backend, v.batch_size) in seen:
                raise BadRequest(f"two {v.backend} variants for batch {v.batch_size}; give one per batch size")
            seen.add((v.backend, v.batch_size))
            if not Path(v.path).is_file():
                raise BadRequest(f"variant file {v.path} does not exist")
            if file_sha256(Path(v.path)) != v.sha256:
                raise BadRequest(f"variant file {v.path} changed after it was built (sha256 differs); build again")
        client = self.client
        experiment_id = self._experiment()
        with self._errors(f"creating registered model {name}"):
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" and not _is_transient_write_error(exc):
                    raise
        with self._errors(f"uploading variants of {name}"):
            run = self._retry_write("create_run", lambda: client.create_run(
                experiment_id, run_name=f"{name}-build", tags={"edgebatch.model": name}))
            run_id = run.info.run_id
            try:
                with tqdm(total=sum(v.size_bytes for v in variants), unit="B", unit_scale=True,
                          desc=f"registering {name}", disable=not progress, file=sys.stderr) as bar:
                    for v in variants:
                        self._retry_write("log_artifact", lambda v=v: client.log_artifact(
                            run_id, str(v.path), artifact_path=f"variants/{v.backend}-b{v.batch_size}"))
                        bar.update(v.size_bytes)
                records = [_variant_record(v) for v in variants]
                for record in records:
                    if len(json.dumps(record, sort_keys=True)) > 7900:  # MLflow tag values stop at 8000
                        raise BadRequest(
                            f"the metadata of {name} {record['backend']} batch {record['batch_size']} is over "
                            "7900 characters (long labels or tags?); keep each variant's tags shorter")
                client.log_dict(run_id, {"name": name, "variants": records}, "variants/manifest.json")
                version_tags = {_variant_key(r["backend"], r["batch_size"]): json.dumps(r, sort_keys=True)
                                for r in records}
                version_tags["edgebatch.variants"] = _summarise(records)
                version_tags.update(tags or {})
                version = self._retry_write("create_model_version", lambda: client.create_model_version(
                    name, source=f"{run.info.artifact_uri}/variants", run_id=run_id,
                    tags=version_tags, description=description or None,
                    await_creation_for=0))
            except BaseException:
                with contextlib.suppress(Exception):
                    client.set_terminated(run_id, "FAILED")
                raise
            self._retry_write("set_terminated", lambda: client.set_terminated(run_id, "FINISHED"))
        return str(version.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``; deployments following the alias roll to it."""
        validate_name(name)
        validate_alias(alias)
        version = self._version_or_raise(name, str(version))
        with self._errors(f"setting alias {name}@{alias}"):
            self.client.set_registered_model_alias(name, alias, version)
        self.cache.remember_alias(name, alias, version)

    def mark_in_use(self, name: str, version: str, deployment: str) -> None:
        """Record that ``deployment`` serves this version (shown by ``models show``)."""
        validate_name(deployment, "deployment name")
        version = self._version_or_raise(validate_name(name), str(version))
        with self._errors(f"marking {name}/{version} in use"):
            self.client.set_model_version_tag(name, version, IN_USE_TAG + deployment, _now())

    def release(self, name: str, version: str, deployment: str) -> None:
        """Forget that ``deployment`` serves this version (after it rolled to another)."""
        validate_name(deployment, "deployment name")
        from mlflow.exceptions import MlflowException

        with self._errors(f"releasing {name}/{version}"), contextlib.suppress(MlflowException):
            self.client.delete_model_version_tag(validate_name(name), str(version), IN_USE_TAG + deployment)

    # ---------------------------------------------------------------- reads
    def _version_or_raise(self, name: str, version: str) -> str:
        if not str(version).isdigit():
            raise BadRequest(f"version {version!r} of {name} must be a number, e.g. 3")
        self._model_version(name, str(int(version)))
        return str(int(version))

    def _model_version(self, name: str, version: str):
        from mlflow.exceptions import MlflowException

        try:
            with self._errors(f"reading {name}/{version}"):
                return self.client.get_model_version(name, version)
        except (NotFound, BadRequest):
            pass
        except MlflowException:
            pass
        existing = self._version_numbers(name)
        raise NotFound(
            f"model {name} has no version {version}; versions: {', '.join(existing) or 'none'} "
            "(see `edgebatch models list " + name + "`)"
        )

    def _version_numbers(self, name: str) -> list[str]:
        with self._errors(f"listing versions of {name}"):
            found = self.client.search_model_versions(f"name='{name}'")
        return sorted((str(v.version) for v in found), key=int)

    def resolve(self, name: str, *, version: str | None = None, alias: str | None = None) -> str:
        """The version number for a version, an alias (one registry call) or, with neither, the latest."""
        validate_name(name)
        if version is not None and alias is not None:
            raise BadRequest(f"give a version or an alias of {name}, not both")
        if version is not None:
            if not str(version).isdigit():
                raise BadRequest(f"version {version!r} of {name} must be a number, e.g. 3")
            return str(int(version))
        from mlflow.exceptions import MlflowException

        reason = self._probe()  # a down server fails here in milliseconds, not after MLflow's retries
        if reason:
            raise self._unavailable(reason)
        client = self.client
        if alias is not None:
            validate_alias(alias)
            try:
                with self._errors(f"resolving {name}@{alias}"):
                    resolved = str(client.get_model_version_by_alias(name, alias).version)
            except (NotFound, BadRequest, MlflowException):
                aliases = self._aliases(name)
                raise NotFound(
                    f"model {name} has no alias {alias!r} (aliases: "
                    f"{', '.join(f'{a}->{v}' for a, v in aliases.items()) or 'none'}); set it with "
                    f"`edgebatch models promote {name} VERSION --alias {alias}`"
                ) from None
            self.cache.remember_alias(name, alias, resolved)
            return resolved
        with self._errors(f"finding the latest version of {name}"):
            found = client.search_model_versions(f"name='{name}'", max_results=1,
                                                 order_by=["version_number DESC"])
        if not found:
            raise NotFound(f"model {name} has no versions; register one with `edgebatch models build SOURCE.onnx --name {name}`")
        return str(found[0].version)

    def _registered_model(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            with self._errors(f"reading model {name}"):
                return self.client.get_registered_model(name)
        except (NotFound, MlflowException):
            raise NotFound(
                f"model {name} is not in the registry at {self.tracking_uri}; register it with "
                f"`edgebatch models build SOURCE.onnx --name {name}` (see `edgebatch models list`)"
            ) from None

    def _aliases(self, name: str) -> dict[str, str]:
        return {alias: str(v) for alias, v in (self._registered_model(name).aliases or {}).items()}

    def _records(self, name: str, version: str) -> list[dict]:
        """Variant metadata of a version from the registry whenever it answers: the node's index
        (editable by anyone on the node) stands in only while the registry is unreachable, so it
        can never override a hash the registry recorded."""
        reason = self._probe()
        if not reason:
            try:
                mv = self._model_version(name, version)
            except Unavailable as exc:
                reason = exc.message
            else:
                records = _records_from_tags(dict(mv.tags or {}), mv.source, f"the registry's tags of {name}/{version}")
                self.cache.remember_version(name, version, records)
                return records
        records = self.cache.version_variants(name, version)
        if records is None:
            raise self._unavailable(reason)
        return records

    def list_variants(self, name: str, *, version: str | None = None, alias: str | None = None) -> list[ModelVariant]:
        """Variant metadata of a version without downloading (``path`` is the file inside the version)."""
        resolved = self.resolve(name, version=version, alias=alias)
        return [_to_variant(name, resolved, r) for r in self._records(name, resolved)]

    def find(
        self,
        name: str,
        *,
        version: str | None = None,
        alias: str | None = None,
        batch_size: int,
        backend: str = "onnx",
    ) -> ModelVariant:
        """A local, sha256-verified file of one variant, downloaded once per node.

        When the registry is unreachable, a verified copy already in this node's
        cache is served (the last known alias target), so running detectors
        keep going; only a variant this node never fetched is then unavailable.
        """
        validate_name(name)
        if backend not in BACKENDS:
            raise BadRequest(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        offline_reason = None
        try:  # each registry call below is preceded by a fast /health probe on a remote registry
            resolved = self.resolve(name, version=version, alias=alias)
            records = self._records(name, resolved)
        except IntegrityError:
            raise
        except Unavailable as exc:
            offline_reason = exc.message
        if offline_reason is not None:
            resolved, records = self._offline_records(name, version, alias, offline_reason)
        wanted = [r for r in records if r["backend"] == backend and int(r["batch_size"]) == int(batch_size)]
        if not wanted:
            raise NotFound(
                f"model {name} version {resolved} has no {backend} variant for batch {batch_size}; "
                f"variants that exist: {_summarise(records)}; build it with `edgebatch models build "
                f"SOURCE --name {name} --batch-sizes {batch_size} --backend {backend}`"
            )
        record = wanted[0]
        file_name = Path(record["file"]).name
        path = self.cache.get(record["sha256"], file_name, record["size_bytes"])
        if path is None:
            offline_reason = offline_reason or self._probe()
            if offline_reason is not None:
                raise Unavailable(
                    f"{name}/{resolved} {backend} batch {batch_size} is not cached on this node and the "
                    f"registry at {self.tracking_uri} is unreachable ({offline_reason}); {_SERVER_HINT}"
                )
            artifact = f"{record['artifact_root']}/{record['file']}"
            path = self.cache.install(record["sha256"], file_name, lambda folder: self._download(artifact, folder),
                                      source=artifact)
        return _to_variant(name, resolved, record, path)

    def _download(self, artifact_uri: str, folder: Path) -> Path:
        import mlflow.artifacts

        with self._errors(f"downloading {artifact_uri}"):
            return Path(mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=str(folder), tracking_uri=self.tracking_uri))

    def _offline_records(self, name: str, version: str | None, alias: str | None,
                         reason: str) -> tuple[str, list[dict]]:
        if version is not None:
            resolved: str | None = str(int(version))
        elif alias is not None:
            resolved = self.cache.alias_version(name, alias)
        else:
            known = self.cache.known_versions(name)
            resolved = known[-1] if known else None
        records = self.cache.version_variants(name, resolved) if resolved else None
        if records is None:
            ref = f"{name}@{alias}" if alias else f"{name}/{version}" if version else name
            raise Unavailable(
                f"the registry at {self.tracking_uri} is unreachable ({reason}) and this node has no "
                f"cached copy of {ref}; {_SERVER_HINT}"
            )
        log.warning("registry %s unreachable (%s): serving cached %s/%s", self.tracking_uri, reason, name, resolved)
        return resolved, records

    def list_models(self) -> list[ModelSummary]:
        """Every registered model with its version count, latest version and aliases."""
        client = self.client
        with self._errors("listing models"):
            models = list(client.search_registered_models(max_results=1000))
            summaries = []
            for model in sorted(models, key=lambda m: m.name):
                numbers = self._version_numbers(model.name)
                summaries.append(ModelSummary(
                    name=model.name, description=model.description or "",
                    latest_version=numbers[-1] if numbers else None, version_count=len(numbers),
                    aliases={a: str(v) for a, v in (model.aliases or {}).items()},
                ))
        return summaries

    def describe(self, name: str, ref: str | None = None) -> ModelDescription:
        """A model with all its versions, or one version: ``ref`` is ``"3"``, ``"@production"`` or
        ``None``; ``name`` may itself be a full reference (``NAME/3``, ``NAME@production``)."""
        name, version, alias = parse_model_ref(name)
        if ref:
            if ref.startswith("@"):
                alias = ref[1:]
            elif ref.isdigit():
                version = ref
            else:
                alias = ref
        model = self._registered_model(name)
        aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
        if version is None and alias is None:
            numbers = self._version_numbers(name)
        else:
            numbers = [self.resolve(name, version=version, alias=alias)]
        by_version: dict[str, list[str]] = {}
        for a, v in aliases.items():
            by_version.setdefault(v, []).append(a)
        versions = []
        for number in numbers:
            mv = self._model_version(name, number)
            tags = dict(mv.tags or {})
            records = _records_from_tags(tags, mv.source)
            versions.append(VersionInfo(
                name=name, version=number,
                created=datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
                description=mv.description or "", aliases=tuple(sorted(by_version.get(number, []))),
                variants=tuple(_to_variant(name, number, r) for r in records),
                in_use={k[len(IN_USE_TAG):]: v for k, v in tags.items() if k.startswith(IN_USE_TAG)},
                tags={k: v for k, v in tags.items() if not k.startswith((VARIANT_TAG, IN_USE_TAG))},
                source=mv.source,
            ))
        return ModelDescription(name=name, description=model.description or "", aliases=aliases,
                                versions=tuple(versions))

    def delete_version(self, name: str, version: str) -> None:
        """Remove a version (used when two nodes raced to register the same demo model)."""
        with self._errors(f"deleting {name}/{version}"):
            self.client.delete_model_version(validate_name(name), str(version))
