"""`avatar serve`: the server of runtime/server/app.py from the command line (registered in runtime/cli.py)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

RANDOM_WEIGHTS = "NOTE: preset {preset!r} has RANDOM weights: the avatar is NOISE, not a face (pass --checkpoint DIR)."


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind. Loopback unless you mean to expose it "
                                      "(then put TLS and authentication in front).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    preset: Annotated[str, typer.Option("--preset", help="Config preset with random weights.")] = "tiny",
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="LiveTalk release directory "
                                                    "(replaces --preset).")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Default reference image (default: a drawn "
                                               "face); clients may send their own.")] = None,
    max_sessions: Annotated[int | None, typer.Option("--max-sessions", help="Sessions at once (default: "
                                                     "what the engine holds).")] = None,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", help="Close a session whose client sent "
                                                "nothing for this many seconds.")] = 120.0,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available).")] = None,
) -> None:
    """Serve avatar sessions: browser page at /, WebSocket /ws, WebRTC /offer, /health, /metrics."""
    from aiohttp import web

    from runtime import Engine
    from runtime.media import load_image, synthetic_face

    from .app import AvatarServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if checkpoint is None:
        typer.echo(RANDOM_WEIGHTS.format(preset=preset), err=True)
    engine = Engine.from_pretrained(str(checkpoint or preset), device=device)
    face = load_image(image) if image is not None else synthetic_face(*engine.size)
    try:
        server = AvatarServer(engine, face, max_sessions=max_sessions, idle_timeout=idle_timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"avatar serve on http://{host}:{port}/ ({server.max_sessions} sessions)")
    web.run_app(server.app(), host=host, port=port, print=None)


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)
