"""What the named-image data sets (Twemoji, flags, icons) share: a list of entries with captions, and a held-out
split decided by a hash of each entry's name, so it is the same on every machine and stays put when the source
adds entries."""

from __future__ import annotations

import hashlib

import torch

TEST_PERCENT = 5


def in_test_split(namespace: str, name: str) -> bool:
    """True for about TEST_PERCENT% of names: sha256("mmgen-<namespace>/<name>") modulo 100."""
    digest = hashlib.sha256(f"mmgen-{namespace}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT


class EntryDataset(torch.utils.data.Dataset):
    """A data set over `self.entries`, items with a `.caption`."""

    entries: list

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]
