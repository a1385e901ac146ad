"""Command line: `tkr-embed serve`, `tkr-embed models make-tiny|info`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import SettingsError, load_settings

    try:
        settings = load_settings(args.config, overrides={
            "server.host": args.host, "server.port": args.port, "model.path": args.model,
            "model.quantization": args.quantization, "model.name": args.model_name,
            "server.frontends": args.frontends,
        })
    except SettingsError as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        return 2
    from .logs import setup_logging_for

    setup_logging_for(settings)
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
    from .serving import serve_one_process, serve_with_frontends

    if settings.server.frontends > 1:
        return serve_with_frontends(settings, resolved)
    return serve_one_process(settings, resolved)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import make_tiny

    path = make_tiny(args.dir, seed=args.seed, hidden=args.hidden, layers=args.layers)
    print(f"wrote a tiny Qwen2-VL embedder to {path}")
    print(f"serve it with: python -m tkr_embed serve --config config.dev.yaml --model {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import json

    from .models.convert import convert
    from .models.registry import ModelLoadError

    try:
        report = convert(args.src, args.dst, args.quantize)
    except (ModelLoadError, ValueError) as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
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


def _open_store(args: argparse.Namespace):
    from .api.app import open_key_store
    from .config import SettingsError, load_settings

    try:
        settings = load_settings(args.config)
    except SettingsError as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return open_key_store(settings)


def _print_key(record, token: str | None = None) -> None:
    import json

    body = record.public()
    if token:
        body["key"] = token
    print(json.dumps(body, indent=2))
    if token:
        print("\nThis is the only time the key is shown: store it now.", file=sys.stderr)


def cmd_keys(args: argparse.Namespace) -> int:
    import json

    from .auth.store import KeyNotFound

    store = _open_store(args)
    try:
        if args.keys_command == "create":
            limits = {k: getattr(args, k) for k in ("per_minute", "per_hour", "per_day", "burst")
                      if getattr(args, k) is not None} or None
            record, token = store.create(args.name, [p.strip() for p in args.permissions.split(",") if p.strip()],
                                         args.expires_in_days, limits)
            _print_key(record, token)
        elif args.keys_command == "list":
            print(json.dumps([r.public() for r in store.list()], indent=2))
        elif args.keys_command == "revoke":
            _print_key(store.revoke(args.id))
        elif args.keys_command == "rotate":
            _print_key(*store.rotate(args.id))
    except KeyNotFound as e:
        print(f"tkr-embed: no API key with id '{e.args[0]}'", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"tkr-embed: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tkr-embed", description="Local multimodal embedding server on MLX.")
    p.add_argument("--version", action="version", version=f"tkr-embed {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the configured model over HTTP")
    s.add_argument("--config", help="YAML settings file (default: $EMBEDDING_CONFIG, else built-in defaults)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--frontends", type=int, help="HTTP front-end processes feeding one engine process (server.frontends)")
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
    cv = m.add_parser("convert", help="write an MLX checkpoint (optionally quantised) that loads faster")
    cv.add_argument("src", help="Hugging Face directory or repo id")
    cv.add_argument("dst")
    cv.add_argument("--quantize", choices=["q4", "q8"])
    cv.set_defaults(func=cmd_convert)
    i = m.add_parser("info", help="detect a model's family")
    i.add_argument("path")
    i.set_defaults(func=cmd_model_info)

    k = sub.add_parser("keys", help="manage API keys (the same store the server uses; safe while it runs)")
    k.add_argument("--config", help="YAML settings file (finds data_dir / security.database_url)")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key; prints it once")
    c.add_argument("--name", required=True)
    c.add_argument("--permissions", required=True,
                   help="comma-separated: embed:text,embed:image,embed:multimodal,similarity,admin")
    c.add_argument("--expires-in-days", type=float)
    for lim in ("per-minute", "per-hour", "per-day", "burst"):
        c.add_argument(f"--{lim}", type=int, help=f"rate limit override ({lim})")
    ks.add_parser("list", help="list keys (never secrets)")
    for name, text in (("revoke", "revoke a key (effective on its next request)"),
                       ("rotate", "new secret for a key; the old one stops working")):
        r = ks.add_parser(name, help=text)
        r.add_argument("id")
    k.set_defaults(func=cmd_keys)

    from .benchmark import suite

    b = sub.add_parser("bench", help="benchmark real server processes against the raw engine and peers",
                       description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_arguments(b)
    b.set_defaults(func=suite.main)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from .blas import ensure_fast_blas

        ensure_fast_blas(argv)  # re-execs once with OpenBLAS preloaded on Linux, if available
        from .serving import leave

        leave(args.func(args))  # the server has drained and stopped its engine (serving.leave says why)
    sys.exit(args.func(args))
