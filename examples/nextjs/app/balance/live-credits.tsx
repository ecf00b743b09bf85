"use client";
// The header's credit count, live: an EventSource on the app's own proxy route (no token in the
// browser). EventSource reconnects by itself with Last-Event-ID, so a dropped connection or a
// Tally restart shows the newest balance again without a gap.
import { useEffect, useState } from "react";

/** The `data` of a `balance` event (the fields of CheckBalance, plus `version`). */
interface BalanceEvent {
  account_id: string;
  version: number;
  plan: string;
  available: number;
  held: number;
  debt: number;
  open_holds: number;
  low_balance: boolean;
}

export function LiveCredits({ initial }: { initial: number }) {
  const [b, setB] = useState<{ available: number; held: number; low: boolean }>({ available: initial, held: 0, low: false });
  useEffect(() => {
    const source = new EventSource("/api/balance-stream");
    source.addEventListener("balance", (e) => {
      const d = JSON.parse((e as MessageEvent<string>).data) as BalanceEvent;
      setB({ available: d.available, held: d.held, low: d.low_balance });
    });
    return () => source.close();
  }, []);
  return (
    <span>
      {b.available.toLocaleString()} credits{b.held > 0 ? ` (${b.held} held)` : ""}
      {b.low ? " — running low" : ""}
    </span>
  );
}
