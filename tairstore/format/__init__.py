"""On-disk record layouts and the byte-level helpers they use (checksums, compression).

Every format the store writes is defined here, in one place; ``docs/ARCHITECTURE.md`` describes
each in prose.
"""
