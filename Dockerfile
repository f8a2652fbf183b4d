# The drtune worker/dashboard image, on TensorFlow's GPU image (CUDA and cuDNN included) by
# default; --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 builds the smaller CPU-only image
# (docker-compose.yml passes DRTUNE_BASE_IMAGE from .env).
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /work

# Dependencies first, so code changes do not reinstall them; TensorFlow comes with the base.
COPY pyproject.toml README.md ./
COPY drtune ./drtune
RUN pip install --no-cache-dir ".[test]" && drtune --version
COPY studies ./studies

CMD ["drtune", "--help"]
