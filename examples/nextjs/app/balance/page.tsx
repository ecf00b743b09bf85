// A server component: the signed-in user's credits, read on the server (no token in the browser).
import { headers } from "next/headers";
import { tally } from "../../lib/tally";
import { LiveCredits } from "./live-credits";

export default async function BalancePage() {
  const account = (await headers()).get("x-user-id");
  if (!account) return <p>Sign in to see your credits.</p>;
  const b = await tally.checkBalance(account);
  return (
    <section>
      <h1>
        <LiveCredits initial={b.available} />
      </h1>
      <p>
        Plan {b.plan}
        {b.held > 0 ? `, ${b.held} held by running jobs` : ""}
        {b.lowBalance ? " — running low" : ""}
      </p>
      {b.nextExpiry ? (
        <p>
          {b.nextExpiry.amount} expire on {b.nextExpiry.at.toLocaleDateString()}
        </p>
      ) : null}
    </section>
  );
}
