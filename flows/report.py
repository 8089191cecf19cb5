"""The markdown report a pipeline run leaves in Prefect (an artifact) : metrics and MLflow links."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact

from pipeline.metrics import headline_metrics


def metrics_markdown(metrics: dict[str, float], *, title: str, links: dict[str, str] | None = None,
                     notes: list[str] | None = None) -> str:
    """A markdown page: ``title``, a ``| metric | value |`` table of the headline metrics
    (``task/metric`` keys; per-class values are left to MLflow), then ``links`` (text -> URL) and
    ``notes`` as bullet points."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(headline_metrics(metrics).items())]
    bullets = [f"- [{text}]({url})" for text, url in (links or {}).items()] + \
        [f"- {note}" for note in notes or []]
    if bullets:
        lines += ["", *bullets]
    return "\n".join(lines) + "\n"


def publish_report(markdown: str, *, key: str, description: str) -> Any:
    """Create the Prefect markdown artifact (``key``: lowercase letters, digits and dashes)."""
    return create_markdown_artifact(markdown=markdown, key=key, description=description)
