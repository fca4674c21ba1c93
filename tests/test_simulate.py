"""A short simulated session completes and writes its report, plots and metrics."""
import json

import pytest

from d3po_studio.cli import main
from d3po_studio.core.embedded import WEIGHTS_DIR
from d3po_studio.core.oracles import ORACLES
from d3po_studio.core.simulate import eval_set, oracle_metrics

HAS_EMBEDDED = (WEIGHTS_DIR / "model_index.json").exists()


def test_oracle_metrics_hand_computed():
    base = [0.0, 1.0, 2.0, 3.0]                # std = 1.118, margin = 0.2795
    tuned = [0.5, 1.1, 2.0, 4.0]               # changes 0.5, 0.1, 0, 1.0
    m = oracle_metrics(base, tuned)
    assert m["win_rate"] == 0.5                 # 0.5 and 1.0 exceed the margin; 0.1 does not
    assert m["effect_size"] == pytest.approx(0.4 / 1.118034, rel=1e-5)


def test_eval_set_is_held_out_and_reproducible():
    a, b = eval_set(8, seed=0), eval_set(8, seed=0)
    assert a == b and len({s for _, s in a}) == 8 and min(s for _, s in a) >= 1_000_000


@pytest.mark.skipif(not HAS_EMBEDDED, reason="the embedded model's weights are not in this checkout")
def test_simulate_command_writes_report(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--oracle", "brighter", "--rounds", "3", "--eval-pairs", "4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["oracle"] == "brighter" and summary["clicks"] == 3
    report = json.loads((out / "report.json").read_text())
    assert set(report["checkpoints"][-1]["oracles"]) == set(ORACLES)
    assert report["base_fidelity"]["n"] == 4
    assert (out / "compare.png").stat().st_size > 0 and (out / "curve.png").stat().st_size > 0
    statuses = {json.loads(p.read_text())["status"] for p in (out / "session" / "rounds").glob("*/round.json")}
    assert statuses == {"applied"}
    assert main(["simulate", "--oracle", "brighter", "--rounds", "1", "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err


def test_unknown_oracle_lists_valid_ones(tmp_path, capsys):
    assert main(["simulate", "--oracle", "bluer", "--rounds", "1", "--out", str(tmp_path / "s")]) == 2
    assert "brighter" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_EMBEDDED, reason="the embedded model's weights are not in this checkout")
def test_lagged_simulation_trains_every_click_one_behind(tmp_path):
    """lag=1: each click is trained after the next batch is sampled; the last lands before the report."""
    from d3po_studio.core.simulate import run_simulation
    report = run_simulation(tmp_path / "sim", oracle="brighter", rounds=3, eval_pairs=2, lag=1, eval_at=(3,),
                            gradient_checkpointing=False)
    rounds = sorted((tmp_path / "sim" / "session" / "rounds").glob("*/round.json"))
    statuses = [json.loads(p.read_text())["status"] for p in rounds]
    assert statuses == ["applied"] * 3
    assert report["fresh_accuracy"][0] is None and len(report["fresh_accuracy"]) == 3  # click 1 trained at click 2


@pytest.mark.skipif(not HAS_EMBEDDED, reason="the embedded model's weights are not in this checkout")
def test_a_rolled_back_update_leaves_the_click_untrained_and_the_simulation_goes_on(tmp_path, monkeypatch):
    """A non-finite step (seen with fp16 weights on a GPU) rolls the update back; the simulation
    counts it, keeps going, and leaves a partial report at each evaluation."""
    from d3po_studio.core import update
    from d3po_studio.core.simulate import run_simulation
    real, calls = update.apply_gradients, []

    def nan_on_the_second(params, optimizer, grad_clip):
        calls.append(1)
        if len(calls) == 2:
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite gradient norm (nan)")
        return real(params, optimizer, grad_clip)
    monkeypatch.setattr(update, "apply_gradients", nan_on_the_second)
    report = run_simulation(tmp_path / "sim", oracle="brighter", rounds=3, eval_pairs=2, eval_at=(2, 3),
                            gradient_checkpointing=False, step_evidence=False)   # the optimizer's step
    assert report["rolled_back"] == 1 and len(report["checkpoints"]) == 2
    statuses = [json.loads(p.read_text())["status"]
                for p in sorted((tmp_path / "sim" / "session" / "rounds").glob("*/round.json"))]
    assert statuses.count("applied") == 2 and len(statuses) == 3
    partial = json.loads((tmp_path / "sim" / "partial.json").read_text())
    assert [c["clicks"] for c in partial["checkpoints"]] == [2, 3] and partial["rolled_back"] == 1
