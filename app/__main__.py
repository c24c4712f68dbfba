"""``python -m app``: run the service with uvicorn, exiting with status 0 after a graceful SIGTERM.

Host, port, log level and graceful timeout come from the settings (``SENTIMENT_HOST``,
``SENTIMENT_PORT``, ``SENTIMENT_LOG_LEVEL``, ``SENTIMENT_GRACEFUL_TIMEOUT_S``); flags override them.

``uvicorn app.main:app`` works too; the difference is the exit status after SIGTERM. uvicorn drains,
then re-raises the signal it caught, so the process ends "killed by SIGTERM" (status 143). Containers
and process supervisors read that as a crash; here the re-raised signal ends the process with 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn

from app.settings import get_settings


def main() -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=settings.host, help="address to listen on (SENTIMENT_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port to listen on (SENTIMENT_PORT)")
    parser.add_argument("--log-level", default=settings.log_level, help="log level (SENTIMENT_LOG_LEVEL)")
    parser.add_argument("--graceful-timeout", type=float, default=settings.graceful_timeout_s,
                        help="longest wait for in-flight requests after SIGTERM (SENTIMENT_GRACEFUL_TIMEOUT_S)")
    args = parser.parse_args()
    # uvicorn restores this handler after its graceful shutdown and re-raises SIGTERM into it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)


if __name__ == "__main__":
    main()
