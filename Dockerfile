# densepipe in a container: the image the Docker and Kubernetes work pools of prefect.yaml run
# (nightly-docker, nightly-k8s), and a node image for multi-node torchrun. docs/orchestration.md,
# "Past one machine".
#
#   docker build -t densepipe:latest .                                   CPU torch (the default)
#   docker build --build-arg TORCH_INDEX= -t densepipe:cuda .            PyPI's torch: CUDA on Linux
#
# PyPI's Linux torch wheels bring their own CUDA libraries, so the GPU image needs no CUDA base
# image, only the NVIDIA driver and container toolkit on the host (docker run --gpus all). For a
# CUDA base image (nvidia/cuda:*-runtime-*) pass --build-arg BASE=... with an image that has
# python3 and pip, and TORCH_INDEX= or https://download.pytorch.org/whl/cuXXX to match its CUDA.
ARG BASE=python:3.11-slim
FROM ${BASE}

# PyTorch's CPU wheels (torch 2.14.1+cpu: no CUDA libraries, a far smaller image)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /opt/densepipe
# what `pip install .` needs; the dependency layer is rebuilt only when these change
COPY pyproject.toml README.md constraints.txt ./
COPY docker/install.sh docker/install.sh
COPY pipeline pipeline
COPY plugins plugins
COPY flows flows
RUN PYTHON=python3 TORCH_INDEX="${TORCH_INDEX}" bash docker/install.sh \
    && densepipe --help > /dev/null

# the run's configuration: a Prefect run or `densepipe run` in this folder reads params.yaml
COPY params.yaml dvc.yaml prefect.yaml ./
CMD ["densepipe", "run"]
