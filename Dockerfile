# The one image every servegrid service runs from; the Helm chart picks the service with
# `python -m services.<name>`. Triton and Envoy run from their own upstream images.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY sdk ./sdk
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home servegrid
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 50051 50052 50053 50054 50055
CMD ["python", "-m", "services.gateway"]
