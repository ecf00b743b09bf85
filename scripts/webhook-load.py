#!/usr/bin/env python3
"""Posts N signed checkout.session.completed webhooks to a local `tally serve` and reports
deliveries/s: N distinct purchases, each sent twice under two event ids, by SENDERS threads.

  TALLY_STRIPE_WEBHOOK_SECRET=whsec_bench tally serve --database-url postgres://... \
      --http-listen 127.0.0.1:8080 &
  python3 scripts/webhook-load.py 8080 1000 16 run1   # PORT N SENDERS ID_PREFIX

Loopback only; standard library only. A fresh ID_PREFIX makes new purchases; reusing one
measures redeliveries of known events.
"""
import hashlib, hmac, http.client, json, sys, threading, time
port, n, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); pre = sys.argv[4]
secret = b"whsec_bench"
bodies = []
for i in range(n):
    for dup in range(2):
        ev = {"id": f"evt_{pre}{i}_{dup}", "type": "checkout.session.completed", "created": 1764000000,
              "livemode": False, "data": {"object": {"id": f"cs_{pre}{i}", "object": "checkout.session",
              "mode": "payment", "payment_status": "paid", "client_reference_id": f"acct{i % 500}",
              "payment_intent": f"pi_{pre}{i}", "amount_total": 1900,
              "metadata": {"account_id": f"acct{i % 500}", "pack_id": "starter"}}}}
        bodies.append(json.dumps(ev).encode())
lock = threading.Lock(); idx = [0]; codes = {}
def worker():
    c = http.client.HTTPConnection("127.0.0.1", port)
    while True:
        with lock:
            if idx[0] >= len(bodies): return
            b = bodies[idx[0]]; idx[0] += 1
        t = str(int(time.time()))
        sig = hmac.new(secret, t.encode() + b"." + b, hashlib.sha256).hexdigest()
        c.request("POST", "/stripe/webhook", body=b, headers={"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"})
        r = c.getresponse(); r.read()
        with lock: codes[r.status] = codes.get(r.status, 0) + 1
start = time.time()
ts = [threading.Thread(target=worker) for _ in range(threads)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - start
print(f"{len(bodies)} deliveries in {el:.2f} s = {len(bodies)/el:.0f}/s with {threads} senders; statuses {codes}")
