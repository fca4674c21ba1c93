"""The Pick node's wait without a model (issue 11, items 14 and 15): the wait is registered
before the page hears of the round, and an optional timeout ends a run nobody answers.

The round's session is a stand-in with two PIL images: the wait does not touch the model."""
import time
from dataclasses import dataclass, field

import pytest
from PIL import Image

from d3po_studio.nodes import PickImage, host, picks, registry
from test_nodes import _run_in_thread


@dataclass
class _Batch:
    images: list = field(default_factory=lambda: [Image.new("RGB", (8, 8), c) for c in ("red", "blue")])


class _Session:
    def batch(self, batch_id):
        return _Batch()


ROUND = registry.Round(_Session(), "000001-test", 2)


class FastPage(host.PlainHost):
    """A page that answers in the same instant it hears of the round (a very fast click)."""

    def send(self, event, data):
        super().send(event, data)
        self.accepted = picks.BOARD.answer(data["node"], picks.Answer(index=1))


@pytest.fixture
def installed(tmp_path):
    def install(cls=host.PlainHost):
        h = cls(tmp_path)
        host.use(h)
        return h
    yield install
    host.use(None)


def test_an_answer_sent_as_soon_as_the_page_hears_is_not_lost(installed):
    h = installed(FastPage)
    t, box = _run_in_thread(PickImage.execute, round=ROUND, mode="click", index=0)
    t.join(10)
    assert not t.is_alive(), "the answer was lost: the wait was registered after the event"
    assert h.accepted is True
    assert box["result"].result[2] == 1 and picks.BOARD.pending() == {}


def test_timeout_ends_an_unanswered_pick(installed):
    installed()
    start = time.monotonic()
    with pytest.raises(picks.PickTimeout, match="timeout_s to 0"):
        PickImage.execute(round=ROUND, mode="click", index=0, timeout_s=1)
    assert 1.0 <= time.monotonic() - start < 5.0
    assert picks.BOARD.pending() == {}          # the wait is gone: a later run starts clean


def test_no_timeout_waits_until_answered(installed):
    h = installed()
    t, box = _run_in_thread(PickImage.execute, round=ROUND, mode="click", index=0, timeout_s=0)
    time.sleep(1.5)
    assert t.is_alive() and h.node in picks.BOARD.pending()
    assert picks.BOARD.answer(h.node, picks.Answer(none=True))
    t.join(10)
    assert box["result"].result[2] == -1


def test_the_wait_is_listed_before_the_event_is_sent():
    board, seen = picks.PickBoard(), []
    with board.waiting("7", {"round": "r", "n": 2}) as result:
        seen.append(board.pending())              # what GET /d3po/pick answers at the moment of sending
        assert board.answer("7", picks.Answer(index=0))
        assert result(lambda: None).index == 0
    assert seen == [{"7": {"round": "r", "n": 2}}] and board.pending() == {}
