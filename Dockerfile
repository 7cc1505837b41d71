# One image for every variflow service (migrate, web, worker, beat, flower, sandbox);
# docker-compose.yml picks the command. Runtime dependencies only: no dev extras.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Beat's schedule, stored result images and metrics samples: volumes in compose.
    VARIFLOW_HOME=/var/lib/variflow

RUN groupadd --system --gid 10001 variflow \
 && useradd --system --uid 10001 --gid variflow --home-dir /home/variflow --create-home \
        --shell /usr/sbin/nologin variflow \
 && mkdir -p /var/lib/variflow \
 && chown variflow:variflow /var/lib/variflow

WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY webhooks ./webhooks
COPY sandbox ./sandbox
COPY migrations ./migrations
# The HTTP client too: the CLI can then work against a remote API (README, "Over HTTP").
COPY clients/python ./clients/python
RUN pip install . ./clients/python \
 && rm -rf /src/build ./clients/python/build

# Run from the data folder, not the source tree: the code imported is the installed one.
WORKDIR /var/lib/variflow
USER variflow:variflow

EXPOSE 8000 5555
# docker-compose.yml sets the command of each service; alone, the image serves webhooks.
CMD ["variflow", "serve", "--host", "0.0.0.0", "--port", "8000"]
