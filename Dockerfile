# The worker image (also carries the operator tools: ingest-stream, dlqtriage, replayctl).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY ingest_stream ./ingest_stream
COPY schemas ./schemas
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home ingest && mkdir -p /data && chown ingest /data
COPY --from=build /install /usr/local
# The schemas and the Postgres migrations are package data of the wheel (pyproject.toml).
ENV INGEST_DATA_DIR=/data INGEST_WEB_PORT=8080 PYTHONUNBUFFERED=1
USER 10001
WORKDIR /app
EXPOSE 8080
ENTRYPOINT ["ingest-stream"]
CMD ["worker"]
