"""The weight arena (ropekit.model.arena): one huge-page buffer, one dtype."""

from __future__ import annotations

import pytest
import torch


def test_huge_page_copies_rejects_mixed_dtypes():
    from ropekit.model.arena import huge_page_copies

    with pytest.raises(ValueError, match="one dtype"):
        huge_page_copies([torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)])
    (copy,), _ = huge_page_copies([torch.arange(5.0)], torch.bfloat16)
    assert copy.dtype == torch.bfloat16 and copy.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
