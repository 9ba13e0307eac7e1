"""simcse-eval and simcse-export (filled in by the evaluation/export issue)."""
