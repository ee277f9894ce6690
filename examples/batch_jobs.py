"""The job of examples/batch.py. Workers import it with ``--import batch_jobs``."""

from __future__ import annotations

from tasklet import job


@job(queue="batch", max_attempts=3)
def count_words(document_id: int, text: str) -> dict[str, int]:
    # A real job would fetch the document, parse it, call a model ...
    return {"document_id": document_id, "words": len(text.split())}
