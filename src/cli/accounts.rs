//! Client commands of accounts and the books: `account ...`, `entries`, `export` (the
//! AdminService).
#![allow(clippy::print_stdout)] // printing results is this module's job

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::remote::{
    ClientError, Remote, hold_json, hold_line, kind_word, parse_word, print, source_word, time,
};
use super::{AccountCommand, Command};
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;

/// The names of an API enum's values (from its generated type, so they cannot drift).
fn names(name_of: impl Fn(i32) -> Option<&'static str>) -> Vec<&'static str> {
    (0..256).filter_map(name_of).collect()
}

/// Runs an account command (other commands are not this module's: `Ok`).
#[allow(clippy::too_many_lines, clippy::many_single_char_names)] // one arm per command: decode → call → print
pub(super) async fn run(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Account {
            action: AccountCommand::Show { account, client },
        } => {
            let api = Remote::connect(&client).await?;
            let r = api
                .call(
                    None,
                    pb::GetAccountRequest {
                        account_id: account,
                    },
                    |ch, r| async move { AdminServiceClient::new(ch).get_account(r).await },
                )
                .await?;
            let a = r.account.unwrap_or_default();
            let v = json!({
                "account_id": a.account_id, "plan": a.plan, "available": a.available, "held": a.held,
                "debt": a.debt,
                "open_holds": a.open_holds, "low_balance": a.low_balance,
                "low_balance_threshold": a.low_balance_threshold, "entitlements": a.entitlements,
                "created_at": time(a.created_at.as_ref()),
                "holds": r.open_holds.iter().map(hold_json).collect::<Vec<_>>(),
                "grants": r.grants.iter().map(|g| json!({
                    "grant_id": g.grant_id, "source": source_word(g.source), "granted": g.granted, "remaining": g.remaining,
                    "held": g.held, "expired": g.expired, "expires_at": time(g.expires_at.as_ref()), "priority": g.priority,
                })).collect::<Vec<_>>(),
            });
            let mut text = format!(
                "account     {}\nplan        {} ({})\navailable   {}{}\nheld        {}\nopen holds  {}",
                a.account_id,
                a.plan,
                a.plan_display_name,
                a.available,
                if a.low_balance {
                    format!("  (low: under {})", a.low_balance_threshold)
                } else {
                    String::new()
                },
                a.held,
                a.open_holds
            );
            let mut ents: Vec<_> = a.entitlements.iter().collect();
            ents.sort();
            for (k, v) in ents {
                let _ = write!(text, "\n  {k} = {v}");
            }
            for g in &r.grants {
                let expiry = g.expires_at.as_ref().map_or_else(
                    || "never expires".to_owned(),
                    |t| format!("expires {}", time(Some(t)).as_str().unwrap_or("?")),
                );
                let _ = write!(
                    text,
                    "\n{}  {:<12} {:>8} of {:<8} held {:<6} priority {:<3} {expiry}",
                    g.grant_id,
                    source_word(g.source),
                    g.remaining,
                    g.granted,
                    g.held,
                    g.priority
                );
            }
            for h in &r.open_holds {
                let _ = write!(text, "\n{}", hold_line(h));
            }
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::SetPlan {
                    account,
                    plan,
                    key,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::SetPlanRequest {
                account_id: account,
                plan,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    AdminServiceClient::new(ch).set_plan(r).await
                })
                .await?;
            let v = json!({"account_id": r.account_id, "previous_plan": r.previous_plan, "plan": r.plan});
            print(
                client.json,
                &v,
                &format!("{}: plan {} → {}", r.account_id, r.previous_plan, r.plan),
            );
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::List {
                    plan,
                    low_balance,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let mut rows = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = pb::ListAccountsRequest {
                    plan: plan.clone().unwrap_or_default(),
                    low_balance_only: low_balance,
                    page_size: 500,
                    page_token,
                };
                let r = api
                    .call(None, req, |ch, r| async move {
                        AdminServiceClient::new(ch).list_accounts(r).await
                    })
                    .await?;
                rows.extend(r.accounts);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(rows.iter().map(|a| json!({"account_id": a.account_id, "plan": a.plan, "available": a.available, "held": a.held, "debt": a.debt, "low_balance": a.low_balance})).collect());
            let text = rows
                .iter()
                .map(|a| {
                    format!(
                        "{:<32} {:<12} {:>10} {:>8}{}",
                        a.account_id,
                        a.plan,
                        a.available,
                        a.held,
                        if a.low_balance { "  low" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                client.json,
                &v,
                if rows.is_empty() {
                    "no accounts"
                } else {
                    &text
                },
            );
            Ok(())
        }
        Command::Entries {
            account,
            kinds,
            since,
            until,
            limit,
            client,
        } => {
            let kinds = kinds
                .iter()
                .map(|k| {
                    parse_word(
                        k,
                        "ENTRY_KIND_",
                        "--kind",
                        pb::EntryKind::from_str_name,
                        &names(|n| pb::EntryKind::try_from(n).ok().map(|k| k.as_str_name())),
                    )
                    .map(i32::from)
                })
                .collect::<Result<Vec<i32>, _>>()?;
            let api = Remote::connect(&client).await?;
            let mut entries = Vec::new();
            let mut page_token = String::new();
            while entries.len() < limit {
                let req = pb::ListEntriesRequest {
                    account_id: account.clone().unwrap_or_default(),
                    kinds: kinds.clone(),
                    since,
                    until,
                    page_size: i32::try_from(limit.saturating_sub(entries.len()).min(500))
                        .unwrap_or(500),
                    page_token,
                };
                let r = api
                    .call(None, req, |ch, r| async move {
                        AdminServiceClient::new(ch).list_entries(r).await
                    })
                    .await?;
                entries.extend(r.entries);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            let v = Value::Array(entries.iter().map(|e| json!({
                "entry_id": e.entry_id, "account_id": e.account_id, "hold_id": e.hold_id, "kind": kind_word(e.kind),
                "available_delta": e.available_delta, "held_delta": e.held_delta, "reason": e.reason,
                "created_at": time(e.created_at.as_ref()),
            })).collect());
            let text = entries
                .iter()
                .map(|e| {
                    format!(
                        "{:>8}  {}  {:<8} {:<24} available {:+} held {:+} {}",
                        e.entry_id,
                        time(e.created_at.as_ref()).as_str().unwrap_or("?"),
                        kind_word(e.kind),
                        e.account_id,
                        e.available_delta,
                        e.held_delta,
                        e.reason
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                client.json,
                &v,
                if entries.is_empty() {
                    "no entries"
                } else {
                    &text
                },
            );
            Ok(())
        }
        Command::Export {
            since,
            until,
            account,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let req = pb::ExportUsageRequest {
                since: Some(since),
                until: Some(until),
                account_id: account.unwrap_or_default(),
            };
            let mut stream = api
                .call(None, req, |ch, r| async move {
                    AdminServiceClient::new(ch).export_usage(r).await
                })
                .await?;
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| super::remote::status_error(&s, None))?
            {
                if let Err(e) = std::io::Write::write_all(&mut out, &chunk.csv) {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        // `tally export ... | head`: the reader has what it wanted.
                        std::process::exit(0);
                    }
                    return Err(ClientError::new("IO", e.to_string(), vec![]));
                }
            }
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Grant {
                    account,
                    amount,
                    reason,
                    source,
                    expires_in,
                    priority,
                    key,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let expires_at = expires_in
                .and_then(|d| chrono::TimeDelta::from_std(d).ok())
                .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                .map(|t| prost_types::Timestamp {
                    seconds: t.timestamp(),
                    nanos: 0,
                });
            let source = if source.is_empty() {
                pb::GrantSource::Unspecified
            } else {
                parse_word(
                    &source,
                    "GRANT_SOURCE_",
                    "--source",
                    pb::GrantSource::from_str_name,
                    &names(|n| pb::GrantSource::try_from(n).ok().map(|k| k.as_str_name())),
                )?
            };
            let req = pb::GrantRequest {
                account_id: account,
                amount,
                reason,
                idempotency_key: k.clone(),
                source: source.into(),
                expires_at,
                priority,
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    AdminServiceClient::new(ch).grant(r).await
                })
                .await?;
            let v = json!({"account_id": r.account_id, "grant_id": r.grant_id, "available": r.available});
            let text = format!(
                "granted {amount} to {} ({}; available now {})",
                r.account_id, r.grant_id, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Open {
                    account,
                    plan,
                    key,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::OpenAccountRequest {
                account_id: account,
                plan,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    AdminServiceClient::new(ch).open_account(r).await
                })
                .await?;
            let v = json!({"account_id": r.account_id, "plan": r.plan, "bonus": r.bonus, "available": r.available});
            let text = format!(
                "opened {} on {} (bonus {}; available now {})",
                r.account_id, r.plan, r.bonus, r.available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Adjust {
                    account,
                    delta,
                    reason,
                    operator,
                    key,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::AdjustRequest {
                account_id: account,
                delta,
                reason,
                operator,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    AdminServiceClient::new(ch).adjust(r).await
                })
                .await?;
            let v = json!({"account_id": r.account_id, "delta": r.delta, "available": r.available});
            print(
                client.json,
                &v,
                &format!(
                    "adjusted {} by {:+} (available now {})",
                    r.account_id, r.delta, r.available
                ),
            );
            Ok(())
        }
        Command::Account {
            action:
                AccountCommand::Transfer {
                    from,
                    to,
                    amount,
                    reason,
                    key,
                    client,
                },
        } => {
            let api = Remote::connect(&client).await?;
            let k = key.key();
            let req = pb::TransferRequest {
                from_account_id: from.clone(),
                to_account_id: to.clone(),
                amount,
                reason,
                idempotency_key: k.clone(),
            };
            let r = api
                .call(Some(&k), req, |ch, r| async move {
                    AdminServiceClient::new(ch).transfer(r).await
                })
                .await?;
            let v = json!({"from": from, "to": to, "amount": r.amount, "from_available": r.from_available, "to_available": r.to_available});
            let text = format!(
                "moved {} from {from} (now {}) to {to} (now {})",
                r.amount, r.from_available, r.to_available
            );
            print(client.json, &v, &text);
            Ok(())
        }
        _ => Ok(()),
    }
}
