#!/usr/bin/env bash
# Installs (from Debian's packages) and starts the servers the test suite talks to: MariaDB on
# 127.0.0.1:3306 with a user `alpes` for the tests, and Redis on 127.0.0.1:6379; and installs
# Chromium for the browser tests. Idempotent: a second run finds them installed and listening and
# changes nothing. Needs root (CI runs as root).
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do listening "$1" && return 0; sleep 1; done
  echo "nothing listens on 127.0.0.1:$1 after 60 s" >&2; return 1
}

missing=()
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server mariadb-client)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# Debian's Chromium for the console's browser tests (tests/browser): Playwright drives it at
# /usr/bin/chromium and never downloads a browser of its own (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD).
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! listening 3306; then
  echo "starting MariaDB on 127.0.0.1:3306"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  (setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --port=3306 \
      --max-connections=500 >/tmp/mariadbd.log 2>&1 &)
  wait_port 3306
fi
# Debian's root logs in through the unix socket only: the tests connect over TCP as `alpes`.
mariadb --protocol=socket -uroot <<'SQL'
CREATE USER IF NOT EXISTS 'alpes'@'127.0.0.1' IDENTIFIED BY 'alpes';
CREATE USER IF NOT EXISTS 'alpes'@'localhost' IDENTIFIED BY 'alpes';
GRANT ALL PRIVILEGES ON *.* TO 'alpes'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'alpes'@'localhost';
SQL

if ! listening 6379; then
  echo "starting Redis on 127.0.0.1:6379"
  redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save '' --appendonly no \
    --logfile /tmp/redis-server.log
  wait_port 6379
fi
echo "MariaDB on 127.0.0.1:3306 (user alpes), Redis on 127.0.0.1:6379"
