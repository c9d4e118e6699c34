"""One OpenAPI document for the whole API: every application's document, its paths under the
application's route prefix, merged. Committed as `openapi.json`, beside the WebSockets' message
schemas (`websockets.schema.json`, which OpenAPI cannot describe); `make openapi` rewrites both."""

from __future__ import annotations

import importlib
import json
from typing import Any

from deployments.launcher import ROOT, load_serve_config

OPENAPI_FILE = ROOT / "openapi.json"
WEBSOCKETS_FILE = ROOT / "websockets.schema.json"


def merged() -> dict[str, Any]:
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Vurksha API",
            "version": "0.1.0",
            "description": "Quick-commerce backend. Each service is mounted at its own prefix.",
        },
        "paths": {},
        "components": {"schemas": {}, "securitySchemes": {}},
        "tags": [],
    }
    for app in load_serve_config()["applications"]:
        module = importlib.import_module(app["import_path"].split(":")[0])
        spec = module.api.openapi()
        prefix = app["route_prefix"].rstrip("/")
        for path, item in spec["paths"].items():
            for operation in item.values():
                operation["operationId"] = f"{app['name']}_{operation['operationId']}"
            doc["paths"][prefix + path] = item
        for kind, entries in spec.get("components", {}).items():
            target = doc["components"].setdefault(kind, {})
            for name, entry in entries.items():
                if target.get(name, entry) != entry:
                    raise ValueError(f"two services define {kind} {name!r} differently")
                target[name] = entry
        doc["tags"].append({"name": app["name"], "description": spec["info"].get("description", "")})
    return doc


def render() -> str:
    return json.dumps(merged(), indent=2) + "\n"


def render_websockets() -> str:
    # The modules that serve sockets register their messages when imported.
    import deployments.live
    import deployments.notifications  # noqa: F401
    from deployments.sockets import schema_document

    return json.dumps(schema_document(), indent=2) + "\n"
