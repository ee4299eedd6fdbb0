"""Writing manifest.json for an engines folder `facert build` made (its fields and the checks that
read it: runtime/manifest.py, the runtime side of the contract)."""


from __future__ import annotations

import json
import platform
from pathlib import Path

from runtime.file_hashes import file_sha256
from runtime.manifest import MANIFEST, EngineError

def tool_versions(*extra: str) -> dict[str, str]:
    """Versions of the tools a build used (a missing optional tool is left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("facert", "torch", "transformers", "onnx", "onnxruntime", "onnxslim", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hash_components(root: Path, components: dict[str, dict]) -> None:
    """Fill in sha256 (and data_sha256 for external data) of every component's files, in place."""
    cache: dict[str, str] = {}

    def digest(rel: str) -> str:
        if rel not in cache:
            path = root / rel
            if not path.is_file():
                raise EngineError(f"component file {path} was not written")
            cache[rel] = file_sha256(path, "full")  # just written: read every byte (and record it)
        return cache[rel]

    for entry in components.values():
        entry["sha256"] = digest(entry["file"])
        entry["data_sha256"] = {rel: digest(rel) for rel in entry.get("data_files", [])}


def write_manifest(root: Path, manifest: dict) -> Path:
    root = Path(root)
    hash_components(root, manifest["components"])
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


