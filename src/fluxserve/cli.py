"""The ``fluxserve`` command: serve, generate, make-tiny-model, bench, loadtest."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fluxserve.settings import SettingsError, load_settings

log = logging.getLogger("fluxserve")


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"size looks like 512x512, got {text!r}")
    return int(w), int(h)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry key, hub repo id or local directory (FLUX_MODEL)")
    parser.add_argument("--device", help="auto|cuda|cuda:N|mps|cpu (FLUX_DEVICE)")
    parser.add_argument("--dtype", help="auto|bfloat16|float16|float32 (FLUX_DTYPE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server")
    _common(serve)
    serve.add_argument("--host", help="bind address (FLUX_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (FLUX_PORT, default 8000)")
    serve.add_argument("--ray", action="store_true", help="serve on a Ray cluster (pip install 'fluxserve[ray]')")

    gen = sub.add_parser("generate", help="write one image without a server")
    gen.add_argument("prompt")
    _common(gen)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--negative-prompt")
    gen.add_argument("-o", "--output", default="image.png", help="output file (.png, .jpg or .webp)")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight pipeline (diffusers format)")
    tiny.add_argument("directory", type=Path)
    from fluxserve.models.registry import BUILTIN_MODELS, tiny_families  # torch-free

    first_tiny = next(spec.tiny for spec in BUILTIN_MODELS.values() if spec.tiny is not None)
    tiny.add_argument("--family", choices=tiny_families(), default=first_tiny)

    sub.add_parser("bench", help="benchmark against plain diffusers (see BENCHMARKS.md)", add_help=False)
    sub.add_parser("loadtest", help="drive concurrent clients against a running server", add_help=False)
    return parser


def _settings(args: argparse.Namespace, **extra: Any):  # type: ignore[no-untyped-def]
    overrides = {k: getattr(args, k, None) for k in ("model", "device", "dtype", "host", "port")}
    overrides.update(extra)
    return load_settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from fluxserve.observability.logs import configure_logging

    configure_logging(settings.log_level, settings.structured_logs)
    if args.ray:
        from fluxserve.distributed.ray_serve import run_ray

        return run_ray(settings)
    from fluxserve.server import serve

    return serve(settings)


def cmd_generate(args: argparse.Namespace) -> int:
    settings = _settings(args, warmup_enable=False, store_local=False, preload_models=[])
    from fluxserve.observability.logs import configure_logging

    configure_logging("WARNING", settings.structured_logs)
    from fluxserve.engine.engine import DeviceEngine
    from fluxserve.generation import GenerationParams, ImageRequest, pick_seed
    from fluxserve.models.registry import resolve_model
    from fluxserve.runtime import Runtime
    from fluxserve.storage.images import encode_image

    runtime = Runtime(settings)
    spec = resolve_model(settings.model)
    engine: DeviceEngine = runtime.engines[0]
    started = time.perf_counter()
    model, _ = engine.load(spec)
    load_seconds = time.perf_counter() - started
    width, height = args.size or (spec.width, spec.height)
    if width % spec.size_multiple or height % spec.size_multiple:
        print(f"error: --size must be a multiple of {spec.size_multiple} for {spec.key}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else pick_seed()
    guidance = args.guidance if args.guidance is not None else spec.guidance
    params = GenerationParams(spec.key, width, height, args.steps or spec.steps, guidance, spec.max_sequence_length)
    started = time.perf_counter()
    result = engine.generate(model, params, [ImageRequest(args.prompt, [seed], args.negative_prompt)])[0]
    generate_seconds = time.perf_counter() - started
    out = Path(args.output)
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
    out.write_bytes(encode_image(result.images[0], fmt, png_level=settings.png_compress_level))  # type: ignore[arg-type]
    plan = engine.plan
    stages = " ".join(f"{k}={v:.3f}s" for k, v in result.timings.items())
    print(f"wrote {out} seed={seed} model={spec.key} size={width}x{height} steps={params.steps} "
          f"device={plan.device} dtype={plan.dtype} load={load_seconds:.3f}s generate={generate_seconds:.3f}s "
          f"({stages})")
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from fluxserve.engine.tiny import write_tiny_model
    from fluxserve.observability.logs import configure_logging

    configure_logging("WARNING")
    path = write_tiny_model(args.directory, args.family)
    print(f"wrote tiny {args.family} pipeline to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from fluxbench.serving import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "loadtest":
        from fluxserve.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_make_tiny(args)
    except SettingsError as exc:
        print(f"fluxserve: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from fluxserve.engine.device import DeviceSelectionError
        from fluxserve.generation import ModelLoadError
        from fluxserve.models.registry import UnknownModelError

        if isinstance(exc, DeviceSelectionError | ModelLoadError | UnknownModelError):
            print(f"fluxserve: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
