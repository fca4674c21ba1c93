"""The ``d3po-studio`` command: a thin shell over the core.

    d3po-studio app                                   # the click-to-prefer Gradio app (embedded model)
    d3po-studio sample --prompt "a red circle" --out imgs/ [--session S | --model M]
    d3po-studio train SESSION_FOLDER --epochs 2 --out tuned.safetensors
    d3po-studio export SESSION_FOLDER --out lora.safetensors --format kohya
    d3po-studio simulate --oracle brighter --rounds 50
    d3po-studio info

Default folders (the app's sessions, simulate's output) live in one user data directory:
--home, else $D3PO_HOME, else ~/.local/share/d3po-studio (gradio_app/paths.py). Numbers are
checked before any model loads (core/inputs.py); long runs show a progress bar on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from .core.errors import D3POError
    try:
        return args.run(args) or 0
    except D3POError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing more was written", file=sys.stderr)
        return 130


def _checked(parse, *args):
    """An argparse ``type`` from a core.inputs parser: a bad value is a usage message."""
    def convert(text):
        from .core.errors import ConfigError
        try:
            return parse(text, *args)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = args[0] if args else "seed"
    return convert


def _parser() -> argparse.ArgumentParser:
    from .core.inputs import parse_count, parse_finite, parse_seed
    p = argparse.ArgumentParser(prog="d3po-studio", description="Steer a diffusion model by clicking the "
                                "image you prefer (D3PO on a LoRA).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", help="user data directory for default folders (default $D3PO_HOME, "
                                     "else ~/.local/share/d3po-studio)")
    seed = _checked(parse_seed)

    a = sub.add_parser("app", help="start the click-to-prefer Gradio app", parents=[home])
    a.add_argument("--model", default="embedded", help="embedded, a diffusers folder, a .safetensors file or a hub id")
    a.add_argument("--session", help="resume this session folder")
    a.add_argument("--sessions-dir", help="where sessions are created and listed (default HOME/sessions)")
    a.add_argument("--export-dir", help="also write exported LoRAs here (e.g. ComfyUI/models/loras)")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    a.set_defaults(run=_app)

    s = sub.add_parser("sample", help="render images, with a session's LoRA or from the base model")
    s.add_argument("--prompt", required=True)
    s.add_argument("--negative-prompt", default="")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--session", help="use this session folder's LoRA")
    src.add_argument("--model", default="embedded", help="base model when no --session is given")
    s.add_argument("--n", type=_checked(parse_count, "--n", 1, 64), default=4, help="number of images (1-64)")
    s.add_argument("--seed", type=seed, default=0, help="0 to 4294967295")
    s.add_argument("--scale", type=_checked(parse_finite, "--scale"), default=1.0,
                   help="LoRA strength, a finite number (0 = base model)")
    s.add_argument("--out", required=True, help="folder for the PNG files")
    s.set_defaults(run=_sample)

    t = sub.add_parser("train", help="train a fresh LoRA from a session's preference log "
                                     "(runs under `accelerate launch` too)")
    t.add_argument("session", help="session folder")
    t.add_argument("--epochs", type=_checked(parse_count, "--epochs"), default=1)
    t.add_argument("--batch", type=_checked(parse_count, "--batch"), default=1, help="preferences per optimizer step")
    t.add_argument("--lr", type=_checked(parse_finite, "--lr", 0.0, 1.0), help="learning rate (default: the session's)")
    t.add_argument("--model", help="base model (default: the session's)")
    t.add_argument("--out", help="LoRA file to write (default SESSION/replay-lora.safetensors)")
    t.add_argument("--format", default="kohya", help="kohya or diffusers")
    t.set_defaults(run=_train)

    e = sub.add_parser("export", help="export a session's current LoRA")
    e.add_argument("session", help="session folder")
    e.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    e.add_argument("--format", default="kohya", help="kohya (ComfyUI, A1111/Forge, diffusers) or diffusers")
    e.add_argument("--model", help="base model (default: the session's)")
    e.set_defaults(run=_export)

    m = sub.add_parser("simulate", help="let a scripted chooser click, then measure what was learned",
                       parents=[home])
    m.add_argument("--oracle", required=True, help="brighter, jpeg-compressible, larger-shape, random, ...")
    m.add_argument("--rounds", type=_checked(parse_count, "--rounds"), default=50, help="number of clicks")
    m.add_argument("--n", type=_checked(parse_count, "--n", 2, 16), default=2, help="images per click (best of n)")
    m.add_argument("--seed", type=seed, default=0, help="0 to 4294967295")
    m.add_argument("--eval-pairs", type=_checked(parse_count, "--eval-pairs", 2), default=32,
                   help="held-out (prompt, seed) pairs to evaluate")
    m.add_argument("--out", help="folder for the session, report and pictures "
                                 "(default HOME/simulations/ORACLE-DATE-TIME)")
    m.add_argument("--model", default="embedded")
    m.set_defaults(run=_simulate)

    i = sub.add_parser("info", help="versions, and the device, dtype, optimizer and attention chosen here")
    i.add_argument("--session", help="also describe this session folder")
    i.set_defaults(run=_info)
    return p


def _app(args):
    from .gradio_app import launch
    from .gradio_app.paths import sessions_home
    launch(model=args.model, session=args.session, host=args.host, port=args.port, share=args.share,
           sessions_dir=args.sessions_dir or sessions_home(args.home), export_dir=args.export_dir)


def _open_existing(folder: str, model: str | None = None):
    from .core.errors import SessionError
    from .core.session import Session
    from .core.storage import SessionFolder
    sf = SessionFolder(folder)
    if not sf.exists():
        raise SessionError(f"{folder} is not a session folder (no session.json); create one with the app")
    return Session.open(folder, model=model or sf.read_meta()["model"])


def _sample(args):
    import tempfile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="d3po-sample-") as scratch:   # removed afterwards
        if args.session:
            session = _open_existing(args.session)
        else:
            from .core.session import Session
            session = Session.open(Path(scratch) / "session", model=args.model)
        with session:
            images = session.render(args.prompt, args.seed, scale=args.scale if args.session else 0.0,
                                    negative_prompt=args.negative_prompt, n=args.n)
    for k, image in enumerate(images):
        image.save(out / f"{args.seed}_{k}.png")
    print(f"wrote {len(images)} images to {out}")


class _Bar:
    """A tqdm bar on stderr fed by the core's ``progress(i, total)``: what runs, rate, time left."""

    def __init__(self, desc: str, unit: str, disable: bool = False):
        self.desc, self.unit, self.disable, self.bar = desc, unit, disable, None

    def __call__(self, i: int, total: int) -> None:
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, disable=self.disable,
                            dynamic_ncols=True, file=sys.stderr)
        self.bar.update(i - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _train(args):
    from accelerate import Accelerator
    from .core.replay import replay_train, write_replay_lora
    accelerator = Accelerator()
    overrides = {"lr": args.lr} if args.lr else {}
    if accelerator.is_main_process:
        print(f"train: loading the model of {args.session} ...", file=sys.stderr)
    with _Bar("replay training (optimizer steps)", "step", disable=not accelerator.is_main_process) as bar:
        result = replay_train(args.session, epochs=args.epochs, batch=args.batch, model=args.model,
                              accelerator=accelerator, progress=bar, **overrides)
    if accelerator.is_main_process:
        out = write_replay_lora(result, args.out or Path(args.session) / "replay-lora.safetensors", args.format)
        print(json.dumps({"out": str(out), "steps": result["steps"], "preferences": result["preferences"],
                          "losses": result["losses"]}))
    accelerator.wait_for_everyone()


def _export(args):
    with _open_existing(args.session, args.model) as session:
        path = session.export_lora(args.out, format=args.format)
        print(f"wrote {path} ({args.format}, {session.updates} preferences)")


def _simulate(args):
    from .core.simulate import run_simulation
    from .gradio_app.paths import data_home, new_run_folder
    out = Path(args.out) if args.out else new_run_folder(data_home(args.home) / "simulations", args.oracle)
    print(f"simulate: writing to {out}; loading the model and rendering {args.eval_pairs} held-out base "
          "images first ...", file=sys.stderr)
    with _Bar(f"simulated clicks ('{args.oracle}' oracle: sample, click, update)", "click") as bar:
        report = run_simulation(out, oracle=args.oracle, rounds=args.rounds, n=args.n, seed=args.seed,
                                eval_pairs=args.eval_pairs, model=args.model, progress=bar)
    print(json.dumps({**report["summary"], "out": str(out)}, indent=2))


def _info(args):
    import importlib.metadata as md
    from .core.runtime import resolve_runtime
    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
                "gradio", "xformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    from .gradio_app.paths import data_home
    info = {"versions": versions, "runtime": resolve_runtime().describe(), "data_home": str(data_home())}
    if args.session:
        with _open_existing(args.session) as session:
            info["session"] = session.info()
    print(json.dumps(info, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
