"""The fluxserve command: serve, generate, make-tiny-model, bench, loadtest.

``--help`` must stay fast: this module imports only the standard library at the top, the torch-free model
registry to list model keys, and everything else (settings, the server, the engine) once a command runs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("fluxserve")

DESCRIPTION = """\
fluxserve: a self-hosted, OpenAI-compatible image-generation server on Hugging Face diffusers.

Start with `fluxserve serve --model tiny-flux` (offline, seconds) and open http://127.0.0.1:8000/.
Every setting is a FLUX_* environment variable (or a line in .env): docs/settings.md lists them all.
"""

SERVE_DESCRIPTION = """\
Start the HTTP server: OpenAI's images API under /v1, the web studio at /, /health, /ready and
/metrics. It listens on http://127.0.0.1:8000/ unless --host/--port (FLUX_HOST, FLUX_PORT) say
otherwise, and logs "ready — open http://127.0.0.1:8000/" once its models are loaded and warmed up.
"""

DEFAULT_MODEL_DOWNLOAD = "about 34 GB"
"""What the default model (FLUX.1-schnell in diffusers format: transformer, T5-XXL, CLIP, VAE) downloads."""


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"size looks like 512x512, got {text!r}")
    return int(w), int(h)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registry key (listed below), hub repo id or local directory (FLUX_MODEL)")
    parser.add_argument("--device", help="auto|cuda|cuda:N|mps|cpu (FLUX_DEVICE)")
    parser.add_argument("--dtype", help="auto|bfloat16|float16|float32 (FLUX_DTYPE)")


def models_epilog() -> str:
    """The model keys ``--model`` takes, tiny offline ones marked, and the warning about the default's size."""
    from fluxserve.models.registry import BUILTIN_MODELS  # torch-free

    width = max(len(key) for key in BUILTIN_MODELS) + 2
    lines = ["models (--model or FLUX_MODEL; default schnell):"]
    for key, spec in BUILTIN_MODELS.items():
        if spec.tiny is not None:
            what = f"offline: tiny random-weight {spec.family} pipeline, built on first use (images are noise)"
        else:
            what = spec.source + (" (gated: needs HF_TOKEN)" if spec.gated else "")
        lines.append(f"  {key:<{width}}{what}")
    lines += [
        "  any hub repo id or local diffusers directory also works (requests may name one only with",
        "  FLUX_ALLOW_ANY_MODEL=1).",
        "",
        f"The default model, schnell, is a large download ({DEFAULT_MODEL_DOWNLOAD} from the Hugging Face hub into",
        "FLUX_CACHE_DIR on first start). To try fluxserve offline first: fluxserve serve --model tiny-flux.",
        "",
        "Every option here is also a FLUX_* environment variable, and there are many more (limits, API keys,",
        "CORS, queue, memory modes, compilation): all are listed in docs/settings.md and .env.example.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="fluxserve", description=DESCRIPTION, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="start the HTTP server (OpenAI images API and web studio)",
                           description=SERVE_DESCRIPTION, epilog=models_epilog(), formatter_class=raw)
    _common(serve)
    serve.add_argument("--host", help="bind address (FLUX_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (FLUX_PORT, default 8000)")
    serve.add_argument("--ray", action="store_true", help="serve on a Ray cluster (pip install 'fluxserve[ray]')")

    gen = sub.add_parser("generate", help="write one image without a server",
                         description="Load a model in this process, write one image to a file and exit.",
                         epilog=models_epilog(), formatter_class=raw)
    gen.add_argument("prompt")
    _common(gen)
    gen.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed)")
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("-o", "--output", default="image.png", help="output file (.png, .jpg or .webp)")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight pipeline (diffusers format)",
                          description="Write a tiny random-weight pipeline of one family in diffusers format "
                                      "(offline; serve it with --model DIRECTORY).")
    tiny.add_argument("directory", type=Path)
    from fluxserve.models.registry import BUILTIN_MODELS, tiny_families  # torch-free

    first_tiny = next(spec.tiny for spec in BUILTIN_MODELS.values() if spec.tiny is not None)
    tiny.add_argument("--family", choices=tiny_families(), default=first_tiny)

    sub.add_parser("bench", help="benchmark against plain diffusers (see BENCHMARKS.md)", add_help=False)
    sub.add_parser("loadtest", help="drive concurrent clients against a running server", add_help=False)
    return parser


def _settings(args: argparse.Namespace, **extra: Any):  # type: ignore[no-untyped-def]
    from fluxserve.settings import load_settings

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
    args = build_parser().parse_args(argv)  # --help exits here, before any settings or engine import
    from fluxserve.settings import SettingsError

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
        from fluxserve.storage.jobstore import JobStoreError
        from fluxserve.storage.results import ResultStoreUnavailable

        if isinstance(exc, JobStoreError | ResultStoreUnavailable):
            print(f"fluxserve: cannot open the job store: {exc}", file=sys.stderr)
            return 2
        from fluxserve.engine.device import DeviceSelectionError
        from fluxserve.generation import ModelLoadError
        from fluxserve.models.registry import UnknownModelError

        if isinstance(exc, DeviceSelectionError | ModelLoadError | UnknownModelError):
            print(f"fluxserve: {exc}", file=sys.stderr)
            return 2
        raise


def run() -> NoReturn:
    """The process's entry point (the ``fluxserve`` command, ``python -m fluxserve``): :func:`main`, then exit."""
    code = main()
    # Whatever is alive now lives until the exit: frozen, it is not walked again by the interpreter's final
    # garbage collections (torch, diffusers and transformers leave ~0.5M objects: ~1.5 s after every command
    # and every server stop).
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
