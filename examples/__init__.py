"""Worked examples of FedRefine's extension points (see docs/POLICIES.md)."""
