"""Shared vocabulary: step names and statuses, settings, records, typed errors, progress, code version.

No I/O and no Prefect: every other layer may import this one, and it imports none of them.
"""
