//! `tally watch ACCOUNT`: an account's live balance (WatchBalance), one line per change.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use tonic::Code;

use super::remote::{ClientArgs, ClientError, Remote, status_error};
use crate::pb;
use crate::pb::credit_service_client::CreditServiceClient;

/// Wait before reconnecting after the server ended the stream (it stopped or restarted).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// One message as a line: JSON (`--json`, one object per line) or text.
fn line(json: bool, m: &pb::WatchBalanceResponse) -> String {
    let b = m.balance.clone().unwrap_or_default();
    if json {
        return json!({
            "version": m.version, "account_id": b.account_id, "plan": b.plan,
            "available": b.available, "held": b.held, "debt": b.debt, "open_holds": b.open_holds,
            "low_balance": b.low_balance, "allowance_left": b.allowance_left,
            "by_source": b.by_source.iter().collect::<std::collections::BTreeMap<_, _>>(),
        })
        .to_string();
    }
    let mut text = format!(
        "v{:<6} available {:>8}  held {:>6}  open holds {}",
        m.version, b.available, b.held, b.open_holds
    );
    if b.debt != 0 {
        let _ = write!(text, "  owed {}", b.debt);
    }
    if b.low_balance {
        text.push_str("  (low)");
    }
    text
}

/// Follows `account` until interrupted (or the stream fails for a reason other than the
/// server going away).
///
/// # Errors
/// [`ClientError`] for an unknown account, a refusal, or an unreachable server.
pub(super) async fn run(
    account: String,
    mut after_version: Option<i64>,
    client: ClientArgs,
) -> Result<(), ClientError> {
    let api = Remote::connect(&client).await?;
    loop {
        let req = pb::WatchBalanceRequest {
            account_id: account.clone(),
            after_version,
        };
        let mut stream = api
            .call(None, req, |ch, r| async move {
                CreditServiceClient::new(ch).watch_balance(r).await
            })
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    after_version = Some(m.version);
                    super::remote::out(&line(client.json, &m));
                }
                Ok(None) => return Ok(()),
                Err(s) if s.code() == Code::Unavailable => {
                    eprintln!("the stream ended ({}); reconnecting", s.message());
                    tokio::time::sleep(RECONNECT_AFTER).await;
                    break;
                }
                Err(s) => return Err(status_error(&s, None)),
            }
        }
    }
}
