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
#
# Per-database client limits ($PGBOUNCER_DB_LIMITS, "db=N,db=N": each app's
# pooled client connections) live in limits.ini, which both configs include.
# `pgbouncer-entrypoint.sh limits` (run by the agent inside the running
# sandbox, with the new PGBOUNCER_DB_LIMITS) rewrites it and reloads both
# poolers: no client is dropped.
set -euo pipefail

DIR=${PGBOUNCER_CONFIG_DIR:-/tmp/pgbouncer}

# write_limits: limits.ini from PGBOUNCER_DB_LIMITS, replaced atomically. Names
# are the agent's identifiers; anything else is refused rather than written.
write_limits() {
	local tmp="$DIR/limits.ini.new" entry db n
	: >"$tmp"
	IFS=',' read -ra entries <<<"${PGBOUNCER_DB_LIMITS:-}"
	for entry in "${entries[@]}"; do
		[ -n "$entry" ] || continue
		db=${entry%%=*}
		n=${entry#*=}
		if ! [[ $db =~ ^[A-Za-z0-9_]+$ && $n =~ ^[0-9]+$ ]]; then
			echo "pgbouncer-entrypoint: bad limit entry '$entry' (want db=N)" >&2
			rm -f "$tmp"
			return 2
		fi
		printf '%s = host=%s port=%s max_db_client_connections=%s\n' \
			"$db" "$PGBOUNCER_SERVER_HOST" "${PGBOUNCER_SERVER_PORT:-5432}" "$n" >>"$tmp"
	done
	# Run by root (an exec), the file must stay readable by the poolers' user.
	[ "$(id -u)" != 0 ] || chown "$(stat -c %u:%g "$DIR")" "$tmp"
	mv -f "$tmp" "$DIR/limits.ini"
}

if [ "${1:-}" = limits ]; then
	: "${PGBOUNCER_SERVER_HOST:?the PostgreSQL server to pool (an address)}"
	umask 077
	write_limits
	for pidfile in "$DIR"/*.pid; do
		# A pooler that is restarting reads the new file when it starts.
		[ -e "$pidfile" ] && { kill -HUP "$(cat "$pidfile")" 2>/dev/null || :; }
	done
	exit 0
fi

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
%include $DIR/limits.ini

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = $2
pidfile = $DIR/$1.pid
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

# Pid files of an earlier run name processes of another pid namespace.
rm -f "$DIR"/*.pid
write_limits
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
