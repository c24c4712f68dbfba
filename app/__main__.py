"""``python -m app``: run the service with uvicorn, exiting with status 0 after a graceful SIGTERM.

``uvicorn app.main:app`` works too; the difference is the exit status after SIGTERM. uvicorn drains,
then re-raises the signal it caught, so the process ends "killed by SIGTERM" (status 143). Containers
and process supervisors read that as a crash; here the re-raised signal ends the process with 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("SENTIMENT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SENTIMENT_PORT", "8000")))
    parser.add_argument("--log-level", default=os.environ.get("SENTIMENT_LOG_LEVEL", "info"))
    parser.add_argument("--graceful-timeout", type=float, default=float(os.environ.get("SENTIMENT_GRACEFUL_TIMEOUT_S", "30")),
                        help="longest wait for in-flight requests after SIGTERM")
    args = parser.parse_args()
    # uvicorn restores this handler after its graceful shutdown and re-raises SIGTERM into it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)


if __name__ == "__main__":
    main()
