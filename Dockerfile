# One image for every variflow service (migrate, web, worker, beat, flower, sandbox);
# docker-compose.yml picks the command. Runtime dependencies only: no dev extras.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Beat's liveness record, metrics samples: this container's own (no volume).
    VARIFLOW_HOME=/var/lib/variflow

RUN groupadd --system --gid 10001 variflow \
 && useradd --system --uid 10001 --gid variflow --home-dir /home/variflow --create-home \
        --shell /usr/sbin/nologin variflow \
 && mkdir -p /var/lib/variflow \
 && chown variflow:variflow /var/lib/variflow

WORKDIR /src
# Every dependency at the version and hash pinned in requirements.lock (`make lock`
# makes it from pyproject.toml), in a layer of its own that a code change keeps.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY webhooks ./webhooks
COPY sandbox ./sandbox
COPY migrations ./migrations
# The HTTP client too: the CLI can then work against a remote API (README, "Over HTTP").
COPY clients/python ./clients/python
# --no-deps: nothing is resolved again, so nothing unpinned comes in.
RUN pip install --no-deps . ./clients/python \
 && pip check \
 && rm -rf /src/build ./clients/python/build

# Run from the data folder, not the source tree: the code imported is the installed one.
WORKDIR /var/lib/variflow
USER variflow:variflow

EXPOSE 8000 5555
# docker-compose.yml sets the command of each service; alone, the image serves webhooks.
CMD ["variflow", "serve", "--host", "0.0.0.0", "--port", "8000"]
