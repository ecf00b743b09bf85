// One Tally client per server process. TALLY_URL is the gRPC port (http://tally:50051); on an
// Edge runtime use createGrpcWebTransport from @connectrpc/connect-web instead (same port).
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createTallyClient } from "@tally/client";

export const tally = createTallyClient({
  transport: createGrpcTransport({ baseUrl: process.env.TALLY_URL ?? "http://127.0.0.1:50051" }),
  token: process.env.TALLY_TOKEN,
});

/** The signed-in user's account (NextAuth's session user id in a real app). */
export function accountOf(request: Request): string | null {
  return request.headers.get("x-user-id");
}
