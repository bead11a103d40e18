#!/usr/bin/env bash
# docker-entrypoint.sh for miren's Debian-built rabbitmq test image.
# Keeps the official rabbitmq image's contract: RABBITMQ_DEFAULT_USER,
# RABBITMQ_DEFAULT_PASS (or *_FILE), RABBITMQ_DEFAULT_VHOST, data and the
# Erlang cookie in /var/lib/rabbitmq (the rabbitmq user's HOME), and
# `exec rabbitmq-server` as rabbitmq. The node name is rabbit@<hostname>
# unless RABBITMQ_NODENAME says otherwise; its database is named after it.
set -Eeo pipefail

# file_env VAR [DEFAULT]: VAR may come from VAR_FILE (docker secrets style).
file_env() {
	local var="$1" fileVar="${1}_FILE" def="${2:-}"
	if [ "${!var:-}" ] && [ "${!fileVar:-}" ]; then
		echo >&2 "error: both $var and $fileVar are set (but are exclusive)"
		exit 1
	fi
	local val="$def"
	if [ "${!var:-}" ]; then
		val="${!var}"
	elif [ "${!fileVar:-}" ]; then
		val="$(<"${!fileVar}")"
	fi
	export "$var"="$val"
	unset "$fileVar"
}

# Options only (`docker run rabbitmq -foo`) mean "rabbitmq-server with these".
if [ "${1:0:1}" = '-' ]; then
	set -- rabbitmq-server "$@"
fi

DATA=/var/lib/rabbitmq

if [ "$1" = 'rabbitmq-server' ] && [ "$(id -u)" = '0' ]; then
	file_env RABBITMQ_DEFAULT_USER
	file_env RABBITMQ_DEFAULT_PASS
	file_env RABBITMQ_DEFAULT_VHOST
	# The default login, applied by the server on a node's first boot only. A
	# file readable by rabbitmq alone, never an argument (argv is public).
	conf=/etc/rabbitmq/conf.d/20-default-user.conf
	rm -f "$conf"
	if [ -n "$RABBITMQ_DEFAULT_USER$RABBITMQ_DEFAULT_PASS$RABBITMQ_DEFAULT_VHOST" ]; then
		(
			umask 077
			{
				if [ -n "$RABBITMQ_DEFAULT_USER" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER"; fi
				if [ -n "$RABBITMQ_DEFAULT_PASS" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS"; fi
				if [ -n "$RABBITMQ_DEFAULT_VHOST" ]; then echo "default_vhost = $RABBITMQ_DEFAULT_VHOST"; fi
			} >"$conf"
		)
		chown rabbitmq:rabbitmq "$conf"
	fi
	unset RABBITMQ_DEFAULT_PASS
	mkdir -p "$DATA"
	# A fresh disk is root's; only what is not rabbitmq's yet (a big queue
	# store is not walked on every start).
	find "$DATA" \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
	# Drop root for good; setpriv is in util-linux, no gosu needed.
	exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
		env HOME="$DATA" "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = 'rabbitmq-server' ]; then
	# The cookie lives on the data disk, so a restarted node keeps it; Erlang
	# would make one too, but a fixed mode avoids its "wrong permissions" stop.
	cookie="$HOME/.erlang.cookie"
	if [ ! -s "$cookie" ]; then
		(
			umask 077
			head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie.tmp"
			mv "$cookie.tmp" "$cookie"
		)
	fi
	chmod 400 "$cookie"
fi

exec "$@"
