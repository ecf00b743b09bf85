//! `tally.v1.AdminService`: operator and support actions.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert::{self, hold_to_pb};
use super::{Reply, allow_account, allow_all_accounts, caller, respond};
use crate::catalog::Catalog;
use crate::ledger::Ledger;
use crate::ledger::{EntryCursor, HoldQuery};
use crate::pb;

/// Most CSV bytes in one ExportUsage message: 64 KiB (plus at most one line).
pub const EXPORT_CHUNK_BYTES: usize = 64 * 1024;
/// Open holds returned by GetAccount.
pub const ACCOUNT_OPEN_HOLDS: u32 = 50;

/// The AdminService implementation.
#[derive(Clone, Debug)]
pub struct AdminApi {
    ledger: Ledger,
    catalog: Arc<Catalog>,
}

impl AdminApi {
    /// Handlers over `ledger`, with plans from `catalog`.
    pub fn new(ledger: Ledger, catalog: Arc<Catalog>) -> Self {
        Self { ledger, catalog }
    }
}

type CsvStream = Pin<Box<dyn Stream<Item = Result<pb::ExportUsageResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    #[instrument(name = "tally.v1.AdminService/Grant", skip_all, fields(account_id = %req.get_ref().account_id, amount = req.get_ref().amount))]
    async fn grant(&self, req: Request<pb::GrantRequest>) -> Reply<pb::GrantResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let caller = caller(&req);
        let (key, cmd) = convert::grant(req.get_ref())?;
        let a = self.ledger.grant(&caller, key, &cmd).await?;
        if !a.replayed {
            crate::telemetry::count_grant(cmd.source.as_str(), cmd.amount.get());
        }
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::GrantResponse {
                account_id: o.account_id,
                grant_id: o.grant_id,
                available: o.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.AdminService/SetPlan", skip_all, fields(account_id = %req.get_ref().account_id, plan = %req.get_ref().plan))]
    async fn set_plan(&self, req: Request<pb::SetPlanRequest>) -> Reply<pb::SetPlanResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let caller = caller(&req);
        let (key, cmd) = convert::set_plan(req.get_ref(), &self.catalog)?;
        let a = self.ledger.set_plan(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::SetPlanResponse {
                account_id: o.account_id,
                previous_plan: o.previous_plan,
                plan: o.plan,
            },
        ))
    }

    #[instrument(name = "tally.v1.AdminService/GetAccount", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn get_account(
        &self,
        req: Request<pb::GetAccountRequest>,
    ) -> Reply<pb::GetAccountResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let account_id = convert::account(&req.get_ref().account_id)?;
        let s = self.ledger.account(&account_id).await?;
        let holds = self
            .ledger
            .list_holds(&HoldQuery {
                account_id: account_id.clone(),
                states: vec![crate::domain::HoldState::Open],
                before: None,
                limit: ACCOUNT_OPEN_HOLDS,
            })
            .await?;
        let grants = self.ledger.grants(&account_id).await?;
        let period = self
            .catalog
            .plans
            .get(&s.balance.plan)
            .and_then(|p| p.allowance.as_ref())
            .map_or(crate::domain::plan::Period::Monthly, |a| a.period);
        let since = crate::domain::plan::period_start(period, s.balance.as_of);
        let used_this_period = self.ledger.used_since(&account_id, since).await?;
        let b = s.balance;
        let plan = self.catalog.plans.get(&b.plan);
        let account = pb::Account {
            low_balance: convert::is_low(&self.catalog, &b.plan, b.available),
            low_balance_threshold: plan.map_or(0, |p| p.low_balance_threshold),
            plan_display_name: plan.map(|p| p.display_name.clone()).unwrap_or_default(),
            entitlements: plan
                .map(|p| p.entitlements.clone().into_iter().collect())
                .unwrap_or_default(),
            account_id: b.account_id,
            plan: b.plan,
            available: b.available,
            held: b.held,
            debt: b.debt,
            open_holds: b.open_holds,
            allowance_left: b.allowance_left,
            used_this_period,
            created_at: Some(prost_types::Timestamp {
                seconds: s.created_at.timestamp(),
                nanos: 0,
            }),
        };
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(account),
            open_holds: holds.into_iter().map(hold_to_pb).collect(),
            grants: grants.into_iter().map(convert::grant_to_pb).collect(),
        }))
    }

    #[instrument(name = "tally.v1.AdminService/ListAccounts", skip_all)]
    async fn list_accounts(
        &self,
        req: Request<pb::ListAccountsRequest>,
    ) -> Reply<pb::ListAccountsResponse> {
        allow_all_accounts(&req)?;
        let r = req.get_ref();
        let query = convert::list_accounts(r, &self.catalog)?;
        let rows = self.ledger.list_accounts(&query).await?;
        let full = u32::try_from(rows.len()).is_ok_and(|n| n == query.limit);
        let next_page_token = match rows.last() {
            Some(last) if full => {
                convert::page_token(&convert::accounts_binding(r), &last.account_id)
            }
            _ => String::new(),
        };
        let accounts = rows
            .into_iter()
            .map(|a| pb::AccountListing {
                low_balance: convert::is_low(&self.catalog, &a.plan, a.available),
                account_id: a.account_id,
                plan: a.plan,
                available: a.available,
                held: a.held,
                debt: a.debt,
            })
            .collect();
        Ok(Response::new(pb::ListAccountsResponse {
            accounts,
            next_page_token,
        }))
    }

    #[instrument(name = "tally.v1.AdminService/ListEntries", skip_all)]
    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Reply<pb::ListEntriesResponse> {
        if req.get_ref().account_id.is_empty() {
            allow_all_accounts(&req)?;
        } else {
            allow_account(&req, &req.get_ref().account_id)?;
        }
        let r = req.get_ref();
        let query = convert::list_entries(r)?;
        let entries = self.ledger.list_entries(&query).await?;
        let full = u32::try_from(entries.len()).is_ok_and(|n| n == query.limit);
        let next_page_token = match entries.last() {
            Some(last) if full => {
                convert::page_token(&convert::entries_binding(r), &last.entry_id.to_string())
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.into_iter().map(convert::entry_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(name = "tally.v1.AdminService/ListEventDeliveries", skip_all)]
    async fn list_event_deliveries(
        &self,
        req: Request<pb::ListEventDeliveriesRequest>,
    ) -> Reply<pb::ListEventDeliveriesResponse> {
        if req.get_ref().account_id.is_empty() {
            allow_all_accounts(&req)?;
        } else {
            allow_account(&req, &req.get_ref().account_id)?;
        }
        let r = req.get_ref();
        let query = convert::list_events(r)?;
        let rows = self.ledger.list_events(&query).await?;
        let full = u32::try_from(rows.len()).is_ok_and(|n| n == query.limit);
        let next_page_token = match rows.last() {
            Some(last) if full => {
                convert::page_token(&convert::events_binding(r), &last.seq.to_string())
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventDeliveriesResponse {
            deliveries: rows.into_iter().map(convert::event_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(name = "tally.v1.AdminService/RedeliverEvent", skip_all, fields(event_id = %req.get_ref().event_id))]
    async fn redeliver_event(
        &self,
        req: Request<pb::RedeliverEventRequest>,
    ) -> Reply<pb::RedeliverEventResponse> {
        allow_all_accounts(&req)?;
        let (id, endpoint) = convert::redeliver(req.get_ref())?;
        let queued = self
            .ledger
            .redeliver_event(&id, endpoint.as_deref())
            .await?;
        if queued == 0 {
            return Err(
                crate::ledger::ServiceError::from(crate::domain::FieldViolation::new(
                    "event_id",
                    "no delivery has this id",
                ))
                .into(),
            );
        }
        Ok(Response::new(pb::RedeliverEventResponse {
            queued: i32::try_from(queued).unwrap_or(i32::MAX),
        }))
    }

    #[instrument(name = "tally.v1.AdminService/ListEventEndpoints", skip_all)]
    async fn list_event_endpoints(
        &self,
        req: Request<pb::ListEventEndpointsRequest>,
    ) -> Reply<pb::ListEventEndpointsResponse> {
        allow_all_accounts(&req)?;
        let disabled = self.ledger.disabled_endpoints().await?;
        let endpoints = self
            .catalog
            .events
            .endpoints
            .iter()
            .map(|(name, e)| {
                let off = disabled.iter().find(|(n, ..)| n == name);
                let origin = e
                    .url
                    .parse::<http::Uri>()
                    .ok()
                    .map(|u| {
                        format!(
                            "{}://{}",
                            u.scheme_str().unwrap_or("https"),
                            u.authority()
                                .map(http::uri::Authority::as_str)
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
                pb::EventEndpoint {
                    name: name.clone(),
                    origin,
                    types: e.types.clone(),
                    disabled: off.is_some(),
                    disabled_at: off.map(|(_, t, _)| convert::ts(*t)),
                    disabled_reason: off.map(|(.., r)| r.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListEventEndpointsResponse { endpoints }))
    }

    #[instrument(name = "tally.v1.AdminService/EnableEventEndpoint", skip_all)]
    async fn enable_event_endpoint(
        &self,
        req: Request<pb::EnableEventEndpointRequest>,
    ) -> Reply<pb::EnableEventEndpointResponse> {
        allow_all_accounts(&req)?;
        let name = &req.get_ref().name;
        if !self.catalog.events.endpoints.contains_key(name) {
            return Err(
                crate::ledger::ServiceError::from(crate::domain::FieldViolation::new(
                    "name",
                    "the catalog names no such endpoint",
                ))
                .into(),
            );
        }
        let was_disabled = self.ledger.enable_endpoint(name).await?;
        Ok(Response::new(pb::EnableEventEndpointResponse {
            was_disabled,
        }))
    }

    #[instrument(name = "tally.v1.AdminService/OpenAccount", skip_all, fields(account_id = %req.get_ref().account_id))]
    async fn open_account(
        &self,
        req: Request<pb::OpenAccountRequest>,
    ) -> Reply<pb::OpenAccountResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let caller = caller(&req);
        let (key, cmd) = convert::open_account(req.get_ref(), &self.catalog)?;
        let a = self.ledger.open_account(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::OpenAccountResponse {
                account_id: o.account_id,
                plan: o.plan,
                bonus: o.bonus,
                available: o.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.AdminService/Adjust", skip_all, fields(account_id = %req.get_ref().account_id, delta = req.get_ref().delta))]
    async fn adjust(&self, req: Request<pb::AdjustRequest>) -> Reply<pb::AdjustResponse> {
        allow_account(&req, &req.get_ref().account_id)?;
        let caller = caller(&req);
        let (key, cmd) = convert::adjust(req.get_ref())?;
        let a = self.ledger.adjust(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::AdjustResponse {
                account_id: o.account_id,
                delta: o.delta,
                available: o.available,
            },
        ))
    }

    #[instrument(name = "tally.v1.AdminService/Transfer", skip_all, fields(amount = req.get_ref().amount))]
    async fn transfer(&self, req: Request<pb::TransferRequest>) -> Reply<pb::TransferResponse> {
        allow_account(&req, &req.get_ref().from_account_id)?;
        allow_account(&req, &req.get_ref().to_account_id)?;
        let caller = caller(&req);
        let (key, cmd) = convert::transfer(req.get_ref())?;
        let a = self.ledger.transfer(&caller, key, &cmd).await?;
        let o = a.outcome;
        Ok(respond(
            a.replayed,
            pb::TransferResponse {
                amount: o.amount,
                from_available: o.from.1,
                to_available: o.to.1,
            },
        ))
    }

    type ExportUsageStream = CsvStream;

    #[instrument(name = "tally.v1.AdminService/ExportUsage", skip_all)]
    async fn export_usage(
        &self,
        req: Request<pb::ExportUsageRequest>,
    ) -> Reply<Self::ExportUsageStream> {
        if req.get_ref().account_id.is_empty() {
            allow_all_accounts(&req)?;
        } else {
            allow_account(&req, &req.get_ref().account_id)?;
        }
        let mut query = convert::export_usage(req.get_ref())?;
        let ledger = self.ledger.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut chunk = String::from(convert::CSV_HEADER);
            loop {
                let page = match ledger.list_entries(&query).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let done = u32::try_from(page.len()).map_or(true, |n| n < query.limit);
                query.cursor = EntryCursor::After(page.last().map(|e| e.entry_id));
                for e in &page {
                    chunk.push_str(&convert::csv_line(e));
                    if chunk.len() >= EXPORT_CHUNK_BYTES {
                        let piece = std::mem::take(&mut chunk);
                        if tx
                            .send(Ok(pb::ExportUsageResponse {
                                csv: piece.into_bytes(),
                            }))
                            .await
                            .is_err()
                        {
                            return; // the client went away
                        }
                    }
                }
                if done {
                    break;
                }
            }
            if !chunk.is_empty() {
                let _ = tx
                    .send(Ok(pb::ExportUsageResponse {
                        csv: chunk.into_bytes(),
                    }))
                    .await;
            }
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as CsvStream,
        ))
    }
}
