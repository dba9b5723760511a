"""The Flywheel app on a fake engine, served by uvicorn as `flywheel serve` serves it.

    python bench/_feedback_server.py --database-url URL --port PORT [--gc-freeze]

Started by ``bench/feedback_ingest.py`` in its own process, so the bench measures the HTTP and
feedback-store path of one server replica without loading a model.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def freeze_after_startup(app: ASGIApp) -> ASGIApp:
    """gc.freeze() once the app has started: the ~140,000 objects alive then leave the
    collector's reach, so a full collection walks only what requests allocate. Unfrozen, each
    one took 100-170 ms of a busy core, about once a second under load (the p99 latency)."""

    async def frozen(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_after_freeze(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                gc.collect()
                gc.freeze()
            await send(message)

        await app(scope, receive, send_after_freeze)

    return frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="freeze the start-up heap (a proposal for flywheel serve)")
    args = parser.parse_args()

    import uvicorn

    from flywheel.settings import Settings
    from server.app import create_app
    from server.engines.fake import FakeEngine

    data_dir = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    settings = Settings(data_dir=data_dir, database_url=args.database_url, redis_url="",
                        model=str(data_dir / "no-model"), port=args.port, log_level="warning")
    app: ASGIApp = create_app(settings, engine=FakeEngine(), watch=False)
    if args.gc_freeze:
        app = freeze_after_startup(app)
    # As `flywheel serve` runs it (flywheel/cli.py), naming what uvicorn would pick itself.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
