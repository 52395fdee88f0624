"""d. The release's `collect_ec_item_metadata` (what E's answer carries per item beside
our encoder id), compiled from its source and run with torch on real-shaped image
features (one image; two; the same image twice), merged into E's answer by
ProducerScheduler.finished as the connector does, then read by PD's parse_params:
every item must map to our encoder, with no key PD does not know."""

from __future__ import annotations

import ast
import builtins
import copy
import json
from dataclasses import dataclass
from typing import Any

from integration.compat.report import Section
from integration.compat.source_tree import SourceTree

UTILS = "vllm/distributed/ec_transfer/ec_connector/utils.py"
ENCODER_ID = "enc0"
# What Qwen2-VL's parser declares as an image's placeholder metadata
# (`embedding_fields`): what vLLM's PlaceholderMetadataResolver answers for it.
IMAGE_FIELDS = {"image_grid_thw"}
PATCH_DIM = 1176  # 3 channels x 2 frames x 14 x 14, Qwen2-VL's flattened patch


@dataclass
class _Position:
    offset: int
    length: int

    def get_num_embeds(self) -> int:
        return self.length


@dataclass
class _Item:
    data: dict[str, Any]

    def get_data(self) -> dict[str, Any]:
        return self.data


@dataclass
class _Feature:
    """What `collect_ec_item_metadata` reads of vLLM's MultiModalFeatureSpec."""

    identifier: str
    modality: str
    mm_position: _Position
    data: _Item | None


@dataclass
class _Request:
    request_id: str
    mm_features: list[_Feature]
    ec_transfer_params: dict[str, Any] | None = None


class _Resolver:
    """vLLM's PlaceholderMetadataResolver as it answers for Qwen2-VL."""

    def fields_for(self, modality: str) -> set[str]:
        return IMAGE_FIELDS if modality == "image" else set()


def _image(identifier: str, height: int, width: int, offset: int) -> _Feature:
    """A processed image as Qwen2-VL's processor leaves it: 14-pixel patches, 2x2 merged."""
    import torch

    grid = (1, height // 14, width // 14)
    patches = grid[0] * grid[1] * grid[2]
    data = {
        "pixel_values": torch.zeros(patches, PATCH_DIM),
        "image_grid_thw": torch.tensor(grid),
    }
    return _Feature(identifier, "image", _Position(offset, patches // 4), _Item(data))


def _cases() -> dict[str, list[_Feature]]:
    a, b = "a" * 64, "b" * 64  # mm_hashes are hex digests
    return {
        "one image": [_image(a, 448, 448, 5)],
        "two images": [_image(a, 448, 448, 5), _image(b, 224, 336, 270)],
        "the same image twice": [_image(a, 448, 448, 5), _image(a, 448, 448, 270)],
    }


def _is_list_of(value: object, typ: type | tuple[type, ...], *, check: str = "first") -> bool:
    """vllm.utils.collection_utils.is_list_of, which collect_ec_item_metadata uses."""
    if not isinstance(value, list):
        return False
    if check == "first":
        return len(value) == 0 or isinstance(value[0], typ)
    return all(isinstance(v, typ) for v in value)


def load_item_metadata(release: SourceTree) -> Any:
    """The release's `collect_ec_item_metadata`, compiled from its source alone: it runs
    with torch and stand-ins for the vLLM helpers it calls; ValueError says what is
    missing."""
    import torch

    if UTILS not in release.files:
        raise ValueError(f"{UTILS} is missing")
    found = next(
        (
            node
            for node in release.parse(UTILS).body
            if isinstance(node, ast.FunctionDef) and node.name == "collect_ec_item_metadata"
        ),
        None,
    )
    if found is None:
        raise ValueError(f"{UTILS} does not define collect_ec_item_metadata")
    fn = copy.deepcopy(found)  # changed below; the tree's parse is shared
    for arg in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]:
        arg.annotation = None  # evaluated when the function is defined; the rest are not
    fn.returns = None
    namespace: dict[str, Any] = {"torch": torch, "is_list_of": _is_list_of}
    unknown = _free_names(fn) - set(namespace) - set(dir(builtins))
    if unknown:
        raise ValueError(
            f"collect_ec_item_metadata ({UTILS}:{fn.lineno}) uses {', '.join(sorted(unknown))}, "
            "which this check has no stand-in for"
        )
    exec(compile(ast.Module([fn], []), UTILS, "exec"), namespace)
    return namespace["collect_ec_item_metadata"]


def _free_names(fn: ast.FunctionDef) -> set[str]:
    """Names a function reads at run time that it does not bind itself (a flat view of
    its scopes, enough here); a local variable's annotation is never evaluated."""
    annotations = {
        id(sub)
        for node in ast.walk(fn)
        if isinstance(node, ast.AnnAssign)
        for sub in ast.walk(node.annotation)
    }
    loaded, bound = set(), {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and id(node) not in annotations:
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return loaded - bound


def check(release: SourceTree) -> Section:
    from ec_nixl.errors import RefusedError
    from ec_nixl.producer.scheduler import ProducerScheduler
    from ec_nixl.transfer_params import parse_params

    section = Section(
        "d",
        "collect_ec_item_metadata's entries, in E's answer (ProducerScheduler.finished), "
        "read by PD (parse_params)",
    )
    try:
        collect = load_item_metadata(release)
    except ValueError as exc:
        section.fail(str(exc))
        return section
    resolver = _Resolver()
    for case, features in _cases().items():
        # as ECNixlConnector builds its producer's scheduler
        producer = ProducerScheduler(ENCODER_ID, lambda mm: collect(mm, resolver))
        try:
            params = producer.finished(_Request(case, features))
            json.dumps(params)
        except Exception as exc:  # the release's code, run on our stand-ins
            section.fail(f"{case}: E's answer cannot be made: {type(exc).__name__}: {exc}")
            continue
        try:
            sources = parse_params(params, [ENCODER_ID])
        except RefusedError as exc:
            section.fail(f"{case}: PD refuses E's answer: {exc}")
            continue
        expected = {feature.identifier: ENCODER_ID for feature in features}
        if sources.items != expected or sources.announced:
            section.fail(f"{case}: PD reads {sources.items}, not {expected}")
        elif sources.unknown_keys:
            keys = ", ".join(sorted(sources.unknown_keys))
            section.fail(f"{case}: E's answer carries keys PD does not know: {keys}")
        else:
            entries = "; ".join(
                f"{mm_hash[:6]}..: {_describe(entry)}" for mm_hash, entry in params.items()
            )
            section.ok(f"{case}: {entries}")
    return section


def _describe(entry: dict[str, Any]) -> str:
    return ", ".join(
        f"{key}={value}" if key != "metadata" else f"metadata{{{', '.join(value)}}}"
        for key, value in entry.items()
    )
