"""Command line: `tkr-embed serve`, `tkr-embed models make-tiny|info`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _setup_logging(level: str, file: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers,
                        force=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import SettingsError, load_settings

    try:
        settings = load_settings(args.config, overrides={
            "server.host": args.host, "server.port": args.port, "model.path": args.model,
            "model.quantization": args.quantization, "model.name": args.model_name,
        })
    except SettingsError as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        return 2
    _setup_logging(settings.logging.level, settings.logging.file)
    log = logging.getLogger("tkr_embed")
    from . import blas

    log.info("tkr-embed %s, %s environment, BLAS: %s", __version__, settings.environment, blas.describe())
    from .models.registry import ModelLoadError, detect_family, read_config, resolve_model_dir

    m = settings.model
    try:  # fail fast, with one line, on a missing, unreachable or unsupported model
        resolved = resolve_model_dir(m.path, m.name, m.revision, m.download_dir)
        detect_family(read_config(resolved.path))
    except ModelLoadError as e:
        log.error("cannot load the model: %s", e)
        return 3
    import uvicorn

    from .api.app import create_app
    from .engine.service import EmbeddingService

    app = create_app(settings, EmbeddingService(settings, resolved))
    config = uvicorn.Config(
        app, host=settings.server.host, port=settings.server.port, log_level=settings.logging.level.lower(),
        proxy_headers=True, forwarded_allow_ips=settings.server.forwarded_allow_ips, access_log=settings.debug,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally when startup fails (e.g. the model cannot load): exit non-zero then.
    return 0 if server.started else 3


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed, hidden=args.hidden, layers=args.layers)
    print(f"wrote a tiny Qwen2-VL embedder to {path}")
    print(f"serve it with: python -m tkr_embed serve --config config.dev.yaml --model {path}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    import json

    from .models.registry import ModelLoadError, detect_family, read_config, resolve_model_dir

    try:
        resolved = resolve_model_dir(args.path)
        config = read_config(resolved.path)
        family = detect_family(config)
    except ModelLoadError as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"id": resolved.model_id, "path": str(resolved.path), "family": family,
                      "model_type": config.get("model_type"), "revision": resolved.revision}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tkr-embed", description="Local multimodal embedding server on MLX.")
    p.add_argument("--version", action="version", version=f"tkr-embed {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the configured model over HTTP")
    s.add_argument("--config", help="YAML settings file (default: $EMBEDDING_CONFIG, else built-in defaults)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--model", help="local directory, Hugging Face repo id, or pkg://package/dir")
    s.add_argument("--model-name", help="the model id clients see")
    s.add_argument("--quantization", choices=["auto", "q4", "q8", "none"])
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("models", help="model utilities").add_subparsers(dest="models_command", required=True)
    t = m.add_parser("make-tiny", help="write a tiny random Qwen2-VL embedder (tests, demos)")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.set_defaults(func=cmd_make_tiny)
    i = m.add_parser("info", help="detect a model's family")
    i.add_argument("path")
    i.set_defaults(func=cmd_model_info)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from .blas import ensure_fast_blas

        ensure_fast_blas(argv)  # re-execs once with OpenBLAS preloaded on Linux, if available
    sys.exit(args.func(args))
