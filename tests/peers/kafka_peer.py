"""Kafka clients for tests/kafka.rs: create a topic, produce and consume in a
consumer group through BOOTSTRAP, with confluent-kafka (librdkafka) and with
kafka-python, and report every TCP peer port this process connected to while
the clients were open (from `ss`), so the test can check that none bypassed
legate. Prints one JSON line."""
import json, os, subprocess, sys, time, uuid

bootstrap = sys.argv[1]
client = sys.argv[2]  # confluent | kafka-python | create TOPIC | count TOPIC | run TOPIC SECONDS


def peer_ports():
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={os.getpid()}," in line:
            ports.add(int(line.split()[4].rsplit(":", 1)[1]))
    return ports


def with_confluent():
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = "orders-" + uuid.uuid4().hex[:6]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(15)
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(100):
        p.produce(topic, value=f"order-{i}".encode())
    assert p.flush(15) == 0, "messages left unsent"
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-" + topic,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                  "enable.auto.commit": False})
    c.subscribe([topic])
    got, t0 = [], time.time()
    while len(got) < 100 and time.time() - t0 < 30:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got.append(m.value())
    c.commit(asynchronous=False)
    ports = peer_ports()
    c.close()
    return len(got), ports


def with_kafka_python():
    # kafka-python's group membership gets no assignment from Tansu (seen
    # without legate too), so this client assigns the partition itself and
    # commits its offsets through the group coordinator (FindCoordinator,
    # OffsetCommit, OffsetFetch).
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = "orders-" + uuid.uuid4().hex[:6]
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, 1, 1)])
    p = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(100):
        p.send(topic, f"order-{i}".encode())
    p.flush(15)
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id="g-" + topic,
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=20000)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    got = []
    for m in c:
        got.append(m.value)
        if len(got) == 100:
            break
    c.commit()
    assert c.committed(tp) == 100, c.committed(tp)
    ports = peer_ports()
    c.close(); p.close(); admin.close()
    return len(got), ports


def create(topic):
    """Creates TOPIC on the broker at BOOTSTRAP (directly: test setup)."""
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(15)


def count(topic):
    """How many messages TOPIC holds on the broker at BOOTSTRAP, read one by
    one (Tansu's watermark offsets were seen to lag the log)."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "count-" + uuid.uuid4().hex[:6],
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    n, quiet_since = 0, time.time()
    while time.time() - quiet_since < 2:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            n += 1
            quiet_since = time.time()
    c.close()
    return n


def run(topic, seconds):
    """Produces one message every 10 ms for SECONDS and consumes in a group,
    through BOOTSTRAP; says "ready" once the first message is delivered."""
    from confluent_kafka import Consumer, Producer
    delivered, failed, errors = [0], [0], []

    def on_delivery(err, _msg):
        if err is None:
            delivered[0] += 1
        else:
            failed[0] += 1
            errors.append(str(err))

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                  "message.timeout.ms": 10000})
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "g-" + topic,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    c.subscribe([topic])
    consumed, said, t0 = 0, False, time.time()
    while time.time() - t0 < seconds:
        p.produce(topic, value=b"x", on_delivery=on_delivery)
        p.poll(0)
        m = c.poll(0.01)
        if m is not None and m.error() is None:
            consumed += 1
        if delivered[0] and not said:
            print("ready", flush=True)
            said = True
    p.flush(15)
    t1 = time.time()
    while time.time() - t1 < 3:
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            consumed += 1
    c.close()
    return {"delivered": delivered[0], "failed": failed[0], "consumed": consumed,
            "errors": sorted(set(errors))[:5]}


if client == "create":
    create(sys.argv[3])
elif client == "count":
    print(count(sys.argv[3]), flush=True)
elif client == "run":
    print(json.dumps(run(sys.argv[3], float(sys.argv[4]))), flush=True)
else:
    got, ports = with_confluent() if client == "confluent" else with_kafka_python()
    print(json.dumps({"consumed": got, "peer_ports": sorted(ports)}), flush=True)
