# syntax=docker/dockerfile:1
# resnet-pipeline on NVIDIA's NGC PyTorch image (CUDA, cuDNN, NCCL, PyTorch and DALI already inside).
#   docker build -t resnet-pipeline .
#   enroot import dockerd://resnet-pipeline      # -> resnet-pipeline.sqsh for pyxis
#   python -m launch submit train ... --container-image=/path/resnet-pipeline.sqsh
#   docker run --gpus all --shm-size=16g resnet-pipeline ...   # Docker's default 64 MB /dev/shm is too small for
#                                        # the cpu loader's workers and NCCL (or --ipc=host; docs/loaders.md)
# The base image's own torch/torchvision/DALI builds are kept: pip must not replace them with the
# generic wheels pinned in pyproject.toml, so those three are left out of the install below.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

WORKDIR /opt/resnet-pipeline

# Dependencies first (cached layer): everything pyproject.toml lists, core + the gpu extra, except what
# the base image already provides.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; keep = lambda r: re.split(r'[<>=!~\[; ]', r, 1)[0].lower() not in {'torch', 'torchvision'} and not r.lower().startswith('nvidia-dali'); print('\n'.join(filter(keep, p['dependencies'] + p['optional-dependencies']['gpu'])))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The project itself, without dependencies (resolved above).
COPY README.md LICENSE ./
COPY pipeline ./pipeline
COPY data_prep ./data_prep
COPY launch ./launch
COPY conf ./conf
RUN pip install --no-deps --no-build-isolation . \
 && printf '#!/bin/sh\nexec python -m data_prep "$@"\n' > /usr/local/bin/resnet-prep \
 && printf '#!/bin/sh\nexec python -m pipeline "$@"\n' > /usr/local/bin/resnet-train \
 && printf '#!/bin/sh\nexec python -m launch "$@"\n' > /usr/local/bin/resnet-launch \
 && chmod 755 /usr/local/bin/resnet-prep /usr/local/bin/resnet-train /usr/local/bin/resnet-launch \
 && mkdir -p /opt/torch_extensions && chmod 1777 /opt/torch_extensions

# Run as an ordinary user (pyxis/enroot map the calling user in anyway; plain docker runs get this one).
RUN useradd --create-home --uid 10001 --shell /bin/bash resnet
USER resnet
WORKDIR /home/resnet

CMD ["resnet-train", "--help"]
