# The QLoRA pipeline's run-time image, for Prefect's Docker (or Kubernetes) workers.
#
# It holds Python, git, the exact libraries of requirements.lock and this project's package:
# no checkout, no data, no model weights, no DVC cache (.dockerignore lets only the lock files
# and the source in). A flow run clones the commit it runs (the deployment's git_clone pull
# step): DVC needs a git repository, and the code must match the dvc.lock it reproduces.
# The base model is fetched by the `base` stage at run time, or pulled from the DVC remote.
#
#   docker build -t qlora-pipeline .                       # CPU torch (the default)
#   docker build -t qlora-pipeline:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#   docker run --rm qlora-pipeline qlora --help
#
# Only instructions the classic builder knows (no RUN --mount, no heredocs): Prefect's
# build_docker_image step builds through docker-py, which does not use BuildKit.

# The project's Python (3.11, as .venv and the lock files). Pin a digest for bit-for-bit
# rebuilds: python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DO_NOT_TRACK=1

# git: the git_clone pull step, and DVC itself (`dvc exp`, repository detection).
# libgomp1: bitsandbytes' CPU library links the system OpenMP runtime.
# tini: PID 1 that forwards SIGTERM (a cancelled flow run stops its `dvc repro` and the
# stage it started) and reaps the stages' orphaned children.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git libgomp1 tini \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system user.name "qlora-pipeline" \
    && git config --system user.email "qlora-pipeline@localhost"
# (The identity above is for the commits `dvc exp save` makes inside the container.)

# Numeric uid, so Kubernetes' runAsNonRoot can verify it; 1000 usually matches the host
# user who owns a bind-mounted DVC remote or cache.
RUN useradd --uid 1000 --user-group --create-home --shell /bin/bash qlora \
    && install -d -o qlora -g qlora /home/qlora/work

# Libraries first and the source last, so a code change rebuilds one small layer.
COPY requirements.lock /tmp/qlora/requirements.lock

# torch first, at the lock's version, from PyTorch's CPU index: a torch from PyPI is the
# CUDA build (several GB of nvidia-* wheels). GPU users pass a CUDA index
# (.../whl/cu130, matching their driver) or an empty TORCH_INDEX_URL for PyPI's build;
# the slim base needs no CUDA toolkit, the wheels carry their CUDA libraries and the host
# only needs the NVIDIA driver and container toolkit. The ARG sits here so that changing
# it rebuilds from this layer on, not the system packages above.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        --constraint /tmp/qlora/requirements.lock torch

# Everything else at exactly the locked versions (run time only, not the dev tools).
# llama-cpp-python (the GGUF export's engine) exists only as source: it is compiled here with
# cmake and the C++ compiler, which leave the image in the same layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && pip install --requirement /tmp/qlora/requirements.lock \
    && apt-get purge -y --auto-remove build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

# The DVC remote's plugin, which requirements.lock leaves out (pyproject's `remote` extra,
# locked in requirements-dev.lock so that upgrading it makes no stage stale). A container
# reads and writes its results through the remote, so the image has it: dvc-s3 at its
# locked version, with its locked dependencies. The dev lock is only a constraints file
# here: nothing in it is installed unless named. Other remotes: EXTRA_PACKAGES="dvc-gs"
# (or dvc-azure, dvc-ssh); "" for none (a local or mounted path, HTTP).
COPY requirements-dev.lock /tmp/qlora/requirements-dev.lock
ARG EXTRA_PACKAGES="dvc-s3"
RUN if [ -n "$EXTRA_PACKAGES" ]; then \
        pip install --constraint /tmp/qlora/requirements.lock \
            --constraint /tmp/qlora/requirements-dev.lock $EXTRA_PACKAGES; \
    fi \
    && pip check

# The project itself, for `docker run IMAGE qlora ...`. A flow run uses the cloned commit's
# code instead: Prefect puts the clone first on sys.path to load the flow, and the stages run
# as `python -m stages.<name>` inside it. Dependencies are all above: --no-deps, and the
# lock's setuptools builds it.
COPY pyproject.toml README.md /tmp/qlora/src/
COPY qlora /tmp/qlora/src/qlora
COPY stages /tmp/qlora/src/stages
COPY flows /tmp/qlora/src/flows
# llama.cpp's converters, from the same source release as the engine (see the Makefile).
RUN pip install --no-deps --no-build-isolation /tmp/qlora/src \
    && PIP_NO_CACHE_DIR=1 python -m qlora.export.converters install \
    && rm -rf /tmp/qlora

USER 1000:1000
# A flow run clones its checkout in here; HOME (/home/qlora) takes the Hugging Face and
# Prefect caches.
WORKDIR /home/qlora/work

ENTRYPOINT ["tini", "--"]
CMD ["qlora", "--help"]
