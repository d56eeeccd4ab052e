"""Answer parsing and metrics (grounding, QVHighlights, retrieval, QA); batch evaluation."""
