# One image for all the services; each Deployment picks the service with its args.
#   docker build -t linkedblob:0.1.0 .
# Two stages: the builder installs into a virtual environment, the runtime stage copies only it
# (no pip cache, no build tools). The dependencies' layer depends on pyproject.toml and
# constraints.txt alone, so a change to the source reinstalls linkedblob, not its dependencies.
#
# The base image is pinned by tag to the Python the tests run on. Pin it by digest too
# (python:3.11.7-slim-bookworm@sha256:...) once you have pulled it from your registry.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /src
# The services' dependencies (the package's and its [server] extra's) at constraints.txt's
# exact versions, read from pyproject.toml: this layer is cached until one of the two changes.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p.get("optional-dependencies", {}).get("server", [])))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt
# Then linkedblob itself (the package carries its migrations and protos).
COPY . .
RUN pip install --no-cache-dir --no-deps -c constraints.txt .

FROM ${PYTHON_IMAGE}
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --gid 10001 linkedblob \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin linkedblob
COPY --from=builder /venv /venv
# The TLS servers' exec probe (the manifests run /app/deploy/probe.py with the venv's python).
COPY deploy/probe.py /app/deploy/probe.py
WORKDIR /app
USER 10001:10001
EXPOSE 50051 50052 50053 50054 50055 9090
ENTRYPOINT ["linkedblob"]
CMD ["--help"]
