"""Rendering the Helm chart in tests (helm-python-sdk, no helm binary): its files, or its objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "servegrid"
KUBE_VERSION = "1.30.0"


def render_files(values: dict[str, Any] | None = None, name: str = "servegrid") -> dict[str, str]:
    """Template path -> rendered text, for release `name` in namespace `ml`."""
    return helm.Chart.load(CHART).render(values, name=name, namespace="ml")


def render(values: dict[str, Any] | None = None, name: str = "servegrid") -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders (NOTES.txt is text for the user, not an object)."""
    files = render_files(values, name)
    return [
        doc for path, text in files.items() if not path.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc
    ]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """name -> object, for the objects of one kind."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
