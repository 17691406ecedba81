#!/bin/sh
# Entrypoint of upw/postgres: creates the cluster on first start, then runs PostgreSQL.
#
# The environment of the official postgres image, in part:
#   POSTGRES_PASSWORD  password of POSTGRES_USER; connections over the network must give it
#                      (scram-sha-256). Unset: refused unless POSTGRES_HOST_AUTH_METHOD=trust.
#   POSTGRES_USER      the superuser (default postgres)
#   POSTGRES_DB        a database created on first start (default: POSTGRES_USER)
#   PGDATA             the data directory (default /var/lib/postgresql/data)
# `docker run upw/postgres` runs the server; any other command runs as given (pg_isready, psql).
set -eu

PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi

# Started as root: make the data directory ours (a bind mount is owned by whoever made it on
# the host), then continue as postgres. PostgreSQL refuses to run as root.
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${POSTGRES_PASSWORD:-}" ]; then
        auth=scram-sha-256
    elif [ "${POSTGRES_HOST_AUTH_METHOD:-}" = trust ]; then
        auth=trust
        echo "upw/postgres: POSTGRES_HOST_AUTH_METHOD=trust: anyone who reaches the port is a superuser" >&2
    else
        echo "upw/postgres: set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust) to create the database" >&2
        exit 1
    fi
    echo "upw/postgres: creating the cluster in $PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-unused}" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    # Every address may connect (the compose network), with the password.
    printf 'host all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"
    {
        echo "listen_addresses = '*'"
        echo "unix_socket_directories = '/var/run/postgresql'"
    } >> "$PGDATA/postgresql.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\"" \
            | postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "upw/postgres: cluster ready"
fi

exec "$@" -D "$PGDATA"
