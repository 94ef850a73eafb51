# CPU image: runs the default job and the tests exactly as on a laptop.
#   docker build -t polyglot-train .
#   docker run --rm polyglot-train              # make pretrain
#   docker run --rm polyglot-train make test
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make git && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace
COPY setup.py pyproject.toml constraints.txt Makefile ./
# On the public index the default Linux torch wheel is a CUDA build; take the CPU one.
ENV TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
COPY . .
RUN make install
CMD ["make", "pretrain"]
