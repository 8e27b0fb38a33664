"""Split an ONNX model into K consecutive stages, stored as separate ONNX files beside the whole model.

Why: a device whose memory cannot hold a model can still run it stage by stage
(EdgeCaffe's layer loading, ``policies.loading``). A stage is a consecutive group
of nodes; stages are cut where exactly ONE activation tensor flows from what ran to
what is left, so stage i+1 takes one input (the output of stage i) and the
executor hands a single array along. Among the valid cut points the cuts are
chosen to balance the weight (initializer) bytes of the stages, because the
largest stage sets the memory floor of the ``partial`` and ``interleaved`` policies.
Each stage is cut with ``onnx.utils.Extractor`` and checked with the ONNX checker.

Storage design: the stages are extra artifacts of the SAME model version as the
whole model (not a new version). The stage files come from that version's own
bytes, so "NAME@production" names one set of weights in both forms, and aliases
need not move. Files go into the version's MLflow run under
``variants/onnx-stage-b<B>-k<K>/stage<i>.onnx``; when every file is uploaded, ONE
version tag ``edgebatch.split.b<B>.k<K>`` is written with the manifest (per stage:
backend ``onnx-stage``, stage index, file, sha256, bytes, input/output tensor
names, initializer bytes), so a split appears atomically or not at all. The
tag prefix is not ``edgebatch.variant.`` on purpose: detectors listing whole
variants never see stages. Downloads go through the node's verified cache.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.errors import BadRequest, NotFound, Unavailable
from model_registry.builders import file_sha256
from model_registry.cache import check_record

if TYPE_CHECKING:
    from model_registry.repository import ModelRepository

STAGE_BACKEND = "onnx-stage"
SPLIT_TAG = "edgebatch.split."
_SPLIT_KEY_RE = re.compile(r"^edgebatch\.split\.b(\d+)\.k(\d+)$")


@dataclass(frozen=True)
class StageFile:
    """One stage written to disk: what the registry records about it."""

    index: int
    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    node_count: int
    initializer_bytes: int
    sha256: str
    size_bytes: int

    def record(self, folder: str) -> dict[str, Any]:
        return {
            "backend": STAGE_BACKEND, "form": "split", "stage": self.index, "file": f"{folder}/{self.path.name}",
            "sha256": self.sha256, "size_bytes": self.size_bytes, "inputs": list(self.inputs),
            "outputs": list(self.outputs), "node_count": self.node_count,
            "initializer_bytes": self.initializer_bytes,
        }


@dataclass(frozen=True)
class SplitInfo:
    """A registered split of one version: where it lives and its stage records."""

    name: str
    version: str
    batch_size: int
    stages: int
    records: tuple[dict, ...]


# ---------------------------------------------------------------------------- graph analysis

def _constant_tensors(model) -> set[str]:
    """Initializers plus outputs of nodes fed only by constants: the later stage recomputes them."""
    constant = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if all(i == "" or i in constant for i in node.input):
            constant.update(o for o in node.output if o)
    return constant


def cut_points(model) -> list[tuple[int, str]]:
    """Positions p (cut before node p) where exactly one activation tensor is live, with its name."""
    nodes = list(model.graph.node)
    constant = _constant_tensors(model)
    graph_outputs = {o.name for o in model.graph.output}
    last_use: dict[str, int] = {}
    for idx, node in enumerate(nodes):
        for name in node.input:
            if name and name not in constant:
                last_use[name] = idx
    for name in graph_outputs:
        last_use[name] = len(nodes)  # a graph output must survive to the end
    live: set[str] = {i.name for i in model.graph.input if i.name not in constant}
    points: list[tuple[int, str]] = []
    for p in range(1, len(nodes)):
        node = nodes[p - 1]
        live.update(o for o in node.output if o and o not in constant and last_use.get(o, -1) >= p)
        live = {t for t in live if last_use.get(t, -1) >= p}
        if len(live) == 1:
            (tensor,) = live
            if tensor not in graph_outputs:
                points.append((p, tensor))
    return points


def _initializer_bytes_by_node(model) -> list[int]:
    """Weight bytes charged to the first node that reads each initializer."""
    from onnx import numpy_helper

    sizes = {init.name: numpy_helper.to_array(init).nbytes for init in model.graph.initializer}
    seen: set[str] = set()
    out = []
    for node in model.graph.node:
        b = 0
        for name in node.input:
            if name in sizes and name not in seen:
                seen.add(name)
                b += sizes[name]
        out.append(b)
    return out


def choose_cuts(weights: list[int], candidates: list[int], stages: int) -> list[int]:
    """K-1 cut positions from ``candidates`` minimising the largest stage's weight bytes
    (then the sum of squares), by dynamic programming over the candidate cuts."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    points = [0] + sorted(candidates) + [n]
    # best[j][c]: (max, sumsq, path) for the first c stages ending at points[j]
    inf = (float("inf"), float("inf"), ())
    best: list[list[tuple[float, float, tuple[int, ...]]]] = [[inf] * (stages + 1) for _ in points]
    best[0][0] = (0, 0, ())
    for j in range(1, len(points)):
        for c in range(1, stages + 1):
            for i in range(j):
                prev = best[i][c - 1]
                if prev[0] == float("inf"):
                    continue
                seg = prefix[points[j]] - prefix[points[i]]
                cand = (max(prev[0], seg), prev[1] + seg * seg, prev[2] + (points[j],))
                if cand[:2] < best[j][c][:2]:
                    best[j][c] = cand
    result = best[-1][stages]
    if result[0] == float("inf"):
        raise BadRequest(f"cannot cut the model into {stages} stages")
    return list(result[2][:-1])


def split_onnx(source: Path, stages: int, out_dir: Path) -> list[StageFile]:
    """Write ``stage0.onnx`` .. ``stage{K-1}.onnx`` into ``out_dir``; each checked by the ONNX checker."""
    import onnx
    from onnx import numpy_helper
    from onnx.utils import Extractor

    if stages < 2:
        raise BadRequest(f"--stages {stages}: a split needs at least 2 stages (1 stage is the whole model)")
    source = Path(source)
    if not source.is_file():
        raise BadRequest(f"ONNX file {source} does not exist")
    model = onnx.load(str(source))
    candidates = cut_points(model)
    if len(candidates) < stages - 1:
        raise BadRequest(
            f"{source.name} has {len(candidates)} points where a single tensor flows between layers, so it "
            f"can be split into at most {len(candidates) + 1} stages, not {stages}; use --stages "
            f"{len(candidates) + 1} or fewer"
        )
    by_pos = dict(candidates)
    cuts = choose_cuts(_initializer_bytes_by_node(model), list(by_pos), stages)
    constant = _constant_tensors(model)
    graph_inputs = [i.name for i in model.graph.input if i.name not in constant]
    graph_outputs = [o.name for o in model.graph.output]
    boundaries = [graph_inputs] + [[by_pos[c]] for c in cuts] + [graph_outputs]
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))  # stage I/O need value_info
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[StageFile] = []
    bounds = [0, *cuts, len(model.graph.node)]
    for k in range(stages):
        inputs, outputs = boundaries[k], boundaries[k + 1]
        try:
            stage = extractor.extract_model(inputs, outputs)
        except Exception as exc:  # onnx raises plain errors for names it cannot trace
            raise BadRequest(f"could not extract stage {k} ({inputs} -> {outputs}) of {source.name}: {exc}") from None
        stage.graph.name = f"{model.graph.name or 'model'}_stage{k}"
        onnx.checker.check_model(stage)
        path = out_dir / f"stage{k}.onnx"
        onnx.save(stage, str(path))
        files.append(StageFile(
            index=k, path=path, inputs=tuple(inputs), outputs=tuple(outputs), node_count=bounds[k + 1] - bounds[k],
            initializer_bytes=sum(numpy_helper.to_array(i).nbytes for i in stage.graph.initializer),
            sha256=file_sha256(path), size_bytes=path.stat().st_size,
        ))
    return files


# ---------------------------------------------------------------------------- registry

def split_key(batch_size: int, stages: int) -> str:
    return f"{SPLIT_TAG}b{batch_size}.k{stages}"


def register_split(
    repo: ModelRepository, name: str, stages: int, *, version: str | None = None,
    alias: str | None = None, batch_size: int = 1,
) -> SplitInfo:
    """Split the version's whole ONNX variant for ``batch_size`` and attach the stages to that version."""
    resolved = repo.resolve(name, version=version, alias=alias)
    whole = repo.find(name, version=resolved, batch_size=batch_size, backend="onnx")
    mv = repo.client.get_model_version(name, resolved)
    if not mv.run_id:
        raise BadRequest(
            f"{name}/{resolved} has no MLflow run to hold the stage files (registered outside edgebatch?); "
            f"register it with `edgebatch models build SOURCE.onnx --name {name}` and split that version"
        )
    folder = f"{STAGE_BACKEND}-b{batch_size}-k{stages}"
    with tempfile.TemporaryDirectory(prefix="edgebatch-split-") as tmp:
        files = split_onnx(Path(whole.path), stages, Path(tmp) / folder)
        for f in files:
            repo.client.log_artifact(mv.run_id, str(f.path), artifact_path=f"variants/{folder}")
    records = [{**f.record(folder), "stage_count": stages, "batch_size": batch_size} for f in files]
    manifest = {"batch_size": batch_size, "stages": stages, "source_sha256": whole.sha256,
                "input_shape": list(whole.input_shape), "records": records}
    text = json.dumps(manifest, sort_keys=True)
    if len(text) > 7900:
        raise BadRequest(f"the manifest of {stages} stages is too long for an MLflow tag; use fewer stages")
    repo.client.set_model_version_tag(name, resolved, split_key(batch_size, stages), text)
    return SplitInfo(name, resolved, batch_size, stages, tuple(records))


def list_splits(repo: ModelRepository, name: str, version: str) -> dict[tuple[int, int], dict]:
    """(batch size, stages) -> manifest, for every split registered on a version."""
    try:
        mv = repo.client.get_model_version(name, version)
    except Exception as exc:  # any error: MLflow raises its own type for a missing version
        raise NotFound(f"model {name} has no version {version} ({exc})") from None
    found = {}
    for key, value in (mv.tags or {}).items():
        match = _SPLIT_KEY_RE.match(key)
        if match:
            manifest = json.loads(value)
            manifest["artifact_root"] = mv.source
            found[(int(match.group(1)), int(match.group(2)))] = manifest
    return found


def find_stages(
    repo: ModelRepository, name: str, version: str | None = None, alias: str | None = None, *,
    batch_size: int = 1, stages: int | None = None,
) -> list[Path]:
    """Local, sha256-verified stage files in stage order (downloaded once per node).

    ``stages=None`` takes the split with the most stages registered for ``batch_size``.
    """
    resolved = repo.resolve(name, version=version, alias=alias)
    splits = list_splits(repo, name, resolved)
    mine = {k: m for (b, k), m in splits.items() if b == batch_size}
    if not mine or (stages is not None and stages not in mine):
        have = ", ".join(f"batch {b} x {k} stages" for b, k in sorted(splits)) or "none"
        raise NotFound(
            f"{name}/{resolved} has no split for batch {batch_size}"
            + (f" into {stages} stages" if stages is not None else "")
            + f" (splits: {have}); make one with `edgebatch models split {name}/{resolved} "
            f"--stages {stages or 4} --batch-size {batch_size}`"
        )
    manifest = mine[stages if stages is not None else max(mine)]
    paths = []
    for record in sorted(manifest["records"], key=lambda r: r["stage"]):
        check_record(record, f"the split manifest of {name}/{resolved}")  # before it names any path
        file_name = f"{Path(record['file']).parent.name}-{Path(record['file']).name}"
        path = repo.cache.get(record["sha256"], file_name, record["size_bytes"])
        if path is None:
            artifact = f"{manifest['artifact_root']}/{record['file']}"

            def fetch(folder: Path, artifact: str = artifact, file_name: str = file_name) -> Path:
                import mlflow.artifacts

                try:
                    downloaded = Path(mlflow.artifacts.download_artifacts(
                        artifact_uri=artifact, dst_path=str(folder), tracking_uri=repo.tracking_uri))
                except Exception as exc:  # any error: MLflow and network errors alike
                    raise Unavailable(f"could not download stage {artifact} from {repo.tracking_uri} ({exc}); "
                                      "check the registry is reachable (edgebatch models list)") from None
                target = folder / file_name
                downloaded.rename(target)
                return target

            path = repo.cache.install(record["sha256"], file_name, fetch, source=artifact)
        paths.append(path)
    return paths


def split_summary(info: SplitInfo) -> list[dict]:
    """Rows for the CLI: stage, bytes, weight bytes, sha256 prefix."""
    return [{"stage": r["stage"], "size_bytes": r["size_bytes"], "initializer_bytes": r["initializer_bytes"],
             "inputs": r["inputs"], "outputs": r["outputs"], "sha256": r["sha256"][:12]} for r in info.records]


__all__ = ["STAGE_BACKEND", "SplitInfo", "StageFile", "choose_cuts", "cut_points", "find_stages",
           "list_splits", "register_split", "split_onnx", "split_summary"]
