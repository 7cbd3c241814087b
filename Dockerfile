# CPU image that runs the test suite: docker build -t lcsc-ops . && docker run --rm lcsc-ops
FROM python:3.11.7-slim-bookworm

# make and a compiler for any sdist among the pinned dependencies.
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch 2.13.0 CPU build from PyTorch's CPU index (PyPI's default wheel is the multi-GB CUDA build);
# once it is installed, the ">=2.3" range in pyproject.toml is satisfied and nothing pulls another torch.
RUN python -m venv .venv && .venv/bin/pip install --no-cache-dir --upgrade pip \
    && .venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt README.md ./
COPY lcsc_ops ./lcsc_ops
RUN .venv/bin/pip install --no-cache-dir -c constraints.txt -e '.[dev]' && touch .venv/.installed
COPY . .
RUN touch .venv/.installed
CMD ["make", "test"]
