#!/usr/bin/env bash
# Make sure the Redis and PostgreSQL that the integration tests use answer; start them where they
# are installed but stopped. Outside CI a missing service only warns (those tests then skip);
# in CI (CI=true) the test fixtures turn a missing service into a failure.
set -u
redis_host=127.0.0.1; redis_port=6379
pg_host=127.0.0.1; pg_port=5432

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() { # host port name
  for _ in $(seq 1 50); do answers "$1" "$2" && return 0; sleep 0.2; done
  echo "ensure-services: $3 on $1:$2 does not answer" >&2; return 1
}

if ! answers $redis_host $redis_port; then
  if command -v redis-server >/dev/null; then
    echo "ensure-services: starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port $redis_port --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for $redis_host $redis_port Redis || true
  else
    echo "ensure-services: Redis is not installed; Redis tests will be skipped (failed under CI=true)" >&2
  fi
fi

if ! answers $pg_host $pg_port; then
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_for $pg_host $pg_port PostgreSQL || true
  else
    echo "ensure-services: PostgreSQL is not installed; PostgreSQL tests will be skipped (failed under CI=true)" >&2
  fi
fi
# promtool (Debian's prometheus package) checks and unit-tests the alerting rules and the
# dashboard's queries. Installed when missing and we are root (CI); otherwise those tests skip
# (and fail under CI=true).
if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "ensure-services: installing promtool (apt-get install prometheus)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
      || echo "ensure-services: could not install promtool; rule tests will be skipped (failed under CI=true)" >&2
  else
    echo "ensure-services: promtool is not installed (apt-get install prometheus); rule tests will be skipped (failed under CI=true)" >&2
  fi
fi
exit 0
