"""How long a click takes on the embedded model, synchronous (update, then the next pair) and
pipelined (the next pair first, the update behind it: `prefer(wait=False)` then `sample`), with
the time until each click's update has landed, the update compared to its floor, and the memory
of 1 vs 4 sessions on one model in one process.

    OMP_NUM_THREADS=1 nice -n 10 python -m d3po_studio.bench.latency   # embedded model if its weights exist
    python -m d3po_studio.bench.latency --model tiny --clicks 2 --doc /tmp/b.md   # smoke run

Without the embedded weights, "auto" measures the embedded architecture with random weights
(the same computation; the section says which).

The floor of an update is what it cannot avoid: per trained step one reference forward (LoRA
off, no graph) and one policy forward + backward, timed directly on the same UNet, batch and
settings. Everything else (loss, optimizer step, the checkpoint written for undo, the round's
log) is overhead. Writes the "latency" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import torch

from . import report

PROMPTS = ["a red circle", "a blue square on white background", "a large green triangle", "a small yellow circle"]
MODEL_NOTES = {"embedded-random": " (the embedded model's architecture and sampling settings with random "
                                  "weights, because its trained weights were not there yet: the same computation)",
               "tiny": " (the tiny test pipeline: a smoke run, not a figure to quote)"}


def open_session(model: str, folder, **settings):
    """A session on ``model``: "embedded"; "embedded-random" (the embedded model's architecture and
    sampling defaults with random weights: the same compute, for when its weights are missing);
    "tiny" (the tiny test pipeline, for smoke runs); or a model path. ``settings`` override the
    defaults."""
    from ..core.session import Session
    if model == "tiny":
        return Session.open(folder, model="tiny-sd1", pipeline=_pipeline(model),
                            **{"steps": 10, "guidance": 4.0, **settings})
    if model == "embedded-random":
        from ..core.embedded import DEFAULTS
        return Session.open(folder, model=model, pipeline=_pipeline(model), **{**DEFAULTS, **settings})
    return Session.open(folder, model=model, **settings)


@functools.lru_cache(maxsize=None)
def _pipeline(model: str):
    """One pipeline per stand-in model per process, so its sessions share it as they share a
    loaded model (core/pool.py)."""
    if model == "tiny":
        from ..core.tiny import tiny_pipeline
        return tiny_pipeline("sd1")
    return _embedded_architecture(tempfile.mkdtemp(prefix="d3po-tokenizer-"))


def _embedded_architecture(folder):
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..core.embedded.train import SCHEDULER_CONFIG, build_tokenizer, make_models
    tokenizer = build_tokenizer(Path(folder) / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        vae, text_encoder, unet = make_models(tokenizer, seed=0)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def embedded_available() -> bool:
    from ..core.embedded import WEIGHTS_DIR
    return (WEIGHTS_DIR / "model_index.json").exists()


def update_floor(session, batch) -> float:
    """Seconds of the unavoidable work of one update of ``batch``'s pair, timed directly."""
    from ..core.lora import lora_disabled
    from ..core.sampling import make_scheduler
    from ..core.update import step_logprobs, steps_to_train
    s, traj, unet = session.settings, batch.trajectory, session.pipe.unet
    scheduler = make_scheduler(session.pipe, len(traj.timesteps))
    kw = dict(guidance=s.guidance if s.guidance_in_update else 1.0, eta=s.eta, reduction=s.reduction,
              device=session.runtime.device)
    start = time.perf_counter()
    for k in steps_to_train(traj, scheduler, s.eta, 1.0, None):
        with torch.no_grad(), lora_disabled(unet):
            step_logprobs(unet, scheduler, traj, k, [0, 1], **kw)
        step_logprobs(unet, scheduler, traj, k, [0, 1], **kw).sum().backward()
    seconds = time.perf_counter() - start
    session.optimizer.zero_grad(set_to_none=True)
    return seconds


def measure(session, clicks: int = 7, warmup: int = 1) -> dict:
    """Median seconds over ``clicks`` clicks (after ``warmup`` unrecorded ones)."""
    rows = []
    batch = session.sample(PROMPTS[0], n=2, seed=0)
    for i in range(warmup + clicks):
        floor = update_floor(session, batch)
        t0 = time.perf_counter()
        rep = session.prefer(batch, best=i % 2)
        t1 = time.perf_counter()
        batch = session.sample(PROMPTS[(i + 1) % len(PROMPTS)], n=2, seed=i + 1)
        t2 = time.perf_counter()
        if i >= warmup:
            rows.append({"update": rep["seconds"], "prefer": t1 - t0, "sample": t2 - t1,
                         "click_to_next": t2 - t0, "floor": floor})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"median": med, "rows": rows, "clicks": clicks, "settings": session.settings.to_dict(),
            "runtime": session.runtime.describe(), "model": session.meta["model"],
            "trainable_parameters": sum(p.numel() for p in session.params), "threads": torch.get_num_threads()}


def measure_pipelined(session, clicks: int = 7, warmup: int = 1) -> dict:
    """Median seconds of the app's click: ``prefer(wait=False)`` then ``sample`` of the next pair
    (click → next pair), and click → that click's update landed (``wait()`` returning it). The
    next click comes once the update has landed, as when the artist looks at the pair longer
    than an update takes."""
    rows = []
    batch = session.sample(PROMPTS[0], n=2, seed=100)
    for i in range(warmup + clicks):
        t0 = time.perf_counter()
        queued = session.prefer(batch, best=i % 2, wait=False)
        batch = session.sample(PROMPTS[(i + 1) % len(PROMPTS)], n=2, seed=101 + i)
        t1 = time.perf_counter()
        [landed] = session.wait()
        t2 = time.perf_counter()
        assert landed["round"] == queued["round"] and "error" not in landed, landed
        if i >= warmup:
            rows.append({"click_to_next": t1 - t0, "click_to_landed": t2 - t0, "update": landed["seconds"]})
    return {"median": {k: statistics.median(r[k] for r in rows) for k in rows[0]}, "rows": rows, "clicks": clicks}


def measure_http(model: str, clicks: int = 10, warmup: int = 1) -> dict:
    """The same pipelined click through the app's own HTTP API (gradio_client): ``/prefer``
    returns the next pair (click → next pair); the update has landed when the click's round
    says ``applied`` in the session folder. The next click waits for that."""
    import json
    import socket

    from gradio_client import Client

    from ..core.embedded import DEFAULTS
    from ..gradio_app import launch
    from ..gradio_app.registry import REGISTRY
    sampling = dict(prompt=PROMPTS[0], negative="", n=2, seed_mode="new seed", seed=0,
                    steps=DEFAULTS.get("steps", 10), guidance=DEFAULTS.get("guidance", 4.0), resolution="native")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="d3po-latency-http-") as root:
        demo = launch(model=model, port=port, sessions_dir=os.path.join(root, "sessions"), block=False)
        try:
            client = Client(demo.local_url, verbose=False)
            client.predict("bench", 1e-2, 0.3, 4, api_name="/new_session")
            client.predict(**sampling, api_name="/sample")
            folder = os.path.join(root, "sessions", "bench", "rounds")

            def applied() -> int:
                return sum(json.load(open(os.path.join(folder, r, "round.json")))["status"] == "applied"
                           for r in os.listdir(folder) if os.path.exists(os.path.join(folder, r, "round.json")))
            rows = []
            for i in range(warmup + clicks):
                before = applied()
                t0 = time.perf_counter()
                client.predict(best=i % 2, **sampling, api_name="/prefer")
                t1 = time.perf_counter()
                while applied() == before:
                    time.sleep(0.02)
                t2 = time.perf_counter()
                if i >= warmup:
                    rows.append({"click_to_next": t1 - t0, "click_to_landed": t2 - t0})
        finally:
            demo.close()
            REGISTRY.close_all()
    return {"median": {k: statistics.median(r[k] for r in rows) for k in rows[0]}, "rows": rows, "clicks": clicks}


MEMORY_CHILD = """
import json, os, sys, tempfile, torch
torch.set_num_threads(1)
from d3po_studio.bench.latency import open_session, rss_bytes
k, model = int(sys.argv[1]), sys.argv[2]
base = rss_bytes()
folder = tempfile.mkdtemp(prefix="d3po-mem-")
sessions = [open_session(model, os.path.join(folder, str(i))) for i in range(k)]
for s in sessions:
    s.prefer(s.sample("a red circle", n=2, seed=0), best=0)   # LoRA, optimizer state and grads exist
print(json.dumps({"sessions": k, "rss_bytes": rss_bytes() - base, "pipelines": len({id(s.pipe) for s in sessions}),
                  "lora_bytes": sum(p.numel() * p.element_size() for p in sessions[0].params)}))
for s in sessions:
    s.close()
"""


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure_memory(model: str) -> dict:
    """Resident memory added by 1 and by 4 open sessions on ``model`` (each clicked once), each
    count in a fresh process; the target is 4 sessions ≤ 1.1 × (1 session + 3 more LoRAs with
    their Adam state and gradients)."""
    import json
    import subprocess
    out = {}
    for k in (1, 4):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(k), model], capture_output=True, text=True,
                              check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[k] = json.loads(proc.stdout.strip().splitlines()[-1])
    per_lora = 4 * out[1]["lora_bytes"]          # weights + grads + Adam's two moments
    budget = 1.1 * (out[1]["rss_bytes"] + 3 * per_lora)
    return {"one": out[1], "four": out[4], "per_lora": per_lora, "budget": budget,
            "met": out[4]["rss_bytes"] <= budget}


def markdown(result: dict, command: str) -> str:
    m, s, rt = result["median"], result["settings"], result["runtime"]
    target = "met" if m["click_to_next"] <= 1.0 else "not met"
    rows = [["sample a pair (incl. decode, save)", f"{m['sample']:.3f}"],
            ["update (`report['seconds']`)", f"{m['update']:.3f}"],
            ["prefer, wall (update + checkpoint + log)", f"{m['prefer']:.3f}"],
            ["**click → next pair** (prefer + sample)", f"**{m['click_to_next']:.3f}**"],
            ["floor of the update (ref fwd + policy fwd/bwd per step)", f"{m['floor']:.3f}"],
            ["update ÷ floor", f"{m['update'] / m['floor']:.2f}×"]]
    return "\n".join([
        "## Latency of a click\n",
        f"Machine: {report.machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.\n",
        f"Model: `{result['model']}`{MODEL_NOTES.get(result['model'], '')}; {s['steps']} DDIM steps, CFG {s['guidance']} (also in the update), "
        f"{s['width']}×{s['height']} px, pair of 2 images, all {s['steps']} steps trained; runtime "
        f"{rt['dtype']} weights, {rt['optimizer']}, {rt['attention']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; LoRA rank {s['lora_rank']} "
        f"({result['trainable_parameters']:,} parameters), {result.get('threads', '?')} torch threads. Medians over {result['clicks']} clicks after a warm-up "
        "click, on shared CPU cores (other jobs running"
        + (f"; load average {result['load'][0]:.1f} and this process at nice {result['load'][1]} when it ended"
           if "load" in result else "") + ").\n",
        report.table(["step", "median s"], rows),
        f"\nTarget click → next pair ≤ 1.0 s: **{target}** ({m['click_to_next']:.2f} s)"
        + (" synchronous." if "pipelined" in result else "."),
        *_pipelined_markdown(result),
        *_memory_markdown(result.get("memory")),
        *_http_markdown(result.get("http")),
    ])


def _http_markdown(http: dict | None) -> list[str]:
    if not http:
        return []
    m = http["median"]
    rows = [["**click → next pair on screen** (`/prefer` returns it)", f"**{m['click_to_next']:.3f}**"],
            ["click → the click's update landed (its round `applied`)", f"{m['click_to_landed']:.3f}"]]
    return ["\n### Through the app's HTTP API\n",
            f"The app started in this process (`gradio_app.launch`), driven by `gradio_client` over HTTP on "
            f"127.0.0.1: `/new_session`, `/sample`, then {http['clicks']} clicks of `/prefer` (after a warm-up "
            "click), each once the previous click's update had landed.\n",
            report.table(["median s", "HTTP"], rows),
            f"\nTarget click → next pair ≤ 1.0 s through HTTP: **{'met' if m['click_to_next'] <= 1.0 else 'not met'}** "
            f"({m['click_to_next']:.2f} s)."]


def _pipelined_markdown(result: dict) -> list[str]:
    if "pipelined" not in result:
        return []
    sync, pipe = result["median"], result["pipelined"]["median"]
    target = "met" if pipe["click_to_next"] <= 1.0 else "not met"
    rows = [["**click → next pair on screen**", f"{sync['click_to_next']:.3f}", f"**{pipe['click_to_next']:.3f}**"],
            ["click → this click's update landed", f"{sync['prefer']:.3f}", f"{pipe['click_to_landed']:.3f}"],
            ["update (`report['seconds']`)", f"{sync['update']:.3f}", f"{pipe['update']:.3f}"]]
    return ["\n### Synchronous vs pipelined\n",
            "Synchronous: `prefer(batch, best=i)` then `sample(...)` (the update, then the next pair). "
            "Pipelined, as the app does since the session engine has an update queue (docs/api.md): "
            "`prefer(batch, best=i, wait=False)` then `sample(...)` — the next pair is drawn with the LoRA one "
            "click behind and the update runs after it; the next click comes once it has landed. Same session "
            f"type, same process, medians over {result['pipelined']['clicks']} clicks each.\n",
            report.table(["median s", "synchronous", "pipelined"], rows),
            f"\nTarget click → next pair ≤ 1.0 s pipelined: **{target}** ({pipe['click_to_next']:.2f} s)."]


def _memory_markdown(mem: dict | None) -> list[str]:
    if not mem:
        return []
    mib = 2 ** 20
    one, four = mem["one"], mem["four"]
    rows = [["1 session", f"{one['rss_bytes'] / mib:.1f}", one["pipelines"]],
            ["4 sessions", f"{four['rss_bytes'] / mib:.1f}", four["pipelines"]],
            ["budget: 1.1 × (1 session + 3 LoRAs with grads and Adam state)", f"{mem['budget'] / mib:.1f}", ""]]
    return ["\n### Memory of 1 vs 4 sessions on one model\n",
            "Resident memory added by opening k sessions on the same model in one fresh process and "
            f"clicking once in each (LoRA {one['lora_bytes'] / 1024:.0f} KiB of weights, "
            f"{mem['per_lora'] / 1024:.0f} KiB with grads and Adam state).\n",
            report.table(["open sessions", "RSS added, MiB", "pipelines loaded"], rows),
            f"\nTarget 4 sessions ≤ 1.1 × (one session + LoRAs): **{'met' if mem['met'] else 'not met'}** "
            f"({four['rss_bytes'] / one['rss_bytes']:.2f}× one session)."]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto", help="auto (embedded if its weights exist, else embedded-random), "
                   "embedded, embedded-random, tiny, or a model path")
    p.add_argument("--clicks", type=int, default=10)
    p.add_argument("--no-memory", action="store_true", help="skip the 1 vs 4 sessions memory runs")
    p.add_argument("--http", action="store_true", help="also measure through the app's HTTP API (gradio_client)")
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    a = p.parse_args(argv)
    model = a.model if a.model != "auto" else ("embedded" if embedded_available() else "embedded-random")
    with tempfile.TemporaryDirectory(prefix="d3po-latency-") as folder:
        session = open_session(model, os.path.join(folder, "sync"))
        try:
            result = measure(session, a.clicks)
        finally:
            session.close()
        session = open_session(model, os.path.join(folder, "pipelined"))
        try:
            result["pipelined"] = measure_pipelined(session, a.clicks)
        finally:
            session.close()
    if not a.no_memory:
        result["memory"] = measure_memory(model)
    if a.http and model not in MODEL_NOTES:          # the stand-ins are no model the app can load
        result["http"] = measure_http(model, a.clicks)
    result["load"] = (os.getloadavg()[0], os.nice(0))
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python -m d3po_studio.bench.latency " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write_section("latency", markdown(result, command.strip()), a.doc)
    print(report.read_section("latency", a.doc))


if __name__ == "__main__":
    main()
