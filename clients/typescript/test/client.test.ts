// @tally/client against a real `tally serve` (TALLY_BIN, default target/debug/tally of the
// repository) on loopback, over gRPC (HTTP/2) and over gRPC-Web (HTTP/1.1).
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";

import { createClient, type Transport } from "@connectrpc/connect";
import { createGrpcTransport, createGrpcWebTransport } from "@connectrpc/connect-node";

import {
  AdminService,
  createTallyClient,
  InsufficientCreditsError,
  isReason,
  OutcomeUnknownError,
  TallyError,
  type TallyClient,
} from "../src/index.js";
import { GrantSource } from "../src/gen/tally/v1/credit_service_pb.js";

const root = resolve(new URL(".", import.meta.url).pathname, "../../../..");
const bin = process.env.TALLY_BIN ?? join(root, "target/debug/tally");

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a ? ok(a.port) : fail(new Error("no port"))));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let server: ChildProcess;
let dir: string;
let token: string;
let target: string;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "tally-ts-"));
  const out = execFileSync(bin, ["auth", "new-token"], { encoding: "utf8" });
  const fields = Object.fromEntries(out.trim().split("\n").map((l) => l.trim().split(/\s+/, 2) as [string, string]));
  token = fields.token!;
  writeFileSync(join(dir, "callers.toml"), `[callers.ts]\nroles = ["generation", "admin"]\ntoken_sha256 = ["${fields.token_sha256}"]\n`);
  const [grpc, http, metrics] = [await freePort(), await freePort(), await freePort()];
  target = `http://127.0.0.1:${grpc}`;
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("TALLY_")));
  server = spawn(
    bin,
    ["serve", "--listen", `127.0.0.1:${grpc}`, "--http-listen", `127.0.0.1:${http}`, "--metrics-listen", `127.0.0.1:${metrics}`,
      "--database-url", `sqlite://${dir}/t.db`, "--callers-file", join(dir, "callers.toml")],
    { env, stdio: "ignore" },
  );
  const end = Date.now() + 30_000;
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${metrics}/readyz`)).status === 200) break;
    } catch {
      // not up yet
    }
    if (Date.now() > end) throw new Error("tally serve did not become ready");
    await new Promise((r) => setTimeout(r, 50));
  }
});

after(() => {
  if (server.exitCode === null) server.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
});

async function grant(transport: Transport, accountId: string, amount: number) {
  await createClient(AdminService, transport).grant(
    { accountId, amount: BigInt(amount), reason: "ts test", idempotencyKey: `g-${randomUUID()}`, source: GrantSource.PURCHASE },
    { headers: { authorization: `Bearer ${token}` } },
  );
}

const transports: Record<string, () => Transport> = {
  grpc: () => createGrpcTransport({ baseUrl: target }),
  "grpc-web over HTTP/1.1": () => createGrpcWebTransport({ baseUrl: target, httpVersion: "1.1" }),
};

for (const [name, make] of Object.entries(transports)) {
  describe(name, () => {
    let client: TallyClient;
    let transport: Transport;
    const account = () => `ts:${randomUUID().slice(0, 12)}`;
    before(() => {
      transport = make();
      client = createTallyClient({ transport, token });
    });

    test("reserve, commit, refund: numbers and Dates, JSON-safe", async () => {
      const a = account();
      await grant(transport, a, 100);
      const start = (await client.checkBalance(a)).available;
      const hold = await client.reserve(a, 30, { metadata: { job: "j-1" } });
      assert.equal(hold.state, "open");
      assert.equal(hold.amount, 30);
      assert.ok(hold.expiresAt instanceof Date && hold.expiresAt.getTime() > Date.now());
      const settled = await client.commit(hold.holdId, 20);
      assert.deepEqual([settled.hold.state, settled.released, settled.available], ["committed", 10, start - 20]);
      const refunded = await client.refund(hold.holdId, { amount: 5, reason: "bad frames" });
      assert.equal(refunded.available, start - 15);
      const b = await client.checkBalance(a);
      assert.deepEqual([b.available, b.held, b.openHolds], [start - 15, 0, 0]);
      assert.doesNotThrow(() => JSON.stringify(b)); // no bigint anywhere
      assert.ok((b.bySource.purchase ?? 0) > 0);
    });

    test("watchBalance yields the balance now, then each change; resumes after a version", async () => {
      const a = account();
      await grant(transport, a, 100);
      const stop = new AbortController();
      const seen: number[] = [];
      const versions: number[] = [];
      const start = (await client.checkBalance(a)).available;
      const done = (async () => {
        for await (const u of client.watchBalance(a, { signal: stop.signal })) {
          seen.push(u.available);
          versions.push(u.version);
          assert.equal(u.accountId, a);
          if (u.available === start - 30) stop.abort();
        }
      })();
      while (seen.length === 0) await sleep(10);
      const hold = await client.reserve(a, 30);
      await done;
      assert.deepEqual([seen[0], seen.at(-1)], [start, start - 30]);
      assert.ok(versions.every((v, i) => i === 0 || v > versions[i - 1]!), `${versions}`);
      // A reconnect with the newest version gets only what comes next.
      const resumed = client.watchBalance(a, { afterVersion: versions.at(-1) });
      const next = resumed.next();
      await client.commit(hold.holdId, 10);
      const u = (await next).value!;
      assert.equal(u.available, start - 10);
      assert.ok(u.version > versions.at(-1)!);
      await resumed.return(undefined);
      await assert.rejects(client.watchBalance("ts:nobody").next(), (e) => isReason(e, "ACCOUNT_NOT_FOUND"));
    });

    test("short credits are an InsufficientCreditsError with its numbers", async () => {
      const a = account();
      await grant(transport, a, 40);
      const available = (await client.checkBalance(a)).available;
      await assert.rejects(client.reserve(a, available + 1000), (e: unknown) => {
        assert.ok(e instanceof InsufficientCreditsError);
        assert.deepEqual([e.available, e.requested, e.reason], [available, available + 1000, "INSUFFICIENT_CREDITS"]);
        return true;
      });
    });

    test("a key replays; a reused key is refused; a bad field is named", async () => {
      const a = account();
      await grant(transport, a, 50);
      const key = `ts-key-${randomUUID()}`;
      const first = await client.reserve(a, 5, { key });
      assert.equal((await client.reserve(a, 5, { key })).holdId, first.holdId);
      await assert.rejects(client.reserve(a, 6, { key }), (e) => isReason(e, "IDEMPOTENCY_KEY_REUSED"));
      await assert.rejects(client.checkBalance("not a valid id!"), (e: unknown) => {
        assert.ok(e instanceof TallyError && e.reason === "INVALID_ARGUMENT");
        assert.ok("account_id" in e.violations);
        return true;
      });
      await assert.rejects(client.reserve(a, 0), RangeError); // checked before sending
    });

    test("a priced operation is priced by the server", async () => {
      const a = account();
      await grant(transport, a, 1000);
      const params = { seconds: 12, resolution: "1080p" };
      const cost = await client.estimate("video_export", params);
      const hold = await client.reserve(a, { operation: "video_export", params });
      assert.ok(cost > 0);
      assert.equal(hold.amount, cost);
    });

    test("withCredits commits the cost returned, releases on a throw, heartbeats keep the hold", async () => {
      const a = account();
      await grant(transport, a, 100);
      const start = (await client.checkBalance(a)).available;
      const done = await client.withCredits(a, 30, async () => 12);
      assert.equal(done.available, start - 12);
      let failed = "";
      await assert.rejects(
        client.withCredits(a, 30, async (h) => {
          failed = h.holdId;
          throw new Error("render failed");
        }),
        /render failed/,
      );
      assert.equal((await client.getHold(failed)).state, "released");
      const short = createTallyClient({ transport, token, holdTtlMs: 1500 });
      const slow = await short.withCredits(a, 20, async (h) => {
        await new Promise((r) => setTimeout(r, 3500)); // over twice the TTL: only heartbeats keep it
        assert.equal((await short.getHold(h.holdId)).state, "open");
        return 20;
      });
      assert.equal(slow.hold.state, "committed");
      assert.equal((await client.checkBalance(a)).available, start - 32);
    });

    test("the token never shows when the client is logged", async () => {
      const { inspect } = await import("node:util");
      assert.ok(!inspect(client, { depth: 5 }).includes(token));
      assert.ok(!JSON.stringify(client).includes(token));
    });

    test("a wrong token is UNAUTHENTICATED", async () => {
      const stranger = createTallyClient({ transport, token: "tly_wrong" });
      await assert.rejects(stranger.checkBalance("ts:any"), (e) => isReason(e, "UNAUTHENTICATED"));
    });
  });
}

test("every ErrorReason of the proto has its error class", async () => {
  const { ErrorReason } = await import("../src/index.js");
  const { errorClassFor, InsufficientCreditsError: Insufficient, HoldNotOpenError } = await import("../src/index.js");
  const names = Object.keys(ErrorReason).filter((k) => Number.isNaN(Number(k)) && k !== "ERROR_REASON_UNSPECIFIED");
  assert.ok(names.length >= 20);
  for (const n of names) assert.ok(errorClassFor(n), n);
  assert.equal(errorClassFor("INSUFFICIENT_CREDITS"), Insufficient);
  assert.equal(errorClassFor("HOLD_EXPIRED"), HoldNotOpenError);
  assert.equal(errorClassFor("SOMETHING_NEWER"), TallyError);
});

test("a server that is gone: retried within the deadline, then the key to retry with", async () => {
  const closed = await freePort();
  const c = createTallyClient({ transport: createGrpcTransport({ baseUrl: `http://127.0.0.1:${closed}` }), token, deadlineMs: 800 });
  await assert.rejects(c.reserve("ts:gone", 5), (e: unknown) => {
    assert.ok(e instanceof OutcomeUnknownError);
    assert.ok(e.key?.startsWith("reserve-"));
    return true;
  });
});
