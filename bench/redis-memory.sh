#!/usr/bin/env bash
# Measures the Redis memory that buckets take. It starts a private
# redis-server and the release service on loopback ports and sends checks
# for 100,000 API keys. The limits are hourly, so no bucket is full again
# (and deleted) during the run. Then it deletes the estimate records and
# prints the used_memory growth per stored bucket.
#
# The meters shape gives each API key its requests and tokens buckets, as
# the Fikra check does, and leaves no estimate records. The requests shape
# gives each API key one bucket. With the requests-tokens shape every call
# also leaves an estimate record; Redis keeps its key tables sized for all
# of them after the deletion, so that figure overstates the buckets' own
# cost.
#
# Usage: bench/redis-memory.sh [meters|requests|requests-tokens] [keys] [calls]
# Build first: cargo build --release --bins
set -euo pipefail
cd "$(dirname "$0")/.."

shape=${1:-meters}
keys=${2:-100000}
calls=${3:-600000}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "error: nothing listens on 127.0.0.1:$1 after 10 s; the last log lines follow" >&2
  tail -n 5 "$work"/*.log >&2
  exit 1
}

redis_port=$(free_port)
grpc_port=$(free_port)
metrics_port=$(free_port)
sed 's/unit: minute/unit: hour/' deploy/config/fikra.yaml > "$work/hour.yaml"

redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$work" --save "" --appendonly no \
  > "$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$redis_port"
cli() { redis-cli -p "$redis_port" "$@"; }
used_memory() { cli INFO memory | tr -d '\r' | sed -n 's/^used_memory://p'; }

target/release/fikra-ratelimit serve --config "$work/hour.yaml" \
  --redis-url "redis://127.0.0.1:$redis_port" \
  --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$metrics_port" \
  > "$work/service.log" 2>&1 &
pids+=($!)
wait_port "$grpc_port"

before=$(used_memory)
target/release/fikra-loadgen --target "http://127.0.0.1:$grpc_port" --keys "$keys" --count "$calls" \
  --in-flight 128 --warmup 0 --shape "$shape" | tail -n 1

# Estimate records (one per request id) are not buckets: delete them, then
# give Redis time to shrink its key tables in the background.
cli EVAL "local cursor, deleted = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', '*:e:*', 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    redis.call('DEL', key)
    deleted = deleted + 1
  end
until cursor == '0'
return deleted" 0 > /dev/null
sleep 12

after=$(used_memory)
# Every bucket is a field of a hash.
buckets=$(cli EVAL "local cursor, fields = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    if redis.call('TYPE', key).ok == 'hash' then
      fields = fields + redis.call('HLEN', key)
    end
  end
until cursor == '0'
return fields" 0)
hashes=$(cli DBSIZE)
sample=$(cli RANDOMKEY)

echo "shape $shape: $buckets buckets in $hashes keys"
echo "used_memory $before -> $after bytes: $(( (after - before) / buckets )) bytes per bucket"
echo "MEMORY USAGE of one hash ($(cli HLEN "$sample") buckets): $(cli MEMORY USAGE "$sample") bytes"
