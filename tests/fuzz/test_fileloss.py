"""M1 in the fault model: every kind of whole-file loss on every kind of file, one seed each."""

from __future__ import annotations

import pytest

from tairstore.fuzz.fileloss import KINDS, TARGETS, run_file_loss
from tairstore.fuzz.model import Tally


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_whole_file_loss_destroys_no_intact_block(tmp_path, target, kind):
    tally = Tally()
    failures = run_file_loss(str(tmp_path), 7, tally, target, kind)
    assert not failures, "\n".join(failures) + "\n" + tally.table()
    assert tally.intact_destroyed == 0 and tally.runs["file loss"] == 1
