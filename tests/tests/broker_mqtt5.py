"""MQTT 5 features of Colony's broker, driven with paho (Debian's python3-paho-mqtt).

Run by tests/tests/broker.rs as `python3 broker_mqtt5.py PORT`; prints one JSON object with what
each scenario observed, which the Rust test checks.
"""
import time, json, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions
PORT = int(sys.argv[1])
out = {}

class C:
    def __init__(self, cid, clean=True, expiry=None, user=None, pw=None):
        self.msgs = []
        self.acks = {}
        self.connack = None
        self.ev = threading.Event()
        self.c = mqtt.Client(cid, protocol=mqtt.MQTTv5)
        if user:
            self.c.username_pw_set(user, pw)
        self.c.on_message = lambda c, u, m: self.msgs.append(m)
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, [r.value for r in rcs])
        self.c.on_unsubscribe = lambda c, u, mid, p, rcs: self._ack(mid, [r.value for r in (rcs if isinstance(rcs, list) else [rcs])])
        props = None
        if expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        self.c.connect("127.0.0.1", PORT, clean_start=clean, properties=props)
        self.c.loop_start()
        self.ev.wait(5)

    def _on_connect(self, c, u, flags, rc, props):
        self.connack = (flags.get("session present", 0), rc.value)
        self.ev.set()

    def _ack(self, mid, codes):
        self.acks[mid] = codes

    def sub(self, topic, qos=1, **opts):
        props = None
        if "sid" in opts:
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = opts.pop("sid")
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **opts), properties=props)
        return self.wait_ack(mid)

    def unsub(self, topic):
        _, mid = self.c.unsubscribe(topic)
        return self.wait_ack(mid)

    def wait_ack(self, mid):
        for _ in range(100):
            if mid in self.acks:
                return self.acks[mid]
            time.sleep(0.05)
        return None

    def pub(self, topic, payload, qos=1, retain=False, **props):
        p = None
        if props:
            p = Properties(PacketTypes.PUBLISH)
            for k, v in props.items():
                setattr(p, k, v)
        self.c.publish(topic, payload, qos=qos, retain=retain, properties=p).wait_for_publish(5)

    def wait(self, n, limit=5.0):
        end = time.time() + limit
        while len(self.msgs) < n and time.time() < end:
            time.sleep(0.05)
        return [m.payload.decode() for m in self.msgs]

    def close(self):
        # Wait until the DISCONNECT is out, and give the broker a moment to see it, so that
        # what is published next finds the session offline.
        gone = threading.Event()
        self.c.on_disconnect = lambda c, u, rc, p=None: gone.set()
        self.c.disconnect()
        gone.wait(5)
        self.c.loop_stop()
        time.sleep(0.3)

# Topic aliases.
s = C("alias-sub"); s.sub("a/alias/#")
p = C("alias-pub")
p.pub("a/alias/one", "first", TopicAlias=1)
p.pub("", "second", TopicAlias=1)
out["alias"] = [(m.topic, m.payload.decode()) for m in (s.wait(2) and s.msgs)]

# No-local.
nl = C("nl"); nl.sub("a/nl", noLocal=True)
nl.pub("a/nl", "own")
p.pub("a/nl", "other")
out["no_local"] = nl.wait(1)

# Retain-as-published and retain handling.
rap = C("rap"); rap.sub("a/rap/#", retainAsPublished=True)
plain = C("plain"); plain.sub("a/rap/#")
p.pub("a/rap/x", "kept", retain=True)
rap.wait(1); plain.wait(1)
out["rap"] = [m.retain for m in rap.msgs]
out["not_rap"] = [m.retain for m in plain.msgs]
never = C("never"); never.sub("a/rap/#", retainHandling=2)
every = C("every"); every.sub("a/rap/#", retainHandling=0)
out["retain_handling"] = [len(never.wait(1, 0.5)), len(every.wait(1))]

# Subscription identifiers.
sid = C("sid"); sid.sub("a/sid/#", sid=42)
p.pub("a/sid/x", "with-id")
sid.wait(1)
out["sub_ids"] = [getattr(m.properties, "SubscriptionIdentifier", None) for m in sid.msgs]

# Shared subscriptions.
w1 = C("w1"); w1.sub("$share/g/a/jobs/+")
w2 = C("w2"); w2.sub("$share/g/a/jobs/+")
for i in range(6):
    p.pub("a/jobs/x", "job%d" % i)
time.sleep(0.5)
out["shared"] = [len(w1.msgs), len(w2.msgs)]

# Reason codes.
out["suback"] = p.sub("forbidden/#")
out["unsuback"] = p.unsub("a/never-subscribed")
bad = C("bad", user="alice", pw="wrong")
out["bad_login"] = bad.connack

# Session expiry: resumed within the interval, gone after it.
se = C("se", clean=True, expiry=2); se.sub("a/se"); se.close()
p.pub("a/se", "while-away")
se = C("se", clean=False, expiry=2)
out["se_resumed"] = [se.connack[0], se.wait(1)]
se.close()
time.sleep(4.5)
p.pub("a/se", "after-expiry")
se = C("se", clean=False, expiry=2)
out["se_expired"] = [se.connack[0], se.wait(1, 1.0)]
se.close()

# Message expiry: a short-lived message dies while the subscriber is away.
me = C("me", clean=True, expiry=60); me.sub("a/me"); me.close()
p.pub("a/me", "short", MessageExpiryInterval=1)
p.pub("a/me", "long", MessageExpiryInterval=100)
time.sleep(2.5)
me = C("me", clean=False, expiry=60)
got = me.wait(1, 2.0)
out["message_expiry"] = got
out["remaining"] = [getattr(m.properties, "MessageExpiryInterval", None) for m in me.msgs]
# Will delay: a connection that drops without DISCONNECT has its will published only after the
# delay (the session outlives it).
wd = C("wd-watch"); wd.sub("a/wills/#")
dev = mqtt.Client("wd-dev", protocol=mqtt.MQTTv5)
wp = Properties(PacketTypes.WILLMESSAGE); wp.WillDelayInterval = 2
dev.will_set("a/wills/dev", "gone", qos=1, properties=wp)
cp = Properties(PacketTypes.CONNECT); cp.SessionExpiryInterval = 30
dev.connect("127.0.0.1", PORT, properties=cp)
dev.loop_start()
time.sleep(0.5)
dev.loop_stop()
dev.socket().close()
dropped_at = time.time()
early = list(wd.wait(1, 1.0))
late = wd.wait(1, 6.0)
out["will_delay"] = [early, late, round(time.time() - dropped_at)]
print(json.dumps(out))
