#!/bin/bash
# Entrypoint of miren-addons/pgbouncer: Debian's PgBouncer in front of one
# PostgreSQL server, configured from the environment (documented in
# docs/addons.md, "The pooler's image contract"). Two poolers run side by
# side: transaction pooling on $PGBOUNCER_TRANSACTION_PORT (6432) and session
# pooling on $PGBOUNCER_SESSION_PORT (6433). Clients log in as themselves:
# PgBouncer fetches their SCRAM secret with $PGBOUNCER_AUTH_QUERY, run as
# $PGBOUNCER_AUTH_USER, so there is no user list to keep in step.
# Secrets come from the environment and go to a 0600 file, never to argv.
# When either pooler exits, the container exits and its restart policy
# brings both back.
set -euo pipefail

: "${PGBOUNCER_SERVER_HOST:?the PostgreSQL server to pool (an address)}"
: "${PGBOUNCER_AUTH_USER:?the role that runs the auth query}"
: "${PGBOUNCER_AUTH_PASSWORD:?the password of PGBOUNCER_AUTH_USER}"
SERVER_PORT=${PGBOUNCER_SERVER_PORT:-5432}
AUTH_QUERY=${PGBOUNCER_AUTH_QUERY:-'SELECT uname, phash FROM miren_pooler.user_lookup($1)'}
AUTH_DBNAME=${PGBOUNCER_AUTH_DBNAME:-postgres}
TX_PORT=${PGBOUNCER_TRANSACTION_PORT:-6432}
SESSION_PORT=${PGBOUNCER_SESSION_PORT:-6433}
MAX_CLIENT_CONN=${PGBOUNCER_MAX_CLIENT_CONN:-2000}
TX_POOL=${PGBOUNCER_DEFAULT_POOL_SIZE:-20}
SESSION_POOL=${PGBOUNCER_SESSION_POOL_SIZE:-40}
PREPARED=${PGBOUNCER_MAX_PREPARED_STATEMENTS:-200}
DIR=${PGBOUNCER_CONFIG_DIR:-/tmp/pgbouncer}

umask 077
mkdir -p "$DIR"
# userlist.txt holds only the auth user: everyone else is looked up live.
printf '"%s" "%s"\n' "${PGBOUNCER_AUTH_USER//\"/\"\"}" "${PGBOUNCER_AUTH_PASSWORD//\"/\"\"}" \
	>"$DIR/userlist.txt"
unset PGBOUNCER_AUTH_PASSWORD

# RESET ALL after every transaction keeps one client's SET from reaching the next client on
# the same server connection (prepared statements survive it; PgBouncer tracks those);
# session mode cleans up fully (DISCARD ALL) when a client leaves.
write_ini() { # write_ini NAME PORT MODE POOL_SIZE RESET_QUERY RESET_ALWAYS
	cat >"$DIR/$1.ini" <<INI
[databases]
* = host=$PGBOUNCER_SERVER_HOST port=$SERVER_PORT

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = $2
unix_socket_dir =
pool_mode = $3
auth_type = scram-sha-256
auth_file = $DIR/userlist.txt
auth_user = $PGBOUNCER_AUTH_USER
auth_query = $AUTH_QUERY
auth_dbname = $AUTH_DBNAME
max_client_conn = $MAX_CLIENT_CONN
default_pool_size = $4
max_prepared_statements = $PREPARED
ignore_startup_parameters = extra_float_digits
server_reset_query = $5
server_reset_query_always = $6
log_connections = 0
log_disconnections = 0
INI
}

if [ $# -gt 0 ]; then
	exec "$@"
fi

pids=()
write_ini transaction "$TX_PORT" transaction "$TX_POOL" "RESET ALL" 1
pgbouncer "$DIR/transaction.ini" &
pids+=($!)
if [ -n "$SESSION_PORT" ]; then
	write_ini session "$SESSION_PORT" session "$SESSION_POOL" "DISCARD ALL" 0
	pgbouncer "$DIR/session.ini" &
	pids+=($!)
fi
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
# The first to exit ends the container (its restart policy starts both again).
status=0
wait -n || status=$?
kill -TERM "${pids[@]}" 2>/dev/null || :
wait || :
exit "$status"
