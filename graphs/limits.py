"""The three build limits every layer shares: what the artifacts are built for and accept.

Torch-free and beside the contract: the build writes them into the manifest, the profiles
and the memory plan size engines from them, and the runner refuses calls outside them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What the graphs or engines were built for; calls outside these are refused."""

    max_batch: int
    max_seq_len: int  # prompt plus generated tokens
    max_images: int
