/**
 * A TypeScript client for Tally: reserve credits before a generation job, commit what it really
 * cost, refund when it fails. Runs on Node, Edge runtimes and browsers: give it a Connect
 * transport (`createGrpcTransport` from `@connectrpc/connect-node`, or `createGrpcWebTransport`
 * from `@connectrpc/connect-web` / `-node` for gRPC-Web over `fetch` or HTTP/1.1).
 *
 * - Every call has a deadline; UNAVAILABLE, ABORTED, a lost reply and a rate limit with
 *   RetryInfo are retried with the same idempotency key (so nothing applies twice), honouring
 *   RetryInfo, within that deadline. Then the error carries the key to retry with.
 * - Errors are typed from `google.rpc.ErrorInfo`: `InsufficientCreditsError` has `available`
 *   and `requested`; every error's `reason` is a name of the proto's `ErrorReason`.
 * - Credits are `number`s (checked: Tally's amounts are at most 10^15 < 2^53); times are `Date`s.
 * - `withCredits` is the job pattern: reserve, heartbeat, commit the cost the callback returns,
 *   or refund if it throws.
 */
import { create } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Client, type Transport } from "@connectrpc/connect";

import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "./gen/google/rpc/error_details_pb.js";
import {
  CreditService,
  ErrorReason,
  HoldState,
  type CheckBalanceResponse,
  type Hold as PbHold,
  ReserveRequestSchema,
} from "./gen/tally/v1/credit_service_pb.js";

export { CreditService, ErrorReason };
export { AdminService } from "./gen/tally/v1/credit_service_pb.js";

/** The largest amount Tally takes in one request. */
export const MAX_AMOUNT = 1_000_000_000_000;

/** A name of the proto's `ErrorReason` (the `ErrorInfo.reason` strings). */
export type Reason = Exclude<keyof typeof ErrorReason, "ERROR_REASON_UNSPECIFIED" | number>;

/** A refusal, or a call that could not complete. */
export class TallyError extends Error {
  constructor(
    /** The gRPC code. */
    readonly code: Code,
    /** The stable reason (`ErrorInfo.reason`). */
    readonly reason: Reason | string,
    message: string,
    /** `ErrorInfo.metadata`. */
    readonly metadata: Record<string, string> = {},
    /** The idempotency key to retry with when the outcome is unknown. */
    readonly key?: string,
    /** For INVALID_ARGUMENT: each bad field and why. */
    readonly violations: Record<string, string> = {},
  ) {
    super(`${reason}: ${message}`);
    this.name = new.target.name;
  }

  protected int(name: string): number {
    const n = Number(this.metadata[name] ?? "0");
    return Number.isSafeInteger(n) ? n : 0;
  }
}

/** Not enough available credits: top up; retrying will not help. */
export class InsufficientCreditsError extends TallyError {
  get available(): number {
    return this.int("available");
  }
  get requested(): number {
    return this.int("requested");
  }
}

/** A refund beyond what is committed and not yet refunded. */
export class RefundExceedsChargeError extends TallyError {
  get refundable(): number {
    return this.int("refundable");
  }
  get requested(): number {
    return this.int("requested");
  }
}

/** A balance would pass its limit. */
export class BalanceLimitExceededError extends TallyError {
  get limit(): number {
    return this.int("limit");
  }
}

/** The call may or may not have happened: retry it with `key` (it replays or applies). */
export class OutcomeUnknownError extends TallyError {}
/** A field breaks a limit: `violations` names each. */
export class InvalidArgumentError extends TallyError {}
/** No such account (accounts begin with a grant or OpenAccount). */
export class AccountNotFoundError extends TallyError {}
/** No such hold. */
export class HoldNotFoundError extends TallyError {}
/** The key was used for a different request: a caller bug, never retried. */
export class IdempotencyKeyReusedError extends TallyError {}
/** OpenAccount of an account that exists. */
export class AccountExistsError extends TallyError {}
/** The hold is no longer open: committed, released or expired (see `reason`). */
export class HoldNotOpenError extends TallyError {}
/** A partial refund of an open hold. */
export class HoldNotCommittedError extends TallyError {}
/** No, malformed or unknown bearer token. */
export class UnauthenticatedError extends TallyError {}
/** The caller may not do this, or not on this account. */
export class PermissionDeniedError extends TallyError {}
/** Busy, overloaded, rate limited or without its database through every retry. */
export class UnavailableError extends TallyError {}
/** A bug in Tally. */
export class InternalError extends TallyError {}

const classes: Record<Reason, typeof TallyError> = {
  INVALID_ARGUMENT: InvalidArgumentError,
  ACCOUNT_NOT_FOUND: AccountNotFoundError,
  HOLD_NOT_FOUND: HoldNotFoundError,
  IDEMPOTENCY_KEY_REUSED: IdempotencyKeyReusedError,
  ACCOUNT_EXISTS: AccountExistsError,
  INSUFFICIENT_CREDITS: InsufficientCreditsError,
  HOLD_ALREADY_COMMITTED: HoldNotOpenError,
  HOLD_RELEASED: HoldNotOpenError,
  HOLD_EXPIRED: HoldNotOpenError,
  HOLD_NOT_COMMITTED: HoldNotCommittedError,
  REFUND_EXCEEDS_CHARGE: RefundExceedsChargeError,
  BALANCE_LIMIT_EXCEEDED: BalanceLimitExceededError,
  CONCURRENT_MODIFICATION: UnavailableError,
  DATABASE_UNAVAILABLE: UnavailableError,
  OUTCOME_UNKNOWN: OutcomeUnknownError,
  INTERNAL: InternalError,
  UNAUTHENTICATED: UnauthenticatedError,
  PERMISSION_DENIED: PermissionDeniedError,
  RATE_LIMITED: UnavailableError,
  OVERLOADED: UnavailableError,
  UNIMPLEMENTED: TallyError,
  CLIENT_GAVE_UP: TallyError,
  TOO_MANY_STREAMS: UnavailableError,
  SHUTTING_DOWN: UnavailableError,
};

/** The error class of a reason (`TallyError` for one this client does not know). */
export function errorClassFor(reason: string): typeof TallyError {
  return (classes as Record<string, typeof TallyError>)[reason] ?? TallyError;
}

/** Whether `e` is a Tally error with this reason. */
export function isReason(e: unknown, reason: Reason): e is TallyError {
  return e instanceof TallyError && e.reason === reason;
}

function typed(e: ConnectError, key?: string): TallyError {
  const info = e.findDetails(ErrorInfoSchema)[0];
  const bad = e.findDetails(BadRequestSchema)[0];
  const reason = info?.reason ?? Code[e.code] ?? "UNKNOWN";
  const violations = Object.fromEntries((bad?.fieldViolations ?? []).map((v) => [v.field, v.description]));
  const Cls = errorClassFor(reason);
  return new Cls(e.code, reason, e.rawMessage, { ...(info?.metadata ?? {}) }, key, violations);
}

function retryable(e: ConnectError): boolean {
  switch (e.code) {
    // UNKNOWN and CANCELED: Tally never sends them; a connection broken mid-call (an unknown
    // outcome that a retry with the same key settles).
    case Code.Unavailable:
    case Code.Aborted:
    case Code.Unknown:
    case Code.Canceled:
      return true;
    case Code.ResourceExhausted: // rate limited, not an empty wallet
      return e.findDetails(RetryInfoSchema).length > 0;
    default:
      return false;
  }
}

/** A credit count from the API, checked to be exact as a `number`. */
export function credits(n: bigint): number {
  if (n > BigInt(Number.MAX_SAFE_INTEGER) || n < BigInt(Number.MIN_SAFE_INTEGER)) {
    throw new RangeError(`${n} credits do not fit a number exactly`);
  }
  return Number(n);
}

function amount(n: number): bigint {
  if (!Number.isInteger(n) || n < 1 || n > MAX_AMOUNT) {
    throw new RangeError(`an amount is a whole number of credits in 1..=${MAX_AMOUNT}: ${n}`);
  }
  return BigInt(n);
}

function date(t: Timestamp | undefined): Date | undefined {
  return t ? timestampDate(t) : undefined;
}

/** A new idempotency key for one operation. */
export function newKey(what: string): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  const id = c?.randomUUID?.() ?? `${Date.now().toString(16)}-${Math.random().toString(16).slice(2)}${Math.random().toString(16).slice(2)}`;
  return `${what}-${id}`;
}

/** A reservation of credits for one job. */
export interface Hold {
  holdId: string;
  accountId: string;
  amount: number;
  state: "open" | "committed" | "released" | "expired" | "unspecified";
  committedAmount: number;
  refundedAmount: number;
  createdAt?: Date;
  expiresAt?: Date;
  resolvedAt?: Date;
  metadata: Record<string, string>;
}

function hold(h: PbHold | undefined): Hold {
  if (!h) throw new TallyError(Code.Internal, "INTERNAL", "the answer had no hold");
  return {
    holdId: h.holdId,
    accountId: h.accountId,
    amount: credits(h.amount),
    state: (HoldState[h.state] ?? "HOLD_STATE_UNSPECIFIED").replace("HOLD_STATE_", "").toLowerCase() as Hold["state"],
    committedAmount: credits(h.committedAmount),
    refundedAmount: credits(h.refundedAmount),
    createdAt: date(h.createdAt),
    expiresAt: date(h.expiresAt),
    resolvedAt: date(h.resolvedAt),
    metadata: { ...h.metadata },
  };
}

/** An account's credits now. */
export interface Balance {
  accountId: string;
  plan: string;
  available: number;
  held: number;
  debt: number;
  openHolds: number;
  lowBalance: boolean;
  bySource: Record<string, number>;
  nextExpiry?: { at: Date; amount: number };
  allowanceLeft?: number;
}

/** One message of a live balance: the whole balance at `version` (higher is newer). */
export interface BalanceUpdate extends Balance {
  version: number;
}

function balanceOf(r: CheckBalanceResponse | undefined): Balance {
  if (!r) throw new TallyError(Code.Internal, "INTERNAL", "the answer had no balance");
  return {
    accountId: r.accountId,
    plan: r.plan,
    available: credits(r.available),
    held: credits(r.held),
    debt: credits(r.debt),
    openHolds: credits(r.openHolds),
    lowBalance: r.lowBalance,
    bySource: Object.fromEntries(Object.entries(r.bySource).map(([k, v]) => [k, credits(v)])),
    nextExpiry: r.nextExpiry?.at ? { at: timestampDate(r.nextExpiry.at), amount: credits(r.nextExpiry.amount) } : undefined,
    allowanceLeft: r.allowanceLeft === undefined ? undefined : credits(r.allowanceLeft),
  };
}

/** What a commit or refund left. */
export interface Settled {
  hold: Hold;
  available: number;
  released?: number;
  extraDrawn?: number;
  refunded?: number;
}

/** What to reserve: a number of credits, or an operation the server prices. */
export type Cost = number | { operation: string; params?: Record<string, string | number> };

/** How calls are made. */
export interface Options {
  /** How to reach Tally (a Connect gRPC or gRPC-Web transport). */
  transport: Transport;
  /** The caller's bearer token. */
  token?: string;
  /** Budget of one call, retries included (default 5 s). */
  deadlineMs?: number;
  /** Attempts per call (default 6). */
  attempts?: number;
  /** First backoff, doubling per attempt with full jitter (default 25 ms, at most 1 s). */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** Hold lifetime of `withCredits` jobs; heartbeats extend it every third (default 60 s). */
  holdTtlMs?: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A Tally client (share one per process). */
export class TallyClient {
  private readonly credit: Client<typeof CreditService>;
  // A #private field: util.inspect and console.log never show it (it holds the token).
  readonly #headers: Record<string, string>;
  readonly deadlineMs: number;
  readonly attempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly holdTtlMs: number;

  constructor(options: Options) {
    this.credit = createClient(CreditService, options.transport);
    this.#headers = options.token ? { authorization: `Bearer ${options.token}` } : {};
    this.deadlineMs = options.deadlineMs ?? 5_000;
    this.attempts = options.attempts ?? 6;
    this.initialBackoffMs = options.initialBackoffMs ?? 25;
    this.maxBackoffMs = options.maxBackoffMs ?? 1_000;
    this.holdTtlMs = options.holdTtlMs ?? 60_000;
  }

  /** Runs `call` until it succeeds, is refused, or the deadline allows no more attempts. */
  private async retry<R>(call: (opts: { timeoutMs: number; headers: Record<string, string> }) => Promise<R>, key?: string): Promise<R> {
    const end = Date.now() + this.deadlineMs;
    let backoff = this.initialBackoffMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await call({ timeoutMs: Math.max(end - Date.now(), 1), headers: this.#headers });
      } catch (raw) {
        const e = ConnectError.from(raw);
        const deadline = e.code === Code.DeadlineExceeded;
        if (!deadline && !retryable(e)) throw typed(e, key);
        const hint = e.findDetails(RetryInfoSchema)[0]?.retryDelay;
        let wait = Math.random() * backoff;
        if (hint) wait = Math.max(wait, Number(hint.seconds) * 1000 + hint.nanos / 1e6);
        if (deadline || attempt >= this.attempts || Date.now() + wait >= end) {
          const t = typed(e, key);
          throw new OutcomeUnknownError(t.code, t.reason, `gave up after ${attempt} attempts: ${t.message}`, t.metadata, key);
        }
        await sleep(wait);
        backoff = Math.min(backoff * 2, this.maxBackoffMs);
      }
    }
  }

  /** The account's credits now. */
  async checkBalance(accountId: string): Promise<Balance> {
    return balanceOf(await this.retry((o) => this.credit.checkBalance({ accountId }, o)));
  }

  /**
   * Follows an account's balance (WatchBalance): yields the balance now, then the newest
   * balance after each committed change, through any replica. When the server restarts or the
   * connection drops it reconnects by itself with the last version, so nothing is missed and
   * nothing is repeated. Ends when `signal` aborts; throws for a refusal (an unknown account,
   * TOO_MANY_STREAMS, PERMISSION_DENIED).
   */
  async *watchBalance(accountId: string, opts: { afterVersion?: number; signal?: AbortSignal } = {}): AsyncGenerator<BalanceUpdate> {
    let after = opts.afterVersion;
    let backoff = this.initialBackoffMs;
    for (;;) {
      try {
        const stream = this.credit.watchBalance(
          { accountId, afterVersion: after === undefined ? undefined : BigInt(after) },
          { headers: this.#headers, signal: opts.signal },
        );
        for await (const m of stream) {
          backoff = this.initialBackoffMs;
          after = credits(m.version);
          yield { ...balanceOf(m.balance), version: after };
        }
        return;
      } catch (raw) {
        if (opts.signal?.aborted) return;
        const e = ConnectError.from(raw);
        if (!retryable(e)) throw typed(e);
        await sleep(Math.random() * backoff);
        backoff = Math.min(backoff * 2, this.maxBackoffMs);
      }
    }
  }

  /** Whole credits a Reserve of `operation` would hold. */
  async estimate(operation: string, params: Record<string, string | number> = {}): Promise<number> {
    const r = await this.retry((o) =>
      this.credit.estimateCost({ operation, params: Object.fromEntries(Object.entries(params).map(([k, v]) => [k, String(v)])) }, o),
    );
    return credits(r.cost);
  }

  /** Holds credits: a number, or the server's price of an operation. */
  async reserve(
    accountId: string,
    cost: Cost,
    opts: { ttlMs?: number; metadata?: Record<string, string>; key?: string } = {},
  ): Promise<Hold> {
    const key = opts.key ?? newKey("reserve");
    const req = create(ReserveRequestSchema, {
      accountId,
      idempotencyKey: key,
      metadata: opts.metadata ?? {},
      ttl: opts.ttlMs === undefined ? undefined : durationFromMs(opts.ttlMs),
      cost:
        typeof cost === "number"
          ? { case: "amount", value: amount(cost) }
          : {
              case: "operation",
              value: {
                name: cost.operation,
                params: Object.fromEntries(Object.entries(cost.params ?? {}).map(([k, v]) => [k, String(v)])),
              },
            },
    });
    const r = await this.retry((o) => this.credit.reserve(req, o), key);
    return hold(r.hold);
  }

  /** Settles a hold with what the job really cost. */
  async commit(holdId: string, cost: number, opts: { key?: string } = {}): Promise<Settled> {
    const key = opts.key ?? newKey("commit");
    const r = await this.retry((o) => this.credit.commit({ holdId, amount: amount(cost), idempotencyKey: key }, o), key);
    return { hold: hold(r.hold), available: credits(r.available), released: credits(r.released), extraDrawn: credits(r.extraDrawn) };
  }

  /** Releases an open hold, or returns `amount` (default: all) of a committed one. */
  async refund(holdId: string, opts: { amount?: number; reason?: string; key?: string } = {}): Promise<Settled> {
    const key = opts.key ?? newKey("refund");
    const r = await this.retry(
      (o) =>
        this.credit.refund(
          {
            holdId,
            amount: opts.amount === undefined ? undefined : amount(opts.amount),
            reason: (opts.reason ?? "").slice(0, 512),
            idempotencyKey: key,
          },
          o,
        ),
      key,
    );
    return { hold: hold(r.hold), available: credits(r.available), refunded: credits(r.refunded) };
  }

  /** Moves an open hold's expiry to now + `ttlMs`. */
  async extendHold(holdId: string, ttlMs: number, opts: { key?: string } = {}): Promise<Hold> {
    const key = opts.key ?? newKey("extend");
    const r = await this.retry((o) => this.credit.extendHold({ holdId, ttl: durationFromMs(ttlMs), idempotencyKey: key }, o), key);
    return hold(r.hold);
  }

  /** One hold, in any state. */
  async getHold(holdId: string): Promise<Hold> {
    return hold((await this.retry((o) => this.credit.getHold({ holdId }, o))).hold);
  }

  /**
   * Runs a job on credits: reserves `cost`, extends the hold every third of its TTL while `job`
   * runs, then commits the cost `job` returns — or releases the hold if it throws. A commit whose
   * outcome is unknown is sent again with its own key until answered or the hold expires: never
   * refunded, so never charged twice or not at all.
   */
  async withCredits(
    accountId: string,
    cost: Cost,
    job: (hold: Hold) => Promise<number>,
    opts: { metadata?: Record<string, string> } = {},
  ): Promise<Settled> {
    const ttl = this.holdTtlMs;
    let current = await this.reserve(accountId, cost, { ttlMs: ttl, metadata: opts.metadata });
    const beat = setInterval(() => {
      this.extendHold(current.holdId, ttl).then(
        (h) => (current = h),
        () => undefined, // the next beat tries again; a hold that is gone says so at commit
      );
    }, ttl / 3);
    let actual: number;
    try {
      actual = await job(current);
    } catch (e) {
      clearInterval(beat);
      await this.refund(current.holdId, { reason: `job failed: ${String(e)}` }).catch(() => undefined);
      throw e;
    }
    clearInterval(beat);
    const key = newKey("commit");
    for (;;) {
      try {
        return await this.commit(current.holdId, actual, { key });
      } catch (e) {
        if (!(e instanceof OutcomeUnknownError)) throw e;
        if (current.expiresAt && Date.now() >= current.expiresAt.getTime()) throw e;
        await sleep(100);
      }
    }
  }
}

/** A client over `options.transport`. */
export function createTallyClient(options: Options): TallyClient {
  return new TallyClient(options);
}
