#!/bin/sh
# docker-entrypoint.sh for miren's Debian-built valkey image: the official
# valkey/valkey image's contract. Options or a *.conf first mean
# "valkey-server with these"; valkey-server started as root gets the working
# directory (/data) chowned to valkey and runs as valkey (uid 999) with
# umask 0077; VALKEY_EXTRA_FLAGS are appended to its arguments.
set -e

if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- valkey-server "$@"
fi

if [ "$1" = 'valkey-server' ] && [ "$(id -u)" = '0' ]; then
	find . \! -user valkey -exec chown valkey '{}' +
	# setpriv is in util-linux, no gosu needed.
	exec setpriv --reuid=valkey --regid=valkey --clear-groups -- "$0" "$@"
fi

um="$(umask)"
if [ "$um" = '0022' ]; then
	umask 0077
fi

if [ "$1" = 'valkey-server' ] && [ -n "${VALKEY_EXTRA_FLAGS:-}" ]; then
	# shellcheck disable=SC2086 # a word list on purpose, as upstream
	set -- "$@" $VALKEY_EXTRA_FLAGS
fi

exec "$@"
