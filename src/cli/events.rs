//! `tally events ...`: outbound event deliveries, redelivery and endpoints (the AdminService).
#![allow(clippy::print_stdout)] // printing results is this module's job

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::EventsCommand;
use super::remote::{ClientError, Remote, print, time};
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;

fn state_word(s: i32) -> &'static str {
    match pb::EventDeliveryState::try_from(s) {
        Ok(pb::EventDeliveryState::Pending) => "pending",
        Ok(pb::EventDeliveryState::Delivered) => "delivered",
        Ok(pb::EventDeliveryState::Failed) => "failed",
        _ => "unknown",
    }
}

fn delivery_json(d: &pb::EventDelivery, body: bool) -> Value {
    let mut v = json!({
        "event_id": d.event_id, "endpoint": d.endpoint, "account_id": d.account_id,
        "type": d.r#type, "state": state_word(d.state), "attempts": d.attempts,
        "created_at": time(d.created_at.as_ref()), "next_attempt_at": time(d.next_attempt_at.as_ref()),
        "last_attempt_at": time(d.last_attempt_at.as_ref()),
        "last_status": d.last_status, "last_error": d.last_error,
        "delivered_at": time(d.delivered_at.as_ref()),
    });
    if body {
        v["body"] = serde_json::from_str(&d.body).unwrap_or(Value::String(d.body.clone()));
    }
    v
}

fn delivery_line(d: &pb::EventDelivery) -> String {
    let when = time(d.created_at.as_ref());
    let mut line = format!(
        "{}  {:<22} {:<10} {:<10} attempts {:<2} {:<16} {}",
        d.event_id,
        d.r#type,
        d.endpoint,
        state_word(d.state),
        d.attempts,
        d.account_id,
        when.as_str().unwrap_or("")
    );
    if !d.last_error.is_empty() {
        let _ = write!(line, "  last error: {}", d.last_error);
    }
    line
}

/// Runs an events command.
#[allow(clippy::too_many_lines)] // one arm per command: call → print
pub(super) async fn run(action: EventsCommand) -> Result<(), ClientError> {
    match action {
        EventsCommand::List {
            account,
            kind,
            state,
            endpoint,
            limit,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let state = match state.as_deref() {
                Some("pending") => pb::EventDeliveryState::Pending,
                Some("delivered") => pb::EventDeliveryState::Delivered,
                Some("failed") => pb::EventDeliveryState::Failed,
                _ => pb::EventDeliveryState::Unspecified,
            };
            let mut rows = Vec::new();
            let mut token = String::new();
            while rows.len() < limit {
                let req = pb::ListEventDeliveriesRequest {
                    account_id: account.clone().unwrap_or_default(),
                    r#type: kind.clone().unwrap_or_default(),
                    state: state.into(),
                    endpoint: endpoint.clone().unwrap_or_default(),
                    event_id: String::new(),
                    page_size: i32::try_from((limit - rows.len()).min(500)).unwrap_or(500),
                    page_token: token.clone(),
                };
                let r = api
                    .call(None, req, |ch, r| async move {
                        AdminServiceClient::new(ch).list_event_deliveries(r).await
                    })
                    .await?;
                rows.extend(r.deliveries);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            rows.truncate(limit);
            let v = Value::Array(rows.iter().map(|d| delivery_json(d, false)).collect());
            let text = rows
                .iter()
                .map(delivery_line)
                .collect::<Vec<_>>()
                .join("\n");
            print(client.json, &v, &text);
            Ok(())
        }
        EventsCommand::Show { event_id, client } => {
            let api = Remote::connect(&client).await?;
            let req = pb::ListEventDeliveriesRequest {
                event_id: event_id.clone(),
                page_size: 100,
                ..Default::default()
            };
            let r = api
                .call(None, req, |ch, r| async move {
                    AdminServiceClient::new(ch).list_event_deliveries(r).await
                })
                .await?;
            if r.deliveries.is_empty() {
                return Err(ClientError::new(
                    "NOT_FOUND",
                    format!("no delivery of event {event_id}"),
                    Vec::new(),
                ));
            }
            let v = Value::Array(
                r.deliveries
                    .iter()
                    .map(|d| delivery_json(d, true))
                    .collect(),
            );
            let mut text = r
                .deliveries
                .iter()
                .map(delivery_line)
                .collect::<Vec<_>>()
                .join("\n");
            if let Some(d) = r.deliveries.first() {
                let body: Value = serde_json::from_str(&d.body).unwrap_or(Value::Null);
                let _ = write!(text, "\n{body:#}");
            }
            print(client.json, &v, &text);
            Ok(())
        }
        EventsCommand::Redeliver {
            event_id,
            endpoint,
            client,
        } => {
            let api = Remote::connect(&client).await?;
            let req = pb::RedeliverEventRequest {
                event_id: event_id.clone(),
                endpoint: endpoint.unwrap_or_default(),
            };
            let r = api
                .call(None, req, |ch, r| async move {
                    AdminServiceClient::new(ch).redeliver_event(r).await
                })
                .await?;
            print(
                client.json,
                &json!({"event_id": event_id, "queued": r.queued}),
                &format!("{event_id}: {} deliveries queued", r.queued),
            );
            Ok(())
        }
        EventsCommand::Endpoints { client } => {
            let api = Remote::connect(&client).await?;
            let r = api
                .call(None, pb::ListEventEndpointsRequest {}, |ch, r| async move {
                    AdminServiceClient::new(ch).list_event_endpoints(r).await
                })
                .await?;
            let v = Value::Array(
                r.endpoints
                    .iter()
                    .map(|e| {
                        json!({"name": e.name, "origin": e.origin, "types": e.types,
                               "disabled": e.disabled, "disabled_at": time(e.disabled_at.as_ref()),
                               "disabled_reason": e.disabled_reason})
                    })
                    .collect(),
            );
            let text = r
                .endpoints
                .iter()
                .map(|e| {
                    let types = if e.types.is_empty() {
                        "*".to_owned()
                    } else {
                        e.types.join(",")
                    };
                    let state = if e.disabled {
                        format!("DISABLED ({})", e.disabled_reason)
                    } else {
                        "enabled".to_owned()
                    };
                    format!("{:<16} {:<40} {:<30} {state}", e.name, e.origin, types)
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(client.json, &v, &text);
            Ok(())
        }
        EventsCommand::Enable { endpoint, client } => {
            let api = Remote::connect(&client).await?;
            let req = pb::EnableEventEndpointRequest {
                name: endpoint.clone(),
            };
            let r = api
                .call(None, req, |ch, r| async move {
                    AdminServiceClient::new(ch).enable_event_endpoint(r).await
                })
                .await?;
            let text = if r.was_disabled {
                format!("{endpoint}: enabled")
            } else {
                format!("{endpoint}: was not disabled")
            };
            print(
                client.json,
                &json!({"endpoint": endpoint, "was_disabled": r.was_disabled}),
                &text,
            );
            Ok(())
        }
    }
}
