"""Project scripts, importable as `scripts.*` when run from the repository root."""
