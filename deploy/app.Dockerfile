# The example patron service (clients/python/examples/patron_service), for compose.
# Build from the repository root: docker build -f deploy/app.Dockerfile -t patron-service:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY clients/python ./client
RUN pip wheel --no-cache-dir --wheel-dir /wheels ./client "aiohttp>=3.9" "asyncpg>=0.30"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
COPY clients/python/examples/patron_service/app.py /app/app.py
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080
# The same uid as the sidecar, so it may connect to the sidecar's Unix socket.
USER 10001:10001
EXPOSE 8080
CMD ["python", "/app/app.py"]
