# The sentiment service: FastAPI + uvicorn serving the TorchScript model in model_artifacts/ on port 8000.
#
#   docker build -t lstm-sentiment .                                   # CPU torch (default)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t lstm-sentiment:cuda .
#   docker run --rm -p 8000:8000 lstm-sentiment                        # add --gpus all for the CUDA image
#
# Build arguments (docs/deployment.md has the details):
#   BASE_IMAGE       any Debian-like image with python3 >= 3.11 and its venv module (default: the official slim one)
#   TORCH_VERSION    must satisfy the exact pin in pyproject.toml
#   TORCH_INDEX_URL  where torch comes from. The default, PyTorch's CPU index, keeps the image free of CUDA
#                    libraries (PyPI's Linux torch is the CUDA build, several GB). A cuXXX index gives a CUDA
#                    image. Empty means pip's own configuration (PyPI plus any PIP_FIND_LINKS, e.g. a local
#                    wheel directory mounted into the build).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: the dependencies in a venv, the package as a wheel -----------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

# The venv is made from the base image's own python3 (/usr/local/bin in the official images,
# /usr/bin on a Debian base), so the runtime stage, built FROM the same image, can run it.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and on its own layer: it is most of the image and changes least. --no-deps so that its
# small dependencies (sympy, filelock, ... and for CUDA builds the nvidia-* libraries) come from PyPI in
# the next step, whichever index torch itself came from.
RUN set -eux; \
    if [ -n "$TORCH_INDEX_URL" ]; then set -- --index-url "$TORCH_INDEX_URL"; else set --; fi; \
    pip install --no-deps "$@" "torch==${TORCH_VERSION}"

# The rest of the dependencies, read from pyproject.toml so that editing the code does not reinstall them.
COPY pyproject.toml /src/
RUN set -eux; \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# Drop what a Python-only runtime never touches: C++ headers, CMake files, torch's C++ test binaries and
# protoc (about 190 MB of the CPU image). torch_shm_manager stays (multiprocessing shared memory).
RUN set -eux; \
    torch_dir=$(python -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent)'); \
    rm -rf "$torch_dir/include" "$torch_dir/share/cmake" "$torch_dir/test" \
           "$torch_dir"/bin/protoc* "$torch_dir"/bin/*Test "$torch_dir"/bin/test_*; \
    python -c 'import torch, spacy, fastapi, uvicorn'  # still imports after pruning

# The package itself (app + the sentiment core it imports; never training/) as a wheel: /opt/venv
# stays as it was, so a code change does not copy the 1 GB venv into the runtime stage again.
COPY app /src/app
COPY sentiment /src/sentiment
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ---- runtime: the venv, the model, a non-root user ---------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="lstm-sentiment-service" \
      org.opencontainers.image.description="IMDB-trained LSTM sentiment model served by FastAPI with dynamic batching"

RUN set -eux; \
    groupadd --gid 10001 app; \
    useradd --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app; \
    mkdir -p /app; chown app:app /app

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /wheels /tmp/wheels
RUN PIP_NO_CACHE_DIR=1 /opt/venv/bin/pip install --no-deps --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && /opt/venv/bin/python -c 'import app.main, importlib.util as u; assert u.find_spec("training") is None'
COPY --chown=app:app model_artifacts /app/model_artifacts

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app \
    SENTIMENT_ARTIFACTS_DIR=/app/model_artifacts \
    SENTIMENT_DEVICE=auto
WORKDIR /app
# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000

# Healthy = ready: the model is loaded and warmed up, and the process is not draining. urllib raises on
# 503, so the exit status is non-zero until then (no curl in the slim image).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2)"]

# Exec form, so the server is PID 1 and gets SIGTERM itself (docker stop, Kubernetes). It then reports
# not-ready, waits SENTIMENT_SHUTDOWN_DELAY_S, closes the listener, finishes accepted requests (at most
# SENTIMENT_GRACEFUL_TIMEOUT_S) and exits 0. `python -m app` rather than plain uvicorn: uvicorn re-raises
# the caught SIGTERM after its graceful shutdown, which kills the process with 143 wherever it is not
# PID 1 (docker run --init, compose init: true, a shared process namespace).
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
