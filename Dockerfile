# CPU image of the LAM-A2E server: HTTP on 8000, Audio2Face-3D gRPC on 52000.
#   docker build -t lam-a2e .
#   docker run -p 8000:8000 -p 52000:52000 lam-a2e
#   (LAM-A2E weights: --build-arg WEIGHTS=hf://3DAIGC/LAM_audio2exp bakes them in; or mount a file and pass --weight PATH)
# BASE: any Debian bookworm image with python3 (3.11) and python3-venv.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# The CPU build of torch (the default index would bring a multi-GB CUDA build).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python3 -m venv /opt/venv
# Wheels placed in docker/wheels/ (e.g. a local torch) are used first; the directory may be empty.
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels --extra-index-url ${TORCH_INDEX} torch==2.13.0 && rm -rf /tmp/wheels
COPY setup.cfg pyproject.toml README.md app.py api_server.py ./
COPY a2e ./a2e
COPY a2e_client ./a2e_client
COPY batching ./batching
COPY runtime ./runtime
COPY engine ./engine
COPY server ./server
COPY configs ./configs
COPY pretrained_models ./pretrained_models
RUN pip install .
# The released LAM-A2E model baked into the image (else a2e-lite serves):
#   docker build --build-arg WEIGHTS=hf://3DAIGC/LAM_audio2exp ...
# downloads, verifies and converts it at build time into HF_HOME; the server
# finds it there at start, without the network (HF_HUB_OFFLINE=1 for air gaps).
ARG WEIGHTS=
ENV HF_HOME=/app/.cache/huggingface A2E_WEIGHT=${WEIGHTS}
RUN if [ -n "$WEIGHTS" ]; then python3 -m a2e.hub fetch "$WEIGHTS"; fi

RUN useradd --system --home /app a2e && chown -R a2e /app
USER a2e
EXPOSE 8000 52000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD python3 -c "import json, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=4); exit(0 if json.load(r)['status'] == 'healthy' else 1)"
CMD ["python3", "app.py", "--host", "0.0.0.0", "--port", "8000"]
