//! Client commands of the job path: `estimate`, `balance`, `reserve`, `commit`, `refund`,
//! `extend`, `hold`, `holds` (the CreditService).
#![allow(clippy::print_stdout)] // printing results is this module's job

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::Command;
use super::remote::{ClientError, Remote, hold_json, hold_line, print, state_name, time};
use crate::pb;
use crate::pb::credit_service_client::CreditServiceClient;

/// Runs a job-path command (other commands are not this module's: `Ok`).
#[allow(clippy::too_many_lines, clippy::many_single_char_names)] // one arm per command: decode → call → print
pub(super) async fn run(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Estimate {
            operation,
            params,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let req = pb::EstimateCostRequest {
                operation,
                params: params.into_iter().collect(),
            };
            let e = api
                .call(None, req, |ch, r| async move {
                    CreditServiceClient::new(ch).estimate_cost(r).await
                })
                .await?;
            let factors: Vec<Value> = e
                .factors
                .iter()
                .map(|f| json!({"name": f.name, "value": f.value, "detail": f.detail}))
                .collect();
            let v = json!({"cost": e.cost, "exact": e.exact, "factors": factors});
            let mut text = format!("{} credits", e.cost);
            for f in &e.factors {
                let _ = write!(text, "\n  {:<12} {}", f.name, f.detail);
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Balance { account, client } => {
            let api = Remote::connect(&client).await?;
            let b = api
                .call(
                    None,
                    pb::CheckBalanceRequest {
                        account_id: account,
                    },
                    |ch, r| async move { CreditServiceClient::new(ch).check_balance(r).await },
                )
                .await?;
            let next = b
                .next_expiry
                .as_ref()
                .map(|e| json!({"at": time(e.at.as_ref()), "amount": e.amount}));
            let v = json!({
                "account_id": b.account_id, "plan": b.plan, "available": b.available, "held": b.held,
                "debt": b.debt,
                "open_holds": b.open_holds, "low_balance": b.low_balance, "by_source": b.by_source,
                "next_expiry": next, "allowance_left": b.allowance_left,
            });
            let mut text = format!(
                "account     {}\nplan        {}\navailable   {}{}\nheld        {}\nopen holds  {}",
                b.account_id,
                b.plan,
                b.available,
                match (b.debt, b.low_balance) {
                    (0, false) => String::new(),
                    (0, true) => "  (low)".to_owned(),
                    (d, _) => format!("  (after {d} owed)"),
                },
                b.held,
                b.open_holds
            );
            let mut sources: Vec<_> = b.by_source.iter().collect();
            sources.sort();
            for (s, n) in sources {
                let _ = write!(text, "\n  {s:<14} {n}");
            }
            if let Some(left) = b.allowance_left {
                let _ = write!(text, "\nallowance left this period  {left}");
            }
            if let Some(e) = &b.next_expiry {
                let _ = write!(
                    text,
                    "\nnext expiry  {} at {}",
                    e.amount,
                    time(e.at.as_ref()).as_str().unwrap_or("?")
                );
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Reserve {
            account,
            amount,
            operation,
            params,
            ttl,
            metadata,
            key,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let ttl = ttl.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            });
            let cost = match (amount, operation) {
                (Some(_), Some(_)) => {
                    return Err(ClientError::new(
                        "INVALID_ARGUMENT",
                        "give an AMOUNT or --operation, not both",
                        Vec::new(),
                    ));
                }
                (None, Some(name)) => {
                    Some(pb::reserve_request::Cost::Operation(pb::PricedOperation {
                        name,
                        params: params.into_iter().collect(),
                    }))
                }
                (amount, None) => Some(pb::reserve_request::Cost::Amount(amount.unwrap_or(0))),
            };
            let req = pb::ReserveRequest {
                account_id: account,
                cost,
                idempotency_key: k.clone(),
                ttl,
                metadata: metadata.into_iter().collect(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    CreditServiceClient::new(ch).reserve(r).await
                })
                .await?;
            let h = r.hold.unwrap_or_default();
            let v = json!({"hold": hold_json(&h), "available": r.available});
            let text = format!(
                "{}  reserved {} on {}, expires {} (available now {})",
                h.hold_id,
                h.amount,
                h.account_id,
                time(h.expires_at.as_ref()).as_str().unwrap_or("?"),
                r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Commit {
            hold,
            amount,
            key,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::CommitRequest {
                hold_id: hold,
                amount,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    CreditServiceClient::new(ch).commit(r).await
                })
                .await?;
            let h = r.hold.unwrap_or_default();
            let v = json!({"hold": hold_json(&h), "released": r.released, "extra_drawn": r.extra_drawn, "available": r.available});
            let text = format!(
                "{}  committed {} (released {}, extra drawn {}; available now {})",
                h.hold_id, h.committed_amount, r.released, r.extra_drawn, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Refund {
            hold,
            amount,
            reason,
            key,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::RefundRequest {
                hold_id: hold,
                amount,
                reason,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    CreditServiceClient::new(ch).refund(r).await
                })
                .await?;
            let h = r.hold.unwrap_or_default();
            let v =
                json!({"hold": hold_json(&h), "refunded": r.refunded, "available": r.available});
            let text = format!(
                "{}  refunded {} ({}; available now {})",
                h.hold_id,
                r.refunded,
                state_name(h.state),
                r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Extend {
            hold,
            ttl,
            key,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let ttl = prost_types::Duration {
                seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            };
            let req = pb::ExtendHoldRequest {
                hold_id: hold,
                ttl: Some(ttl),
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    CreditServiceClient::new(ch).extend_hold(r).await
                })
                .await?;
            let h = r.hold.unwrap_or_default();
            let text = format!(
                "{}  expires {}",
                h.hold_id,
                time(h.expires_at.as_ref()).as_str().unwrap_or("?")
            );
            print(client.json, &json!({"hold": hold_json(&h)}), &text);
            Ok(())
        }
        Command::Hold { hold, client } => {
            let api = Remote::connect(&client).await?;
            let r = api
                .call(
                    None,
                    pb::GetHoldRequest { hold_id: hold },
                    |ch, r| async move { CreditServiceClient::new(ch).get_hold(r).await },
                )
                .await?;
            let h = r.hold.unwrap_or_default();
            print(client.json, &hold_json(&h), &hold_line(&h));
            Ok(())
        }
        Command::Holds {
            account,
            all,
            page_size,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let states = if all {
                vec![]
            } else {
                vec![pb::HoldState::Open.into()]
            };
            let mut holds = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListHoldsRequest {
                    account_id: account.clone(),
                    states: states.clone(),
                    page_size,
                    page_token,
                };
                let r = api
                    .call(None, req, |ch, r| async move {
                        CreditServiceClient::new(ch).list_holds(r).await
                    })
                    .await?;
                holds.extend(r.holds);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(holds.iter().map(hold_json).collect());
            let text = if holds.is_empty() {
                format!("no {}holds on {account}", if all { "" } else { "open " })
            } else {
                holds.iter().map(hold_line).collect::<Vec<_>>().join("\n")
            };
            print(client.json, &v, &text);
            Ok(())
        }
        _ => Ok(()),
    }
}
