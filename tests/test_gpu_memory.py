"""GPU memory without a GPU: the live-bytes tracker, its validation against real tensors, the
offload of the text encoders and VAE during an update, and the fit warning."""
import json

import pytest
import torch

from d3po_studio.core.memory import LiveBytes, offload_for_update


def test_live_bytes_counts_new_storages_once_and_frees_them():
    with LiveBytes("cpu") as live:
        a = torch.zeros(1000)                     # 4000 B
        with live.tagged("b"):
            b = torch.ones(250, dtype=torch.float64)   # 2000 B
        view = a[:10]                             # same storage: not counted again
        assert live.total == 6000 and live.by_tag["b"] == 2000
        del a, view
        assert live.total == 2000                 # freed when the storage dies
        c = torch.zeros(2000)                     # 8000 B: new peak 10000
        assert live.peak == 10000 and live.at_peak == {"other": 8000, "b": 2000}
        moved = live.track([c], "c")
        assert moved == 8000 and live.by_tag["c"] == 8000 and live.by_tag["other"] == 0
        del b, c
    assert live.total == 0 and live.peak == 10000


def test_live_bytes_reads_fake_items_as_one():
    from d3po_studio.bench.gpu_memory import fake_mode
    mode = fake_mode()
    with mode:
        x = torch.randn(3, requires_grad=True)
    with LiveBytes("cpu"):
        assert x.sum().item() == 1 and bool((x > 0).all()) is True


def test_fake_peak_equals_real_peak_on_tiny_model():
    """The method's validation: the same session update on the tiny SD1 pipeline with real and
    with fake tensors gives the same peak of live bytes (within 1%; measured ≈ 0.003%)."""
    from d3po_studio.bench.gpu_memory import measure
    kw = dict(kept=1, clicks=1, count_flops=False, dtype="float32", settings={"step_rms": None})
    real = measure("tiny-sd1", 64, "ours-no-offload", fake=False, **kw)
    fake = measure("tiny-sd1", 64, "ours-no-offload", fake=True, **kw)
    assert real["at_peak"]["UNet"] > 0 and real["at_peak"]["activations"] > 0
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.01)


def test_offload_moves_encoders_and_vae_out_and_back_even_on_error():
    from d3po_studio.bench.gpu_memory import build_pipeline, fake_mode
    mode = fake_mode()
    pipe = build_pipeline("tiny-sdxl", mode)       # fake weights: moving them costs nothing
    parts = (pipe.text_encoder, pipe.text_encoder_2, pipe.vae)
    with pytest.raises(RuntimeError, match="boom"):
        with offload_for_update(pipe, "cpu", host="meta"):
            assert all(p.device.type == "meta" for m in parts for p in m.parameters())
            assert pipe.unet.device.type == "cpu"
            raise RuntimeError("boom")
    assert all(p.device.type == "cpu" for m in parts for p in m.parameters())
    with offload_for_update(pipe, "cpu"):          # a CPU session: nothing moves
        assert pipe.vae.device.type == "cpu"


FAKE_MEASURED = {"sd1": {"size": 512, "weights": 2e9, "encoders": 0.5e9, "sampling": 0.5e9,
                         "update": {(True, "joint"): 2e9, (True, "split"): 1e9, (False, "joint"): 4e9}}}


def test_estimate_scales_activations_with_pixels_and_images(monkeypatch):
    from d3po_studio.core import memory
    monkeypatch.setattr(memory, "MEASURED", FAKE_MEASURED)
    at_native = memory.estimate_bytes("sd1", 512, 512)
    assert at_native == {"sampling": 3e9, "sampling_encoders_off": 3e9, "update": 4e9, "click": 4e9}
    assert memory.estimate_bytes("sd1", 1024, 512)["update"] == 2e9 + 2 * 2e9
    small = memory.estimate_bytes("sd1", 256, 256)              # an update's activations never shrink
    assert small["update"] == 4e9 and small["sampling"] == 2.5e9 + 0.5e9 / 4
    assert memory.estimate_bytes("sd1", 512, 512, n=4)["update"] == 2e9 + 2 * 2e9     # two pairs' graphs
    assert memory.estimate_bytes("sd1", 512, 512, n=4, backward="split")["update"] == 2e9 + 1e9
    with pytest.raises(ValueError, match="sd1"):
        memory.estimate_bytes("sd3", 512, 512)


def test_estimate_of_a_sliced_decode_and_of_the_text_encoders_moved_off_for_it(monkeypatch):
    """With "denoise" measured, only the denoising steps grow with n (the decode is one image at a
    time); a click needs the sampling with the text encoders on the host during the decode."""
    from d3po_studio.core import memory
    m = {"sd1": {**FAKE_MEASURED["sd1"], "sampling": 1e9, "denoise": 0.2e9, "text_encoders": 0.3e9}}
    est = memory.estimate_bytes("sd1", 512, 512, measured=m)
    assert est["sampling"] == 2.5e9 + 1e9 and est["sampling_encoders_off"] == 2.5e9 + 0.7e9
    assert est["click"] == est["update"] == 4e9
    assert memory.estimate_bytes("sd1", 512, 512, n=8, measured=m)["sampling"] == 2.5e9 + 1e9     # 0.8e9 < 1e9
    assert memory.estimate_bytes("sd1", 512, 512, n=20, measured=m)["sampling_encoders_off"] == 2.5e9 + 2e9
    assert memory.estimate_bytes("sd1", 256, 256, n=1, measured=m)["sampling"] == 2.5e9 + 0.25e9


def test_fit_warning_says_what_to_change(monkeypatch):
    from d3po_studio.core import memory
    monkeypatch.setattr(memory, "MEASURED", FAKE_MEASURED)
    assert memory.fit_warning("sd1", 512, 512, free_bytes=4.5e9) is None
    assert memory.fit_warning("sd1", 512, 512, free_bytes=None) is None          # not a GPU
    split = memory.fit_warning("sd1", 512, 512, free_bytes=3.5e9)
    assert "4.0 GB" in split and "3.5 GB" in split and "backward='split'" in split and "px" not in split[-30:]
    ckpt = memory.fit_warning("sd1", 512, 512, free_bytes=4.5e9, gradient_checkpointing=False)
    assert "gradient_checkpointing=True (about 4.0 GB)" in ckpt
    smaller = memory.fit_warning("sd1", 768, 512, free_bytes=3.0e9)   # 768×512 does not fit even split
    assert "use 384×576 px" in smaller                   # width×height, same aspect, ≤ 512² pixels
    assert "even 256 px" in memory.fit_warning("sd1", 512, 512, free_bytes=1e9)


def test_estimate_adds_the_cuda_excess_to_the_activations_it_was_measured_with():
    """cuda_update on the update's activations and the denoising steps', cuda_decode on the decode's;
    both scale with the pixels as the activations do."""
    from d3po_studio.core import memory
    m = {"sd1": {**FAKE_MEASURED["sd1"], "sampling": 1e9, "denoise": 0.2e9, "text_encoders": 0.3e9,
                 "cuda_update": 0.1e9, "cuda_decode": 0.5e9}}
    est = memory.estimate_bytes("sd1", 512, 512, measured=m)
    assert est["sampling"] == 2.5e9 + 1.5e9 and est["sampling_encoders_off"] == 2.5e9 + 1.2e9
    assert est["update"] == 2e9 + 2.1e9 and est["click"] == 4.1e9
    assert memory.estimate_bytes("sd1", 256, 256, measured=m)["sampling"] == 2.5e9 + 1.5e9 / 4
    assert memory.estimate_bytes("sd1", 512, 512, n=20, measured=m)["sampling"] == 2.5e9 + 2e9 + 0.1e9


def test_measured_figures_are_the_benchmark_results():
    """core.memory.MEASURED (what fit_warning uses) is exactly what bench/gpu_memory.py measured with
    fake tensors, plus the CUDA excess of the H200 run (bench/results/gpu_memory_h200.json)."""
    from d3po_studio.bench.gpu_memory import RESULTS
    from d3po_studio.bench.gpu_memory_report import CUDA_RESULTS, measured_constants
    from d3po_studio.core.memory import MEASURED
    results = json.loads(RESULTS.read_text())["results"]
    device = json.loads(CUDA_RESULTS.read_text())["results"]
    assert MEASURED and MEASURED == measured_constants(results, device)
    assert all({"cuda_update", "cuda_decode"} <= set(m) for m in MEASURED.values())


def test_the_estimate_does_not_under_promise_the_cuda_peaks_measured_on_the_h200():
    """At each family's native size, the estimate of ours' update and sampling is at or above the
    CUDA allocator's peak measured on the GPU, and within 1% of it; SDXL at 1024 px then fits a 12 GB
    card only with the text encoders off the GPU during the decode (Session.sample does it)."""
    from d3po_studio.bench.gpu_memory_report import CUDA_RESULTS
    from d3po_studio.core import memory
    rows = [r for r in json.loads(CUDA_RESULTS.read_text())["results"] if r["variant"] == "ours"
            and r["family"] in memory.MEASURED]
    assert {r["family"] for r in rows} == {"sd1", "sd2", "sdxl"}
    for r in rows:
        est = memory.estimate_bytes(r["family"], r["size"], r["size"])
        for key, cuda in (("update", r["device_peak_bytes"]), ("sampling", r["sampling"]["device_peak_bytes"])):
            assert cuda <= est[key] <= 1.01 * cuda, (r["family"], key, est[key], cuda)
    sdxl = memory.estimate_bytes("sdxl", 1024, 1024)
    card = 12 * 2 ** 30 - 0.5e9                          # a 12 GB card less the CUDA context
    assert sdxl["sampling"] > card > sdxl["click"] == sdxl["sampling_encoders_off"] > sdxl["update"]
    assert memory.fit_warning("sdxl", 1024, 1024, card) is None
    assert memory.fit_warning("sdxl", 1024, 1024, 10e9).startswith("A click on sdxl at 1024×1024 px")


def test_benchmark_section_renders_from_its_results(tmp_path):
    from d3po_studio.bench import report
    from d3po_studio.bench.gpu_memory import RESULTS
    from d3po_studio.bench.gpu_memory_report import write_all
    payload = json.loads(RESULTS.read_text())
    doc = tmp_path / "benchmarks.md"
    write_all(payload["results"], payload["command"], doc, tmp_path / "r.json")
    section = report.read_section("gpu_memory", doc)
    assert "### SD 1.5 at 512×512 px" in section and "Update, ours ÷ official" in section
    assert "| update (2 clicks) | ours |" in section and "| sampling a pair | ours |" in section
    assert "ESTIMATE from counted FLOPs" in section and "RTX 4090" in section
    assert json.loads((tmp_path / "r.json").read_text()) == payload


def test_a_session_that_would_not_fit_says_so_at_open(tmp_path, tiny_sd1, monkeypatch, caplog):
    """Session.open notes (and logs) fit_warning's advice when the GPU's free memory is too small."""
    import d3po_studio.core.memory as memory
    from d3po_studio import Session
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 1e9)       # a 1 GB card
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=2, dtype="float32",
                      height=512, width=512) as s:
        assert s.memory_warning() and "GB" in s.memory_warning()
        assert s.info()["notes"] == [s.memory_warning()]
        assert s.pipe.vae.use_slicing                                              # decode one image at a time
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: None)        # a CPU
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1) as s:
        assert s.memory_warning() is None and s.info()["notes"] == []


def test_device_mode_measures_real_tensors_and_writes_after_each_row(tmp_path, capsys):
    """--device runs the rows with real tensors (here the CPU, a tiny pipeline): peaks, seconds,
    FLOPs, the optimizer stepped (LoRA changed, its states alive at the peak), the auto choices
    logged; results and doc written; "ours" is timed at all kept steps."""
    from d3po_studio.bench import report
    from d3po_studio.bench.gpu_memory import main
    results, doc = tmp_path / "r.json", tmp_path / "r.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a tiny model: 2 threads on a loaded 2-core machine took 4× longer
    try:
        main(["--device", "cpu", "--plan", "tiny-sd1:16", "--variants", "ours", "--budget-s", "600", "--steps", "4",
              "--results", str(results), "--doc", str(doc)])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(results.read_text())
    (row,) = payload["results"]
    assert row["lora_changed"] and row["at_peak"]["optimizer states"] > 0 and row["at_peak"]["activations"] > 0
    assert row["failed_clicks"] == []
    assert row["device_peak_bytes"] is None and row["peak_bytes"] > row["at_peak"]["UNet"] > 0   # no CUDA here
    assert [t["kept_steps"] for t in row["timed"]] == [4] and row["timed"][0]["update_seconds"] > 0
    assert row["sampling"]["timed_seconds"] > 0 and row["flops_per_kept_step"] > 0
    assert any(n.startswith("optimizer: ") for n in row["runtime_notes"])
    section = report.read_section("gpu_memory", doc)
    assert "measured on cpu (no GPU)" in section and "| tiny-sd1 at 16 px | ours | update |" in section
    assert "measured with fake tensors" in section                  # the fake-tensor tables follow


def test_device_plan_records_a_failed_row_goes_on_and_stops_at_the_budget(monkeypatch):
    from d3po_studio.bench import gpu_memory_device as gpu_memory
    calls, saved = [], []

    def fake_measure(family, size, name, device, **kw):
        calls.append((family, name, kw["fractions"]))
        if name == "official":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"variant": name, "family": family, "size": size, "peak_bytes": 1e9, "device_peak_bytes": None,
                "timed": [{"update_seconds": 1.0, "kept_steps": 20}]}
    monkeypatch.setattr(gpu_memory, "measure_on_device", fake_measure)
    plan = [("sdxl:1024", "ours"), ("sdxl:1024", "official"), ("sd1:512", "ours")]
    rows = gpu_memory.run_on_device(plan, "cpu", log=lambda line: None, on_result=lambda r: saved.append(len(r)))
    assert saved == [1, 2, 3] and "OutOfMemoryError" in rows[1]["error"] and "peak_bytes" in rows[2]
    assert calls[0][2] == (1.0, 0.15) and calls[1][2] == calls[2][2] == (1.0,)   # SDXL's default fraction, ours only
    assert gpu_memory.run_on_device(plan, "cpu", budget_s=-1, log=lambda line: None) == []
    clock = iter([0, 0, 5, 5, 5, 5, 5, 5])          # each row "takes" 5 s by its wall_seconds below
    monkeypatch.setattr(gpu_memory.time, "perf_counter", lambda: next(clock, 5))
    monkeypatch.setattr(gpu_memory, "measure_on_device", lambda family, size, name, device, **kw: {
        "variant": name, "family": family, "size": size, "error": "x", "wall_seconds": 5.0})
    rows = gpu_memory.run_on_device(plan, "cpu", budget_s=8, log=lambda line: None)
    assert [(r["family"], r["variant"]) for r in rows] == [("sdxl", "ours"), ("sd1", "ours")]   # SDXL's next: 5 + 5 > 8
    assert gpu_memory.parse_device_plan(None, None) == gpu_memory.DEVICE_PLAN
    assert gpu_memory.DEVICE_PLAN[:2] == [("sdxl:1024", "ours"), ("sd1:512", "ours")]


def test_a_non_finite_click_is_recorded_and_the_lora_set_back():
    from d3po_studio.bench.gpu_memory_device import _click
    p = torch.nn.Parameter(torch.ones(3))

    def run(kind, traj, **kw):
        with torch.no_grad():
            p.fill_(float("nan"))
        raise FloatingPointError("the optimizer step made the LoRA non-finite")
    run.params, failed = [p], []
    _click(run, None, failed, [torch.zeros(3)])
    assert failed == ["the optimizer step made the LoRA non-finite"] and torch.equal(p.detach(), torch.zeros(3))


def test_device_section_puts_cuda_peaks_beside_the_fake_ones(tmp_path):
    """The tables as they come from a GPU (CUDA peaks present), with the fake figures of RESULTS."""
    from d3po_studio.bench import report
    from d3po_studio.bench.gpu_memory import TAGS
    from d3po_studio.bench.gpu_memory_device import write_device
    at_peak = {tag: 1e8 for tag in TAGS}

    def row(variant, cuda, timed, sampling=True):
        r = {"variant": variant, "family": "sdxl", "size": 1024, "peak_bytes": cuda * 0.99, "device_peak_bytes": cuda,
             "at_peak": at_peak, "flops_fixed": 1e14, "flops_per_kept_step": 1e14, "failed_clicks": [],
             "timed": [{"train_fraction": f, "kept_steps": k, "update_seconds": s} for f, k, s in timed]}
        if sampling:
            r["sampling"] = {"peak_bytes": 9e9, "device_peak_bytes": 1e10, "at_peak": at_peak, "timed_seconds": 2.0}
        return r
    rows = [row("ours", 8e9, [(1.0, 20, 5.0), (0.15, 3, 1.0)]), row("official", 6.4e10, [(1.0, 20, 10.0)]),
            row("ours-split", 7e9, [(1.0, 20, 7.0)], sampling=False),
            {"variant": "ours-adamw32", "family": "sd1", "size": 512, "error": "OutOfMemoryError: boom"}]
    rows[2]["failed_clicks"] = ["non-finite loss (nan)"]
    encoders_off = row("ours-encoders-off", 0, [])
    del encoders_off["timed"], encoders_off["peak_bytes"], encoders_off["device_peak_bytes"]
    rows.append({**encoders_off, "sampling": {**encoders_off["sampling"], "device_peak_bytes": 8.5e9}})
    env = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "packages": "diffusers 0.42.1", "date": "2026-11-26"}
    runs = [{"run": 1, "started": "2026-11-26 03:56 UTC", "code": "abc1234", "command": "c1",
             "skipped": ["sdxl:1024 ours-split", "sd1:512 official"]}]              # ours-split ran in another run
    write_device(rows, "cmd", env, tmp_path / "d.md", tmp_path / "d.json", runs, ["**A note.** Its text."])
    section = report.read_section("gpu_memory", tmp_path / "d.md")
    assert "- run 1, started 2026-11-26 03:56 UTC, code at about commit abc1234: `c1`" in section
    assert "in every run that planned them: sd1:512 official;" in section and "**A note.** Its text." in section
    assert "| SDXL at 1024 px | ours | sampling a pair | 2 at once | 1.00 GB | 477 |" in section   # 1e9 / 2 / 1024²
    assert "| SDXL at 1024 px | update | 8.10 GB | 8.00 GB | +1.3% |" in section            # core.memory's estimate
    assert "SDXL at 1024 px on a 12 GB card" in section and "**Which figures are which.**" in section
    assert "measured on NVIDIA H200" in section and "torch 2.11.0+cu130" in section
    assert "| SDXL at 1024 px | ours | update | **8.00 GB** | 7.92 GB | 7.86 GB | 0.98 | 0.12× |" in section
    assert "| SDXL at 1024 px | ours | sampling a pair | **10.00 GB** | 9.00 GB | 10.39 GB | 1.04 | 1.00× |" in section
    assert "| 3 (train_fraction 0.15) | **1.00 s** |" in section and "| **5.00 s** | 2100 | 420 | 0.50× |" in section
    assert "OutOfMemoryError: boom" in section and "1 click(s) not stepped" in section
    assert "| SDXL at 1024 px | ours-encoders-off | sampling a pair | **8.50 GB** | 9.00 GB | 8.75 GB | 1.03 |" in section
    assert "| SDXL at 1024 px | ours-encoders-off | 2.00 s (20) | — |" in section
    assert json.loads((tmp_path / "d.json").read_text())["environment"] == env
    assert json.loads((tmp_path / "d.json").read_text())["runs"] == runs
    from d3po_studio.bench.gpu_memory import main
    (tmp_path / "d.md").unlink()
    main(["--device", "cuda", "--rewrite", "--results", str(tmp_path / "d.json"), "--doc", str(tmp_path / "d.md")])
    assert report.read_section("gpu_memory", tmp_path / "d.md") == section


def test_a_new_sdxl_session_trains_its_family_share_of_the_kept_steps(tmp_path, tiny_sdxl, tiny_sd1, caplog):
    """SDXL's default train_fraction (core/opening.py FAMILY_DEFAULTS) applies to a new session that
    does not set it, said once in its notes and the log; a given value and a resumed session keep theirs."""
    import logging

    from d3po_studio import Session
    from d3po_studio.core.opening import FAMILY_DEFAULTS
    fraction = FAMILY_DEFAULTS["sdxl"]["train_fraction"]
    with caplog.at_level(logging.WARNING, logger="d3po_studio"):
        with Session.open(tmp_path / "a", model="tiny-sdxl", pipeline=tiny_sdxl, dtype="float32") as s:
            assert s.settings.train_fraction == fraction == 0.15
            (note,) = s.info()["notes"]
            assert note.startswith("train_fraction=0.15, the default for sdxl") and "train_fraction=..." in note
    assert sum("train_fraction=0.15" in r.getMessage() for r in caplog.records) == 1
    with Session.open(tmp_path / "a", pipeline=tiny_sdxl, model="tiny-sdxl") as s:       # resumed: stored value
        assert s.settings.train_fraction == fraction and s.info()["notes"] == []
    with Session.open(tmp_path / "b", model="tiny-sdxl", pipeline=tiny_sdxl, dtype="float32", train_fraction=1.0) as s:
        assert s.settings.train_fraction == 1.0 and s.info()["notes"] == []
    with Session.open(tmp_path / "c", model="tiny-sd1", pipeline=tiny_sd1, dtype="float32") as s:
        assert s.settings.train_fraction == 1.0 and s.info()["notes"] == []


def test_the_text_encoders_wait_on_the_host_during_the_decode_only_when_sampling_would_not_fit(
        tmp_path, tiny_sdxl, monkeypatch):
    """The VAE decode is the sampling's peak; Session.sample and render move the text encoders
    off the GPU for it when core/memory.py estimates the sampling would not fit otherwise."""
    from contextlib import contextmanager

    import d3po_studio.core.memory as memory
    from d3po_studio import Session
    moved = []

    @contextmanager
    def spy(pipe, device, names, host="cpu"):
        moved.append(names)
        yield pipe
    monkeypatch.setattr(memory, "offloaded", spy)
    monkeypatch.setattr(memory, "MEASURED", {"sdxl": FAKE_MEASURED["sd1"]})
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 2.52e9)   # sampling: 2.5e9 + 0.5e9 × pixels
    with Session.open(tmp_path / "s", model="tiny-sdxl", pipeline=tiny_sdxl, steps=2, dtype="float32",
                      height=64, width=64) as s:
        s.sample("a red circle", n=2, seed=0)                         # 2.508e9 at 64 px: fits
        assert moved == []
        s.sample("a red circle", n=2, seed=0, height=128, width=128)  # 2.531e9
        assert moved == [memory.TEXT_ENCODERS]
        s.render("a red circle", seed=0, n=1, height=128, width=128)  # one image: 2.516e9 fits
        assert moved == [memory.TEXT_ENCODERS]


def test_a_failed_device_row_is_recorded_and_frees_its_pipeline(monkeypatch):
    """A row that raises (on the H100: xformers without kernels, at the pipeline's switch to it)
    records its error, the plan goes on, and none of its models stays alive to count in the next
    row's peak."""
    import gc
    import weakref

    from d3po_studio.bench import gpu_memory_device
    from d3po_studio.core import opening

    built = []

    def build_and_watch(*args, **kwargs):
        pipe = build_pipeline(*args, **kwargs)
        built.extend(weakref.ref(m) for m in (pipe, pipe.unet, pipe.vae, pipe.text_encoder))
        return pipe

    def no_kernels(pipe, attention):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
    build_pipeline = gpu_memory_device.build_pipeline
    monkeypatch.setattr(gpu_memory_device, "build_pipeline", build_and_watch)
    monkeypatch.setattr(opening, "apply_attention", no_kernels)
    rows = gpu_memory_device.run_on_device([("tiny-sd1:64", "ours"), ("tiny-sd1:64", "ours-sdpa")], "cpu", steps=2,
                                           log=lambda line: None)
    assert [r["error"] for r in rows] == ["NotImplementedError: No operator found for "
                                          "`memory_efficient_attention_forward`"] * 2
    gc.collect()
    assert len(built) == 8 and all(ref() is None for ref in built)
