// GET /api/balance-stream: the signed-in user's live balance as Server-Sent Events, proxied
// from Tally's HTTP sidecar (GET /v1/accounts/{id}/balance/stream). The billing token stays on
// the server; the browser's EventSource reconnects with Last-Event-ID, passed on so Tally
// resumes from the version the page already shows.
import { accountOf } from "../../../lib/tally";

export const runtime = "nodejs";
// Never cached, never buffered: every response is a live stream.
export const dynamic = "force-dynamic";

const TALLY_HTTP = process.env.TALLY_HTTP_URL ?? "http://127.0.0.1:8080";

export async function GET(request: Request): Promise<Response> {
  const account = accountOf(request);
  if (!account) return new Response("sign in first", { status: 401 });
  const headers: Record<string, string> = { accept: "text/event-stream" };
  if (process.env.TALLY_BILLING_TOKEN) headers.authorization = `Bearer ${process.env.TALLY_BILLING_TOKEN}`;
  const last = request.headers.get("last-event-id");
  if (last) headers["last-event-id"] = last;
  const upstream = await fetch(`${TALLY_HTTP}/v1/accounts/${encodeURIComponent(account)}/balance/stream`, {
    headers,
    // The browser going away ends the upstream stream too (one stream less against Tally's caps).
    signal: request.signal,
    cache: "no-store",
  });
  if (!upstream.ok || !upstream.body) {
    return new Response(await upstream.text(), { status: upstream.status, headers: { "content-type": "application/json" } });
  }
  return new Response(upstream.body, {
    headers: {
      "content-type": "text/event-stream",
      "cache-control": "no-cache, no-transform",
      "x-accel-buffering": "no",
    },
  });
}
