# pluralfed: one image for both roles (`pluralfed coordinator ...`, `pluralfed node ...`).
#
# Build with scripts/build-image: it fills .docker-wheels/ on the host (the CPU build of
# torch 2.13.0 and every other dependency, as wheels) and then runs `docker build`. Nothing in this
# file downloads anything: every install is `pip --no-index` from those wheels, so the build also
# runs with --network none.
#
# Base image: by default pluralfed-base:bookworm, a Debian bookworm minbase with python3 (3.11)
# made locally by scripts/build-base-image (no container registry needed). With a registry, the
# official image works as well:
#     BASE_IMAGE=python:3.11-slim-bookworm scripts/build-image
#   or, once .docker-wheels/ is filled:
#     docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t pluralfed:latest .
# Both have `python3` on PATH (Debian's in /usr/bin, the official image's in /usr/local/bin); only
# that name is used here. The wheels are for CPython 3.11 on glibc, so the base must be that too.
ARG BASE_IMAGE=pluralfed-base:bookworm

# ---- deps: a venv with every third-party dependency (changes only when the wheels change) ----
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
 && python3 -m venv /opt/venv
COPY .docker-wheels/ /wheels/
# Every dependency from the wheels (with their bytecode: the user cannot write it later, and
# compiling at each start costs seconds), a consistency check, then what nothing here uses: torch's
# files for compiling against it and its C++ tests (torch/include, share/cmake, test/, bin/ but
# torch_shm_manager: about 175 MB), and the packages' own test suites (*/tests: about 100 MB).
RUN /opt/venv/bin/python -m pip install --quiet --no-index --find-links /wheels -r /wheels/requirements.txt \
 && /opt/venv/bin/python -m pip check \
 && torch=/opt/venv/lib/python3.11/site-packages/torch \
 && rm -rf "$torch/include" "$torch/share/cmake" "$torch/test" \
 && find "$torch/bin" -type f ! -name torch_shm_manager -delete \
 && find /opt/venv/lib/python3.11/site-packages -mindepth 2 -type d -name tests -prune \
         -exec rm -rf {} + \
 && /opt/venv/bin/python -c 'import torch, numpy, scipy, transformers, grpc; print("torch", torch.__version__)'
# Labels for scripts/build-image, which removes builder images of older inputs by them.
ARG DEPS_KEY=unset
ARG TARGET_IMAGE=unset
LABEL org.pluralfed.deps-key=${DEPS_KEY} org.pluralfed.target=${TARGET_IMAGE}

# ---- project: pluralfed itself, built from source against the wheels (setuptools from /wheels) ----
FROM deps AS project
COPY pyproject.toml README.m[d] LICENSE /src/
COPY pluralfed/ /src/pluralfed/
COPY coordinator/ /src/coordinator/
COPY group_node/ /src/group_node/
# Install, then gather exactly the files the install added (its RECORD: the packages, the dist-info
# and bin/pluralfed) into /staging, so the final image copies a layer of a few hundred KB rather
# than the whole venv again whenever the code changes.
RUN /opt/venv/bin/python -m pip install --quiet --no-index --find-links /wheels --no-deps /src \
 && /opt/venv/bin/python -m pip check \
 && site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
 && record=$(ls -d "$site"/pluralfed-*.dist-info)/RECORD \
 && mkdir /staging \
 && cut -d, -f1 "$record" | while IFS= read -r f; do \
      p=$(realpath -ms "$site/$f"); \
      if [ -e "$p" ]; then cp -a --parents "$p" /staging/ || exit 1; fi; \
    done \
 && test -x /staging/opt/venv/bin/pluralfed
ARG SRC_KEY=unset
LABEL org.pluralfed.src-key=${SRC_KEY}

# ---- final image: the base plus /opt/venv, run as an unprivileged user ----
FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 pluralfed \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/pluralfed \
            --shell /usr/sbin/nologin pluralfed \
 && install -d -o 10001 -g 10001 -m 0755 /home/pluralfed/.cache /home/pluralfed/.cache/pluralfed \
            /home/pluralfed/.cache/huggingface /home/pluralfed/work
COPY --from=deps /opt/venv /opt/venv
COPY --from=project /staging/ /
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/pluralfed/.cache/huggingface \
    PLURALFED_CACHE_DIR=/home/pluralfed/.cache/pluralfed
LABEL org.opencontainers.image.title="pluralfed" \
      org.opencontainers.image.description="pluralfed coordinator and group node (CPU-only torch)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /home/pluralfed/work
ENTRYPOINT ["pluralfed"]
CMD ["--help"]
