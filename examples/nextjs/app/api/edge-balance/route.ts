// GET /api/edge-balance on the Edge runtime: no Node APIs there, so the client speaks gRPC-Web
// over fetch (connect-web) to the same gRPC port.
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { createTallyClient, isReason } from "@tally/client";

export const runtime = "edge";

const tally = createTallyClient({
  transport: createGrpcWebTransport({ baseUrl: process.env.TALLY_URL ?? "http://127.0.0.1:50051" }),
  token: process.env.TALLY_TOKEN,
});

export async function GET(request: Request): Promise<Response> {
  const account = request.headers.get("x-user-id");
  if (!account) return Response.json({ error: "sign in first" }, { status: 401 });
  try {
    const b = await tally.checkBalance(account);
    return Response.json({ available: b.available, held: b.held, plan: b.plan, lowBalance: b.lowBalance });
  } catch (e) {
    if (isReason(e, "ACCOUNT_NOT_FOUND")) return Response.json({ available: 0, held: 0 });
    throw e;
  }
}
