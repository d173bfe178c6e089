FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY license_report ./license_report
COPY consumer ./consumer
COPY projections ./projections
COPY api ./api
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["license-report"]
