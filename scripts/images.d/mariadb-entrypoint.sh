#!/usr/bin/env bash
# docker-entrypoint.sh for miren's Debian-built mariadb test images.
# Keeps the official mariadb image's contract: MARIADB_ROOT_PASSWORD,
# MARIADB_ALLOW_EMPTY_ROOT_PASSWORD or MARIADB_RANDOM_ROOT_PASSWORD (one is
# required), MARIADB_ROOT_HOST (default %), MARIADB_USER, MARIADB_PASSWORD,
# MARIADB_DATABASE, MARIADB_INITDB_SKIP_TZINFO, each also as MYSQL_* and as
# *_FILE; the data directory from the server's own options (`--datadir=DIR`
# after the image name works, as with the official images);
# /docker-entrypoint-initdb.d/*.sql[.gz]; `exec mariadbd` as mysql.
#
# Init is one bootstrap run of the server (no temporary networked server to
# start, poll and stop; so init scripts are SQL only), then one syncfs of the
# data directory's filesystem.
set -Eeo pipefail

note() { printf '%s [Note] [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*"; }
fail() {
	printf '%s [ERROR] [Entrypoint]: %s\n' "$(date --rfc-3339=seconds)" "$*" >&2
	exit 1
}

# twin_env NAME [DEFAULT]: MARIADB_NAME from MARIADB_NAME, MARIADB_NAME_FILE,
# MYSQL_NAME or MYSQL_NAME_FILE (in that order), exported as MARIADB_NAME.
twin_env() {
	local name=$1 def=${2:-} val='' var
	for var in "MARIADB_$name" "MYSQL_$name"; do
		local file="${var}_FILE"
		if [ "${!var:-}" ] && [ "${!file:-}" ]; then
			fail "both $var and $file are set (but are exclusive)"
		fi
		if [ "${!var:-}" ]; then
			val=${!var}
			break
		elif [ "${!file:-}" ]; then
			val=$(<"${!file}")
			break
		fi
	done
	export "MARIADB_$name"="${val:-$def}"
	unset "MARIADB_${name}_FILE" "MYSQL_${name}_FILE"
}

# server_option NAME ARGS...: the server's value of --NAME, the last one of
# its config files' and then of ARGS.
server_option() {
	local name=$1 value
	shift
	value=$(my_print_defaults --mysqld 2>/dev/null | sed -n "s/^--$name=//p" | tail -n 1)
	while [ $# -gt 0 ]; do
		case $1 in
		--"$name"=*) value=${1#*=} ;;
		--"$name") value=${2:-} && shift ;;
		esac
		shift
	done
	echo "$value"
}

# Options only (`docker run mariadb --port=3307`) mean "mariadbd with these".
if [ "${1:0:1}" = '-' ]; then
	set -- mariadbd "$@"
fi

is_server=0
if [ "$1" = mariadbd ] || [ "$1" = mysqld ]; then
	is_server=1
	for a in "$@"; do
		case $a in -'?' | --help | --print-defaults | -V | --version) is_server=0 ;; esac
	done
fi

if [ "$is_server" = 1 ]; then
	DATADIR=$(server_option datadir "${@:2}")
	DATADIR=${DATADIR:-/var/lib/mysql}
	if [ "$(id -u)" = 0 ]; then
		mkdir -p "$DATADIR" /run/mysqld
		chown mysql:mysql "$DATADIR" /run/mysqld
		chmod 1777 /run/mysqld
		# Drop root for good; setpriv is in util-linux, no gosu needed.
		exec setpriv --reuid=mysql --regid=mysql --init-groups "${BASH_SOURCE[0]}" "$@"
	fi
fi

if [ "$is_server" = 1 ] && [ ! -d "$DATADIR/mysql" ]; then
	twin_env ROOT_PASSWORD
	twin_env ALLOW_EMPTY_ROOT_PASSWORD
	twin_env RANDOM_ROOT_PASSWORD
	twin_env ROOT_HOST %
	twin_env USER
	twin_env PASSWORD
	twin_env DATABASE
	twin_env INITDB_SKIP_TZINFO
	if [ -z "$MARIADB_ROOT_PASSWORD" ] && [ -z "$MARIADB_ALLOW_EMPTY_ROOT_PASSWORD" ] &&
		[ -z "$MARIADB_RANDOM_ROOT_PASSWORD" ]; then
		fail "Database is uninitialized and password option is not specified
	You need to specify one of MARIADB_ROOT_PASSWORD, MARIADB_ALLOW_EMPTY_ROOT_PASSWORD and MARIADB_RANDOM_ROOT_PASSWORD"
	fi
	if [ "$MARIADB_USER" = root ]; then
		fail "MARIADB_USER=root is not allowed: use MARIADB_ROOT_PASSWORD for root"
	fi
	if [ -n "$MARIADB_USER" ] && [ -z "$MARIADB_PASSWORD" ]; then
		fail "MARIADB_USER is set but MARIADB_PASSWORD is not"
	fi
	if [ -n "$MARIADB_RANDOM_ROOT_PASSWORD" ] && [ -z "$MARIADB_ROOT_PASSWORD" ]; then
		MARIADB_ROOT_PASSWORD=$(tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32 || :)
		note "GENERATED ROOT PASSWORD: $MARIADB_ROOT_PASSWORD"
	fi

	sql_string() { printf "'%s'" "$(printf '%s' "$1" | sed -e "s/\\\\/\\\\\\\\/g" -e "s/'/\\\\'/g")"; }
	sql_ident() { printf '`%s`' "${1//\`/\`\`}"; }
	root_pw=$(sql_string "$MARIADB_ROOT_PASSWORD")
	root_host=$(sql_string "$MARIADB_ROOT_HOST")
	# The accounts, databases and init scripts run in the install's own bootstrap
	# (--extra-file): no second server start. The file holds passwords: 0600, and gone after.
	setup=$(mktemp)
	trap 'rm -f "$setup"' EXIT
	{
		echo "FLUSH PRIVILEGES;"
		echo "DROP USER IF EXISTS root@'127.0.0.1', root@'::1';"
		echo "EXECUTE IMMEDIATE CONCAT('DROP USER IF EXISTS root@\\'', @@hostname, '\\'');"
		echo "ALTER USER root@localhost IDENTIFIED BY $root_pw;"
		if [ "$MARIADB_ROOT_HOST" != localhost ]; then
			echo "CREATE USER root@$root_host IDENTIFIED BY $root_pw;"
			echo "GRANT ALL ON *.* TO root@$root_host WITH GRANT OPTION;"
		fi
		if [ -n "$MARIADB_DATABASE" ]; then
			echo "CREATE DATABASE IF NOT EXISTS $(sql_ident "$MARIADB_DATABASE");"
		fi
		if [ -n "$MARIADB_USER" ]; then
			echo "CREATE USER $(sql_string "$MARIADB_USER")@'%' IDENTIFIED BY $(sql_string "$MARIADB_PASSWORD");"
			if [ -n "$MARIADB_DATABASE" ]; then
				# `_` is a wildcard in a GRANT's database name.
				echo "GRANT ALL ON $(sql_ident "${MARIADB_DATABASE//_/\\_}").* TO $(sql_string "$MARIADB_USER")@'%';"
			fi
		fi
		if [ -z "$MARIADB_INITDB_SKIP_TZINFO" ] && [ -d /usr/share/zoneinfo ]; then
			echo "USE mysql;"
			mariadb-tzinfo-to-sql /usr/share/zoneinfo 2>/dev/null
		fi
		if [ -n "$MARIADB_DATABASE" ]; then echo "USE $(sql_ident "$MARIADB_DATABASE");"; fi
		for f in /docker-entrypoint-initdb.d/*; do
			case "$f" in
			*.sql) cat "$f" && echo ;;
			*.sql.gz) gunzip -c "$f" && echo ;;
			*) if [ -e "$f" ]; then echo "-- ignoring $f (only .sql and .sql.gz run here)"; fi ;;
			esac
		done
	} >"$setup"

	note "Initializing database files in $DATADIR"
	# The official image's install options; durability comes from the syncfs below.
	mariadb-install-db --rpm --auth-root-authentication-method=normal --skip-test-db \
		--default-time-zone=SYSTEM --enforce-storage-engine= --skip-log-bin --expire-logs-days=0 \
		--loose-innodb_buffer_pool_load_at_startup=0 --loose-innodb_buffer_pool_dump_at_shutdown=0 \
		"${@:2}" --datadir="$DATADIR" --skip-name-resolve --loose-innodb-flush-method=nosync \
		--loose-innodb-doublewrite=0 --extra-file="$setup" >/dev/null ||
		fail "initializing $DATADIR failed (its output is above)"
	rm -f "$setup"
	unset root_pw MARIADB_ROOT_PASSWORD MARIADB_PASSWORD MYSQL_ROOT_PASSWORD MYSQL_PASSWORD
	# One flush of the filesystem instead of an fsync per file during init.
	sync -f "$DATADIR"
	note "MariaDB init process done. Ready for start up."
fi

exec "$@"
