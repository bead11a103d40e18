#!/bin/sh
# docker-entrypoint.sh for miren's Debian-built memcached image: the official
# memcached image's contract (options first mean "memcached with these"; the
# image's user is memcache, uid 11211).
set -e

if [ "${1#-}" != "$1" ]; then
	set -- memcached "$@"
fi

exec "$@"
