"""YAML recipes shipped with surgery (found by name or by path)."""
