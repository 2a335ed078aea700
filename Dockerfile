# syntax=docker/dockerfile:1.7
# conntrack-dns-exporter image. Two stages: `build` turns the source into wheels (the project's and every
# dependency's); the final stage installs them from that wheelhouse without network access and without any
# compiler. It runs as a non-root user; CAP_NET_ADMIN (netlink conntrack statistics, the NOTRACK table)
# reaches that user through a permitted-only file capability on the interpreter, which the exporter raises to
# effective at start (exporter/core/caps.py). docs/deploy.md explains why (a non-root process does not get
# `capabilities.add` from Kubernetes) and why the image also starts without NET_ADMIN.

# The base image, pinned by digest (a tag can be re-pushed, a digest cannot). Change both together; the
# image's org.opencontainers.image.base.* labels are derived from these two arguments.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG PYTHON_IMAGE_DIGEST=sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE}@${PYTHON_IMAGE_DIGEST} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# gcc + libc6-dev for the native pieces only (the dump parser exporter/table/ctdump.c, the DNS flow listener's
# drain exporter/dnsflows/ctevents.c): they are compiled here and shipped inside the wheel; the final stage
# gets no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m pip install build==1.6.1
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY exporter ./exporter
# The revision and branch become labels of conntrack_dns_exporter_build_info (exporter/app.py reads this file).
ARG REVISION=unknown
ARG BRANCH=unknown
# Dependencies come from requirements.lock with their hashes (scripts/lock.sh): the same files every build.
RUN python -c 'import sys; open("exporter/_build.py", "w").write(f"REVISION = {sys.argv[1]!r}\nBRANCH = {sys.argv[2]!r}\n")' "${REVISION}" "${BRANCH}" \
 && gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o exporter/table/_ctdump.so exporter/table/ctdump.c \
 && gcc -O2 -Wall -Wextra -Werror -shared -fPIC -o exporter/dnsflows/_ctevents.so exporter/dnsflows/ctevents.c \
 && python -m build --wheel --outdir /dist . \
 && python -m pip wheel --require-hashes --wheel-dir /wheels -r requirements.lock \
 && cp /dist/*.whl requirements.lock /wheels/

FROM ${PYTHON_IMAGE}@${PYTHON_IMAGE_DIGEST}
ARG PYTHON_IMAGE
ARG PYTHON_IMAGE_DIGEST
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="conntrack-dns-exporter" \
      org.opencontainers.image.description="Prometheus exporter for the node's conntrack table and DNS path (the Kubernetes 5-second DNS problem)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/conntrack-dns-exporter/conntrack-dns-exporter" \
      org.opencontainers.image.documentation="https://github.com/conntrack-dns-exporter/conntrack-dns-exporter/blob/main/docs/deploy.md" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}" \
      org.opencontainers.image.base.digest="${PYTHON_IMAGE_DIGEST}"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# nftables: `nft` for --web.notrack. libcap2-bin only for setcap, removed in the same layer.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables libcap2-bin \
 && rm -rf /var/lib/apt/lists/*

# --copies: the venv gets its own interpreter file, so the capability is attached to that file only and not
# to /usr/local/bin/python3.11. `+p` (permitted, no effective bit): with the effective bit the kernel refuses
# the exec when the bounding set lacks NET_ADMIN; without it the exporter starts either way and raises the
# capability itself, also into its ambient set for the `nft` child (so nft needs no file capability).
# Setuid/setgid bits are stripped from the whole image: nothing in it offers another way up.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv --copies /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --find-links=/wheels --require-hashes -r /wheels/requirements.lock \
 && /opt/venv/bin/python -m pip install --no-index --no-deps /wheels/conntrack_dns_exporter-*.whl \
 && /opt/venv/bin/python -m pip uninstall -y pip setuptools \
 && setcap cap_net_admin+p /opt/venv/bin/python \
 && apt-get purge -y --auto-remove libcap2-bin \
 && find / -xdev -type f -perm /6000 -exec chmod a-s {} + \
 && groupadd --system --gid 65532 exporter \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin exporter

ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 19153
ENTRYPOINT ["/opt/venv/bin/python", "-m", "exporter"]
