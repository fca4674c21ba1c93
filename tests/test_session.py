"""Session behaviour on tiny pipelines: sampling, updates, undo, rollback, persistence, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file

from d3po_studio import Session
from d3po_studio.core.errors import ConfigError, ModelLoadError, SessionError, UpdateError
from d3po_studio.core.lora import add_lora, lora_disabled, lora_state
from d3po_studio.core.sampling import sample_trajectory
from d3po_studio.core.tiny import tiny_pipeline


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=emb).sample


def test_eta_zero_sampling_reproduces_diffusers_ddim_pipeline(tiny_sd1):
    traj = sample_trajectory(tiny_sd1, "a red circle", "", 2, seed=3, steps=5, guidance=4.0, eta=0.0,
                             height=16, width=16)
    x_T = traj.latents[0].float()
    ours = traj.latents[-1].float()
    theirs = tiny_sd1("a red circle", num_inference_steps=5, guidance_scale=4.0, eta=0.0, height=16, width=16,
                      latents=x_T, num_images_per_prompt=2, output_type="latent").images
    # kept steps are stored in fp16: compare at fp16 resolution
    torch.testing.assert_close(ours, theirs.half().float(), rtol=1e-3, atol=2e-3)
    assert torch.equal(traj.latents[0, 0], traj.latents[0, 1])         # one shared x_T


def test_sampling_is_reproducible_and_images_diverge(tiny_session):
    a = tiny_session.sample("a red circle", n=3, seed=5)
    b = tiny_session.sample("a red circle", n=3, seed=5)
    assert torch.equal(a.trajectory.latents, b.trajectory.latents)
    assert not torch.equal(a.trajectory.latents[-1, 0], a.trajectory.latents[-1, 1])   # fresh noise per step
    assert a.trajectory.latents.dtype == torch.float16 and a.trajectory.latents.device.type == "cpu"
    assert a.trajectory.latents.shape == (5, 3, 4, 8, 8) and len(a.images) == 3


def test_lora_off_is_exactly_the_base(tiny_sd1):
    unet = tiny_sd1.unet
    base = _unet_out(unet)
    params = add_lora(unet, rank=4, alpha=4, targets=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.normal_()
    assert not torch.equal(_unet_out(unet), base)
    with lora_disabled(unet):
        assert torch.equal(_unet_out(unet), base)
    assert not torch.equal(_unet_out(unet), base)      # the context manager switched it back on


def test_updates_change_every_lora_tensor_and_no_base_tensor(tiny_session):
    unet = tiny_session.pipe.unet
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    lora_before = lora_state(unet)
    for seed in range(3):
        tiny_session.prefer(tiny_session.sample("a red circle", n=2, seed=seed), best=0)
    lora_after = lora_state(unet)
    unchanged = [k for k in lora_before if torch.equal(lora_before[k], lora_after[k])]
    assert not unchanged, f"LoRA tensors that did not change: {unchanged}"
    for k, v in unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    assert all(p.dtype == torch.float32 for p in tiny_session.params)


def test_bf16_base_keeps_fp32_lora(tmp_path):
    s = Session.open(tmp_path / "s", model="tiny", pipeline=tiny_pipeline("sd1"), steps=3, dtype="bfloat16")
    assert s.pipe.unet.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in s.params)
    report = s.prefer(s.sample("x", seed=0), best=1)
    assert report["updates"] == 1 and report["grad_norm"] > 0
    s.close()


def _optimizer_tensors(opt):
    """Every tensor in the optimizer state, flattened (bitsandbytes nests its quantized state)."""
    out = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            out[prefix] = value.clone()
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)

    walk("state", opt.state_dict()["state"])
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_undo_restores_lora_and_optimizer_bit_exactly(tmp_path, optimizer):
    s = Session.open(tmp_path / "s", model="tiny", pipeline=tiny_pipeline("sd1"), steps=3,
                     dtype="float32", optimizer=optimizer, step_evidence=False)   # the optimizer's step
    s.prefer(s.sample("a", seed=0), best=0)
    lora, opt = lora_state(s.pipe.unet), _optimizer_tensors(s.optimizer)
    assert opt, "the optimizer has state after one update"
    s.prefer(s.sample("a", seed=1), best=1)
    assert s.undo() == {"updates": 1, "undone_round": s.history()[-1]["id"]}
    after = lora_state(s.pipe.unet)
    assert all(torch.equal(lora[k], after[k]) for k in lora)
    opt_after = _optimizer_tensors(s.optimizer)
    assert opt.keys() == opt_after.keys() and all(torch.equal(opt[k], opt_after[k]) for k in opt)
    assert s.history()[-1]["status"] == "undone"
    s.undo()
    assert s.updates == 0 and all(torch.equal(v, torch.zeros_like(v)) for k, v in lora_state(s.pipe.unet).items()
                                  if "lora_B" in k)
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo()
    s.close()


def test_injected_nan_gradient_rolls_back(tiny_session):
    s = tiny_session
    s.prefer(s.sample("a", seed=0), best=0)
    lora, opt = lora_state(s.pipe.unet), _optimizer_tensors(s.optimizer)
    batch = s.sample("a", seed=1)

    def poison(i, total):          # called after each step's backward: inject a NaN gradient
        s.params[0].grad.view(-1)[0] = float("nan")

    with pytest.raises(UpdateError, match="rolled back"):
        s.prefer(batch, best=1, progress=poison)
    after = lora_state(s.pipe.unet)
    assert all(torch.equal(lora[k], after[k]) for k in lora)
    assert all(torch.equal(v, _optimizer_tensors(s.optimizer)[k]) for k, v in opt.items())
    assert s.updates == 1 and s.history()[-1]["status"] == "rolled_back"   # the click stays in the log


def test_injected_nan_latent_rolls_back(tiny_session):
    s = tiny_session
    batch = s.sample("a", seed=2)
    batch.trajectory.latents[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(UpdateError, match="non-finite"):
        s.prefer(batch, best=0)
    assert s.updates == 0 and s.folder.head() is None


def test_ranking_and_none(tiny_session):
    s = tiny_session
    report = s.prefer(s.sample("a", n=3, seed=0), ranking=[2, 0, 1])
    assert report["pairs"] == 3
    assert s.prefer(s.sample("a", n=2, seed=1), none=True) == {"skipped": True, "updates": 1}
    statuses = [r["status"] for r in s.history()]
    assert statuses == ["applied", "skipped"]
    assert s.history()[1]["choice"] == {"none": True}


def test_session_folder_holds_enough_to_replay(tiny_session):
    s = tiny_session
    batch = s.sample("a blue square", n=2, seed=11, negative_prompt="blurry")
    s.prefer(batch, best=1)
    rdir = s.folder.root / "rounds" / batch.id
    rec = json.loads((rdir / "round.json").read_text())
    assert rec["prompt"] == "a blue square" and rec["negative_prompt"] == "blurry" and rec["seed"] == 11
    assert rec["choice"] == {"best": 1} and rec["status"] == "applied" and rec["sampling"]["steps"] == 4
    assert (rdir / "image_0.png").exists() and (rdir / "image_1.png").exists()
    traj = load_file(str(rdir / "trajectory.safetensors"))
    assert torch.equal(traj["latents"], batch.trajectory.latents)
    meta = json.loads((s.folder.root / "session.json").read_text())
    assert meta["settings"]["lr"] == 1e-2 and meta["model"] == "tiny-sd1"
    reloaded = s.batch(batch.id)
    assert torch.equal(reloaded.trajectory.latents, batch.trajectory.latents)


def test_reopen_resumes_and_fixed_settings_are_refused(tmp_path):
    folder = tmp_path / "s"
    s = Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"), steps=3, dtype="float32")
    s.prefer(s.sample("a", seed=0), best=0)
    lora = lora_state(s.pipe.unet)
    with pytest.raises(SessionError, match="open in another"):
        Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"))
    s.close()
    with pytest.raises(ConfigError, match="fixed after the first update"):
        Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"), lora_rank=8)
    s2 = Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"), steps=5)
    assert s2.updates == 1 and s2.settings.steps == 5
    assert all(torch.equal(lora[k], v) for k, v in lora_state(s2.pipe.unet).items())
    s2.close()


def test_bad_input_raises_clear_errors_and_changes_nothing(tiny_session, tmp_path):
    s = tiny_session
    batch = s.sample("a", seed=0)
    with pytest.raises(ConfigError, match="at least 2 images"):
        s.sample("a", n=1)
    with pytest.raises(ConfigError, match="out of range"):
        s.prefer(batch, best=2)
    with pytest.raises(ConfigError, match="exactly one of"):
        s.prefer(batch, best=0, ranking=[0, 1])
    with pytest.raises(ConfigError, match="unknown export format|kohya"):
        s.export_lora(tmp_path / "x.safetensors", format="ckpt")
    assert s.updates == 0 and s.history()[-1]["status"] == "shown"
    s.prefer(batch, best=0)
    with pytest.raises(SessionError, match="already has a preference"):
        s.prefer(batch, best=1)
    assert s.updates == 1
    with pytest.raises(SessionError, match="not a round id"):
        s.batch("../../etc")
    with pytest.raises(ConfigError, match="eta"):
        Session.open(tmp_path / "t", model="tiny", pipeline=tiny_pipeline("sd1"), eta=0.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        Session.open(tmp_path / "t", model="tiny", pipeline=tiny_pipeline("sd1"), learning_rate=1)


def test_missing_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        Session.open(tmp_path / "s", model=str(missing))
    # the failed open left the folder unlocked
    Session.open(tmp_path / "s", model="tiny", pipeline=tiny_pipeline("sd1")).close()


def test_sdxl_sample_prefer_export(tmp_path, tiny_sdxl):
    s = Session.open(tmp_path / "s", model="tiny-sdxl", pipeline=tiny_sdxl, steps=3, dtype="float32")
    assert s.meta["family"] == "sdxl"
    batch = s.sample("a red circle", n=2, seed=0)
    assert set(batch.trajectory.cond) >= {"pooled", "time_ids"}
    s.prefer(batch, best=0)
    report = s.prefer(s.sample("a red circle", n=2, seed=1), best=1)
    assert report["updates"] == 2 and report["grad_norm"] > 0
    path = s.export_lora(tmp_path / "sdxl.safetensors", format="kohya")
    keys = load_file(str(path)).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    s.close()


def test_split_backward_gives_the_joint_update(tmp_path):
    """Settings.backward="split" (one image's graph at a time) computes the same gradient.

    Compared through the update report (loss and the norm of the accumulated gradient, before
    clipping): LoRA weights after Adam are not comparable, since Adam's first step is
    lr·sign(g) and float-order noise flips the sign of near-zero gradient elements.
    tests/test_bench.py compares the gradients element by element.
    """
    from d3po_studio.core.split import accumulate_d3po_gradients_split, gradient_function
    assert gradient_function("split") is accumulate_d3po_gradients_split
    reports = {}
    for backward in ("joint", "split"):
        s = Session.open(tmp_path / backward, model="tiny", pipeline=tiny_pipeline("sd1"), steps=3,
                         dtype="float32", optimizer="adamw", backward=backward)
        reports[backward] = s.prefer(s.sample("a", n=3, seed=0), ranking=[2, 0, 1])
        s.close()
    for key in ("loss", "grad_norm", "logratio_winner", "logratio_loser"):
        assert reports["split"][key] == pytest.approx(reports["joint"][key], rel=1e-4, abs=1e-7), key


def test_interrupt_during_update_rolls_back_and_marks_the_round(tiny_session):
    s = tiny_session
    lora = lora_state(s.pipe.unet)

    class Interrupted(Exception):
        pass

    def interrupt(i, total):
        if i == 2:
            raise Interrupted("stop")

    with pytest.raises(Interrupted):
        s.prefer(s.sample("a", seed=0), best=0, progress=interrupt)
    assert all(p.grad is None for p in s.params)
    assert all(torch.equal(lora[k], v) for k, v in lora_state(s.pipe.unet).items())
    assert s.updates == 0 and s.history()[-1]["status"] == "interrupted"
    s.prefer(s.sample("a", seed=1), best=0)          # and the session goes on
    assert s.updates == 1
