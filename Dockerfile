FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY bus bus
COPY actors actors
COPY gatefleet gatefleet
COPY config config
RUN pip install --no-cache-dir .
ENTRYPOINT ["gatefleet"]
CMD ["up"]
