"""The Flywheel app on a fake engine, served by uvicorn as `flywheel serve` serves it.

    python bench/_feedback_server.py --database-url URL --port PORT

Started by ``bench/feedback_ingest.py`` in its own process, so the bench measures the HTTP and
feedback-store path of one server replica without loading a model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import uvicorn

    from bench._fake_engine import FakeEngine
    from flywheel.settings import Settings
    from server.app import create_app

    data_dir = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    settings = Settings(data_dir=data_dir, database_url=args.database_url, redis_url="",
                        model=str(data_dir / "no-model"), port=args.port, log_level="warning")
    app = create_app(settings, engine=FakeEngine(), watch=False)
    # As `flywheel serve` runs it (flywheel/cli.py), naming what uvicorn would pick itself.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
