"""The part of Kustomize that k8s/ uses, so the tests can render the overlays (no kustomize or helm
binary can be installed here). A build either gives what `kubectl kustomize` gives, or raises
KustomizeError: every field, option and case it does not implement is refused, never ignored.

Implemented, in kustomize's order within one kustomization: `resources` (files under the
kustomization's folder, and folders holding a kustomization.yaml, built first, recursively);
`configMapGenerator` (`files` only, and only with `options.disableNameSuffixHash: true`: the name
hash and the rewriting of references to the hashed name are not implemented); `patches` (JSON6902
operations add/remove/replace/test, with a `target`; strategic-merge patches are refused, since for
custom resources such as RayService kustomize knows no merge keys and replaces whole lists);
`namespace`; `labels` (metadata only: `includeSelectors`/`includeTemplates` are refused); `images`
(`newName`, `newTag`, `digest`, on every `containers`/`initContainers` item at any depth, as
kustomize does). YAML is read as kustomize reads it: `yes`/`no`/`on`/`off` stay strings, and a
repeated key is an error.

Stricter than kustomize on purpose: a patch target that matches nothing raises (kustomize ignores
it). Documents come out in file order, not kustomize's by-kind order."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
API_VERSION = "kustomize.config.k8s.io/v1beta1"
FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "namespace", "labels", "images"}
# Kinds kustomize's namespace transformer leaves alone; none is expected here, so refuse them.
CLUSTER_SCOPED = set(
    "Namespace ClusterRole ClusterRoleBinding CustomResourceDefinition PersistentVolume StorageClass"
    " PriorityClass IngressClass MutatingWebhookConfiguration ValidatingWebhookConfiguration".split()
)
REGEX_META = re.compile(r"[\\^$*+?()\[\]{}|]")


class KustomizeError(ValueError):
    """A kustomization this renderer cannot build exactly as kustomize would (or kustomize refuses)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 as go-yaml v3 (kustomize) reads it: only true/false are booleans; no repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        if repeated:
            raise KustomizeError(f"{node.start_mark}: repeated key(s) {sorted(map(str, repeated))}")
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_all(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc is not None]


def _only(where: str, mapping: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise KustomizeError(f"{where}: expected a mapping, got {mapping!r}")
    unknown = mapping.keys() - allowed
    if unknown:
        raise KustomizeError(f"{where}: not implemented here: {sorted(unknown)}")
    return mapping


def _inside(root: Path, relative: str, what: str) -> Path:
    # kustomize's default load restrictor: a file must lie under the kustomization's folder.
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise KustomizeError(f"{root}: {what} {relative!r} is outside the kustomization's folder")
    return path


def build(root: Path) -> list[Doc]:
    """Render the kustomization in folder `root`, as `kubectl kustomize root` would."""
    file = root / "kustomization.yaml"
    if not file.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    loaded = load_all(file.read_text())
    if len(loaded) != 1:
        raise KustomizeError(f"{file}: expected one YAML document")
    k = _only(str(file), loaded[0], FIELDS)
    if (k.get("apiVersion"), k.get("kind")) != (API_VERSION, "Kustomization"):
        raise KustomizeError(f"{file}: apiVersion/kind must be {API_VERSION}/Kustomization")
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        docs += _resource(root, entry)
    docs += [_config_map(root, gen) for gen in k.get("configMapGenerator", [])]
    ids = [_id(doc) for doc in docs]
    if len(set(ids)) != len(ids):
        raise KustomizeError(f"{file}: resource ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    for patch in k.get("patches", []):
        _patch(root, docs, patch)
    if "namespace" in k:
        namespace = _strings(str(file), {"namespace": k["namespace"]})["namespace"]
        for doc in docs:
            if doc["kind"] in CLUSTER_SCOPED:
                raise KustomizeError(f"{_id(doc)}: cluster-scoped kinds are not implemented")
            doc["metadata"]["namespace"] = namespace
    for label in k.get("labels", []):
        _only(f"{file}: labels", label, {"pairs", "includeSelectors", "includeTemplates"})
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise KustomizeError(f"{file}: labels in selectors/templates are not implemented")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(
                _strings(f"{file}: labels", label.get("pairs") or {})
            )
    for image in k.get("images", []):
        _only(f"{file}: images", image, {"name", "newName", "newTag", "digest"})
        _strings(f"{file}: images", image)
        for doc in docs:
            if doc["kind"] != "CustomResourceDefinition":
                _set_images(doc, image)
    return docs


def _strings(where: str, mapping: dict[str, Any]) -> dict[str, str]:
    # A YAML number (`newTag: 1.10`) would not survive as the text written: demand quotes.
    for key, value in mapping.items():
        if not isinstance(value, str):
            raise KustomizeError(f"{where}: {key}: {value!r} must be a (quoted) string")
    return mapping


def _id(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc["metadata"]
    return doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"]


def _resource(root: Path, entry: str) -> list[Doc]:
    if "://" in entry or entry.startswith(("github.com/", "git@")):
        raise KustomizeError(f"{root}: remote resource {entry!r} is not implemented")
    path = (root / entry).resolve()
    if path.is_dir():
        return build(path)  # a base: its own folder is its root
    docs = load_all(_inside(root, entry, "resource").read_text())
    for doc in docs:
        if not (
            isinstance(doc, dict)
            and doc.get("apiVersion")
            and doc.get("kind")
            and doc.get("metadata", {}).get("name")
        ):
            raise KustomizeError(f"{path}: not a Kubernetes object (apiVersion, kind, metadata.name)")
    return docs


def _config_map(root: Path, gen: dict[str, Any]) -> Doc:
    _only(f"{root}: configMapGenerator", gen, {"name", "files", "options"})
    options = _only(
        f"{root}: configMapGenerator options",
        gen.get("options", {}),
        {"disableNameSuffixHash", "labels", "annotations"},
    )
    if options.get("disableNameSuffixHash") is not True:
        raise KustomizeError(
            f"{root}: {gen.get('name')}: set options.disableNameSuffixHash: true "
            "(the name hash is not implemented)"
        )
    data: dict[str, str] = {}
    for source in gen.get("files", []):
        key, sep, relative = source.rpartition("=")
        key = key if sep else Path(relative).name
        if not re.fullmatch(r"[-._a-zA-Z0-9]+", key) or key in data or "=" in key:
            raise KustomizeError(f"{root}: {gen['name']}: bad or repeated key in {source!r}")
        try:
            data[key] = _inside(root, relative, "file").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise KustomizeError(f"{root}: {relative}: binaryData is not implemented") from e
    meta: Doc = {"name": gen["name"]}
    for field in ("labels", "annotations"):
        if options.get(field):
            meta[field] = dict(_strings(f"{root}: {gen['name']} {field}", options[field]))
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(sorted(data.items()))}


def _patch(root: Path, docs: list[Doc], patch: dict[str, Any]) -> None:
    _only(f"{root}: patches", patch, {"path", "patch", "target"})
    if ("path" in patch) == ("patch" in patch):
        raise KustomizeError(f"{root}: a patch needs exactly one of path and patch")
    text = _inside(root, patch["path"], "patch").read_text() if "path" in patch else patch["patch"]
    ops = load_all(text)
    if len(ops) != 1 or not isinstance(ops[0], list):
        raise KustomizeError(f"{root}: only JSON6902 patches (a list of operations) are implemented")
    target = _only(
        f"{root}: patch target", patch.get("target"), {"group", "version", "kind", "name", "namespace"}
    )
    chosen = [
        doc for doc in docs if all(_matches(pattern, _field(doc, field)) for field, pattern in target.items())
    ]
    if not chosen:
        raise KustomizeError(f"{root}: patch target {target} matches no resource")
    for doc in chosen:
        for op in ops[0]:
            _apply(doc, op)


def _field(doc: Doc, field: str) -> str:
    group, _, version = doc["apiVersion"].rpartition("/")  # the core group is ""
    meta = doc["metadata"]
    fields = {"group": group, "version": version, "kind": doc["kind"], "name": meta["name"]}
    return fields[field] if field != "namespace" else meta.get("namespace", "")


def _matches(pattern: str, value: str) -> bool:
    # kustomize matches target fields as anchored (Go) regular expressions; plain names match the
    # same in Python's `re`, and anything fancier is refused rather than risk a difference.
    if REGEX_META.search(pattern):
        raise KustomizeError(f"patch target {pattern!r}: regular expressions are not implemented")
    return re.fullmatch(pattern, value) is not None


def _apply(doc: Doc, op: dict[str, Any]) -> None:
    kind = op.get("op")
    needed = {"op", "path"} if kind == "remove" else {"op", "path", "value"}
    _only(f"{_id(doc)}: patch op", op, needed)
    if (
        kind not in ("add", "remove", "replace", "test")
        or needed - op.keys()
        or not op["path"].startswith("/")
    ):
        raise KustomizeError(f"{_id(doc)}: unsupported or incomplete patch op {op}")
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = _child(doc, op, node, part)
    value = copy.deepcopy(op.get("value"))
    key: Any = last
    if isinstance(node, list):
        if kind == "add":
            node.insert(len(node) if last == "-" else _index(doc, op, node, last, allow_end=True), value)
            return
        key = _index(doc, op, node, last, allow_end=False)
    elif not isinstance(node, dict):
        raise KustomizeError(f"{_id(doc)}: {op['path']}: parent is not an object or list")
    elif kind != "add" and last not in node:
        raise KustomizeError(f"{_id(doc)}: {kind} {op['path']}: no such field")
    if kind == "remove":
        del node[key]
    elif kind == "test":
        if json.dumps(node[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise KustomizeError(f"{_id(doc)}: test {op['path']}: {node[key]!r} != {value!r}")
    else:
        node[key] = value


def _child(doc: Doc, op: dict[str, Any], node: Any, part: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list):
        return node[_index(doc, op, node, part, allow_end=False)]
    raise KustomizeError(f"{_id(doc)}: {op['op']} {op['path']}: {part!r} does not exist")


def _index(doc: Doc, op: dict[str, Any], node: list[Any], part: str, allow_end: bool) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", part) or int(part) > len(node) - (0 if allow_end else 1):
        raise KustomizeError(f"{_id(doc)}: {op['op']} {op['path']}: no list index {part!r}")
    return int(part)


def _set_images(node: Any, image: dict[str, str], key: str = "") -> None:
    if isinstance(node, dict):
        for child_key, child in node.items():
            _set_images(child, image, child_key)
    elif isinstance(node, list):
        for item in node:
            if key in ("containers", "initContainers") and isinstance(item, dict) and "image" in item:
                item["image"] = new_image(item["image"], image)
            if key == "volumes" and isinstance(item, dict) and "image" in item:
                raise KustomizeError("images: image volumes are not implemented")
            _set_images(item, image)


def new_image(value: str, image: dict[str, str]) -> str:
    """kustomize's imagetag updater: `name`, with any tag and digest, becomes the new name, tag and
    digest (a new tag or digest replaces both old ones)."""
    if REGEX_META.search(image["name"]):
        raise KustomizeError(f"images: {image['name']!r}: regular expressions are not implemented")
    tag_re, digest_re = r"(:[a-zA-Z0-9_.{}-]*)?", r"(@[a-zA-Z0-9]+([.+_-][a-zA-Z0-9]+)*:[a-zA-Z0-9_.{}-]*)?"
    if not re.fullmatch(image["name"] + tag_re + digest_re, value):
        return value
    name, _, digest = value.partition("@")
    colon = name.find(":", max(name.find("/"), 0))  # a registry's :port is not a tag
    name, tag = (name[:colon], name[colon + 1 :]) if colon >= 0 else (name, "")
    if image.get("newTag") or image.get("digest"):
        tag, digest = image.get("newTag", ""), image.get("digest", "")
    name = image.get("newName") or name
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
