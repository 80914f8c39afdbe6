"""I/O: locations and redaction (`locations`, a leaf), fsspec stores, source expansion, faults, the
hashed copy with a byte limit, `.npy` audio on disk, the manifest format, and `web/` for URL sources
(network policy, egress proxy, yt-dlp and direct downloads). No Prefect, no model.
"""
