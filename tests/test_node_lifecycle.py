"""Sessions in the node pack under ComfyUI's output cache (issue 10, repro 3).

ComfyUI started with ``--cache-lru 10`` keeps the Load node's output for every set of inputs it
has seen. Queueing the loop with lr 0.01, 0.005, 0.01, 0.005 hands the third and fourth runs the
Session objects of the first and second, which the node registry had closed when the settings
changed. Before: the old Session wrote update 17 a second time, then every update failed with
FileNotFoundError …/checkpoints/000019/meta.json. Now a closed Session refuses every call and
``host.live`` swaps in the session open on that folder, reopened with the cached one's settings.
"""
import pytest

from d3po_studio import Session
from d3po_studio.core.errors import SessionError
from d3po_studio.nodes import LoadSession, PickImage, SampleRound, UpdateLora, host, registry


@pytest.fixture
def plain(tmp_path, tiny_sd1):
    h = host.PlainHost(tmp_path / "comfy")
    tiny_sd1.save_pretrained(h.root / "diffusers" / "tiny-sd1")
    host.use(h)
    yield h
    registry.close_all()
    host.use(None)


def _load(lr):
    return LoadSession.execute(checkpoint="diffusers:tiny-sd1", session_name="loop", lr=lr, beta=0.1,
                               lora_rank=4, dtype="float32", optimizer="adamw",
                               gradient_checkpointing=False).result[0]


def _loop(session, seed):
    """Sample -> Pick (index) -> Update, as one queued run of the loop workflow."""
    _, rnd = SampleRound.execute(session=session, prompt="a red circle", negative_prompt="", n=2, seed=seed,
                                 steps=2, guidance=1.0, width=0, height=0).result
    pick = PickImage.execute(round=rnd, mode="index", index=seed % 2).result[0]
    return UpdateLora.execute(pick=pick).result[0]


def test_a_closed_session_from_comfys_cache_is_reopened_and_nothing_is_written_twice(plain):
    cache = {}                                   # what --cache-lru keeps: Load's output per lr
    for seed, lr in enumerate((0.01, 0.005, 0.01, 0.005)):
        session = cache.get(lr) or cache.setdefault(lr, _load(lr))
        assert session.closed == (seed >= 2)    # the third and fourth runs get a closed one
        live = _loop(session, seed)
        assert not live.closed and live.settings.lr == lr
    with pytest.raises(SessionError, match="closed"):
        cache[0.01].sample("a red circle")      # a closed Session never writes
    assert ("free_models", {}) in plain.events
    registry.close_all()

    s = Session.open(plain.sessions_dir() / "loop")     # its own model, read from the folder
    try:
        history = s.history()
        assert s.updates == 4 and [r["status"] for r in history] == ["applied"] * 4
        rounds = [s.folder.checkpoint_meta(c)["round"] for c in s.folder.chain(s.head)]
        assert sorted(rounds) == [r["id"] for r in history]      # one checkpoint per click, none twice
        assert s.settings.lr == 0.005
    finally:
        s.close()

