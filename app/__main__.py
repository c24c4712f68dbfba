"""``python -m app``: run the service with uvicorn, exiting with status 0 after a graceful SIGTERM.

Host, port, log level and format and graceful timeout come from the settings (``SENTIMENT_HOST``,
``SENTIMENT_PORT``, ``SENTIMENT_LOG_LEVEL``, ``SENTIMENT_LOG_FORMAT``, ``SENTIMENT_GRACEFUL_TIMEOUT_S``);
flags override them. Every log line, uvicorn's included, goes through the service's handler (request
ids, ``text`` or ``json``); the access log is the service's own (docs/observability.md).

If the model cannot be loaded (or the batch worker dies), the process exits with status 3 rather
than staying up unready: nothing in the process can fix a bad artifact, and orchestrators restart a
failed replica with backoff and make the failure visible (CrashLoopBackOff), where a replica that
stays live but never ready only hides it.

``uvicorn app.main:app`` works too; the difference is the exit status after SIGTERM. uvicorn drains,
then re-raises the signal it caught, so the process ends "killed by SIGTERM" (status 143). Containers
and process supervisors read that as a crash; here the re-raised signal ends the process with 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

import uvicorn

from app.lifecycle import State
from app.settings import get_settings

EXIT_FAILED = 3  # the model could not be served; distinct from a crash (1) and a signal (128+n)


def main() -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=settings.host, help="address to listen on (SENTIMENT_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="port to listen on (SENTIMENT_PORT)")
    parser.add_argument("--log-level", default=settings.log_level, help="log level (SENTIMENT_LOG_LEVEL)",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--log-format", default=settings.log_format, choices=["text", "json"],
                        help="log lines as text or one JSON object per line (SENTIMENT_LOG_FORMAT)")
    parser.add_argument("--graceful-timeout", type=float, default=settings.graceful_timeout_s,
                        help="longest wait for in-flight requests after SIGTERM (SENTIMENT_GRACEFUL_TIMEOUT_S)")
    args = parser.parse_args()
    from app.logs import configure_logging
    from app.main import app  # after argument parsing: --help needs no model

    configure_logging(args.log_format, args.log_level)  # the flags may differ from the settings
    # log_config=None: uvicorn leaves the logging set up above alone; access_log=False: ours replaces it.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           log_config=None, access_log=False,
                                           timeout_graceful_shutdown=args.graceful_timeout))
    lifecycle = app.state.service.lifecycle
    # A model that cannot load or a batch worker that died cannot heal in place: stop the server and
    # exit non-zero, so that the orchestrator restarts the replica with its own backoff.
    lifecycle.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn restores this handler after its graceful shutdown and re-raises SIGTERM into it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_FAILED if lifecycle.state is State.FAILED else 0))
    server.run()
    sys.exit(EXIT_FAILED if lifecycle.state is State.FAILED else 0)


if __name__ == "__main__":
    main()
